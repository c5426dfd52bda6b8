"""The `qwen3-0.6b` recipe end to end on a Qwen3-0.6B-shaped model: what a user runs, on a GPU.

    python benchmarks/gpu_recipe.py                  # on a machine with CUDA; a few minutes
    python benchmarks/gpu_recipe.py --shape tiny --allow-cpu   # the script itself, on a CPU

No weights can be downloaded, so the model is a Qwen3-0.6B-shaped random model (28 layers,
151,936-token embedding) with a byte-level BPE tokenizer and Qwen3's real chat template, taught
the output format by a short SFT with the project's warmup code (a random model never closes
its think block, so no sample would be valid). Then as the README walks it: `bvpo init --recipe
qwen3-0.6b` on arithmetic prompts with answers, an overlay that only shortens the run
(generation budget, steps, a MATH-500 slice), `bvpo check`, and every stage. Printed: each
stage's wall time, the sampling batch the preflight chose, valid-sample rates, pairs per mode,
training pairs/s and peak memory, the step-0 log-ratio, accuracies. Exit 0 = every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gpu_scale import SHAPES  # noqa: E402  (this script's folder is on the path)


def build_model(path: Path, shape: str, sft_steps: int, sft_lr: float, device: str) -> None:
    """The shaped random model, SFT'd on the embedded task in both modes, saved like a user's."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bvpo.config import Params, WarmupConfig
    from bvpo.modeling import save_model
    from bvpo.warmup import sft
    from realistic_model import train_tokenizer

    tokenizer = train_tokenizer("qwen3", vocab_size=2048)
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(device)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])  # Qwen3's generation_config
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = stops, tokenizer.pad_token_id
    params = Params(warmup=WarmupConfig(steps=sft_steps, batch_size=32, lr=sft_lr))
    history, seconds = sft(model, tokenizer, params, set(), progress=False)
    print(f"model: Qwen3 {shape}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; SFT "
          f"{sft_steps} steps in {seconds:.0f} s, loss {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f}", flush=True)
    save_model(model.to(torch.bfloat16), tokenizer, path)


def bvpo(project: Path, *args: str):
    import subprocess

    return subprocess.run([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), *args],
                          capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--prompts", type=int, default=48, help="training + held-out arithmetic prompts")
    parser.add_argument("--new-tokens", type=int, default=256, help="sample and evaluate budget (recipe: 4,096)")
    parser.add_argument("--steps", type=int, default=10, help="training steps (recipe: 200)")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (checks the script only)")
    args = parser.parse_args()

    import tempfile

    import torch

    from gpu_check import Checks
    from micro_params import make_project

    check = Checks("gpu_recipe", args.allow_cpu)
    if not check.available:
        return 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project", dvc=False)  # the stages run here, not under dvc repro
        build_model(Path(tmp) / "model", args.shape, args.sft_steps, args.sft_lr, device)
        rows = [{"prompt": f"Compute {10 + i}+{20 + (7 * i) % 60}.", "answer": str(30 + i + (7 * i) % 60)}
                for i in range(args.prompts)]
        (project / "data/inputs/prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        math500 = (project / "data/benchmarks/math500.jsonl").read_text().splitlines()
        (project / "data/benchmarks/math500_slice.jsonl").write_text("\n".join(math500[:16]) + "\n")
        result = bvpo(project, "init", "--model", str(Path(tmp) / "model"), "--recipe", "qwen3-0.6b",
                      "--prompts", "data/inputs/prompts.jsonl", "--force")
        check("bvpo init --recipe qwen3-0.6b", result.returncode == 0, result.stderr.strip()[-300:])
        raw = yaml.safe_load((project / "params.yaml").read_text())
        # Only the run's length changes; every other value is the recipe's.
        raw["model"].update(max_length=1024 + args.new_tokens, max_length_nothink=None)
        raw["sample"].update(max_new_tokens=args.new_tokens)
        raw["train"].update(steps=args.steps, warmup_steps=1, checkpoint_every=0)
        raw["evaluate"].update(max_new_tokens=args.new_tokens, benchmarks={"math500": "data/benchmarks/math500_slice.jsonl"})
        (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        result = bvpo(project, "check")
        check("bvpo check", result.returncode == 0, (result.stdout + result.stderr).strip().splitlines()[-2]
              if result.returncode == 0 else result.stderr.strip()[-300:])
        for stage in ("prepare", "warmup", "policy", "sample", "pairs", "train", "evaluate", "analyze"):
            start = time.perf_counter()
            result = bvpo(project, "stage", stage)
            check(f"stage {stage}", result.returncode == 0, f"{time.perf_counter() - start:.0f} s" if result.returncode == 0
                  else (result.stdout + result.stderr).strip()[-3000:])
            if result.returncode:
                return check.exit_code()
        stats = json.loads((project / "data/pairs/stats.json").read_text())
        print(f"  samples: valid {1 - stats['think/invalid_rate']:.2f} (thinking) / "
              f"{1 - stats['nothink/invalid_rate']:.2f} (no thinking); pairs {stats['think/n_pairs']} / "
              f"{stats['nothink/n_pairs']}", flush=True)
        for method in raw["train"]["methods"]:
            trained = check.trained_method(project / "data/models" / method, method, raw["train"]["batch_size"], 1e-2)
            print(f"  {method}: {trained['pairs_per_s']:.1f} pairs/s, peak "
                  f"{trained['summary'].get('peak_gpu_memory_gib', float('nan')):.1f} GiB", flush=True)
        results = json.loads((project / "metrics/eval.json").read_text())
        for name, entry in results.items():
            print(f"  {name}: accuracy {entry['accuracy_think']:.2f} / {entry['accuracy_nothink']:.2f}, MATH-500 slice "
                  f"{entry['math500/accuracy_think']:.2f} / {entry['math500/accuracy_nothink']:.2f}", flush=True)
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
