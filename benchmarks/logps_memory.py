"""Peak memory of scoring completion tokens: a full fp32 log_softmax vs `completion_token_logps`.

Synthetic case from the speed issue: a 32k vocabulary and a 2k-token sequence (logits given,
as a model's head would produce them), forward + backward. Each variant runs in a fresh
process so that its peak resident set size is its own.

    .venv/bin/python benchmarks/logps_memory.py [--vocab 32768] [--length 2048] [--dtype bf16]
        [--device cuda]     # on a GPU: peak allocated GPU memory instead of the process's RSS
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def run_variant(variant: str, vocab: int, length: int, dtype: str, device: str = "cpu") -> dict:
    import torch

    from bvpo.losses import completion_token_logps

    torch.manual_seed(0)
    logits = torch.randn(1, length, vocab, dtype=getattr(torch, dtype), device=device).requires_grad_()
    labels = torch.randint(0, vocab, (1, length), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 1024  # KiB, as ru_maxrss
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "gradient_only":  # the floor: any scorer must hold the logits' gradient
        logps = logits.sum(-1)
    elif variant == "full_log_softmax":
        logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        logps = completion_token_logps(logits, labels)
    logps.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "peak_above_logits_mib": (peak - before) / 1024,
            "logits_mib": logits.numel() * logits.element_size() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.vocab, args.length, args.dtype, args.device)))
        return
    print(f"vocab {args.vocab}, length {args.length}, logits {args.dtype}, forward + backward, on {args.device}")
    for variant in ("gradient_only", "full_log_softmax", "completion_token_logps"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab),
                              "--length", str(args.length), "--dtype", args.dtype, "--device", args.device],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"  {variant:24s} peak above the logits: {row['peak_above_logits_mib']:8.0f} MiB "
              f"(logits themselves {row['logits_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
