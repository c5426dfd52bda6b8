"""GPU check of the trainer: the micro pipeline on CUDA in bf16, trained with 1-process DDP and
with 1-process FSDP2 (configs/fsdp.yaml), each checked and timed.

    bash benchmarks/gpu_check.sh            # on a machine with CUDA; ~5 minutes, unattended

Checks per variant: the train stage exits 0; at step 0 the policy/reference log-ratio is ~0
(the reference is scored under the same bf16 autocast); losses and final weights are finite;
`auto` α stays in [0, 1]. Then the gradient under `train.gradient_checkpointing`, and under
`train.compile`, against the plain one on this device. Prints PASS/FAIL per check and pairs/s; exits non-zero on any FAIL.
`--allow-cpu` runs the same on a CPU (DDP passes; FSDP is refused with a clear error, since
accelerate enables FSDP only on GPU-class devices) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {"ddp": None, "fsdp": str(ROOT / "configs" / "fsdp.yaml")}


class Checks:
    """PASS/FAIL lines and a count of the failures (shared with gpu_scale.py)."""

    def __init__(self, name: str, allow_cpu: bool):
        import torch

        self.name, self.failures = name, 0
        self.available = torch.cuda.is_available() or allow_cpu
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        print(f"{name} on {device}, torch {torch.__version__}" if self.available
              else f"{name}: SKIP, no CUDA device here", flush=True)

    def __call__(self, what: str, ok: bool, detail: str = "") -> None:
        self.failures += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}", flush=True)

    def trained_method(self, model_dir: Path, method: str, batch_size: int, logratio_limit: float) -> dict:
        """The checks every trained method must pass; returns its history rows, summary and pairs/s."""
        rows = json.loads((model_dir / "history.json").read_text())["history"]
        # Wall time and peak memory: the run's facts, kept outside the model (data/cache/run_facts).
        project = model_dir.parents[2]
        summary = json.loads((project / "data" / "cache" / "run_facts" / f"train-{method}.json").read_text())
        trace, empty = rows[0].get("think/abs_logratio", 0.0), rows[0].get("nothink/abs_logratio", 0.0)  # α 0 / 1: one
        self(f"{method}: step-0 log-ratio ~ 0 under bf16", trace < logratio_limit and empty < logratio_limit,
             f"{trace:.2e} / {empty:.2e}")
        self(f"{method}: finite losses", all(math.isfinite(r["loss"]) for r in rows))
        self(f"{method}: alpha in [0, 1]", all(0 <= r["alpha"] <= 1 for r in rows), f"final alpha {rows[-1]['alpha']:.3f}")
        per_step = [batch_size * ((r["alpha"] > 0) + (r["alpha"] < 1)) for r in rows]
        after_first = summary.get("seconds_after_first_step")
        return {"rows": rows, "summary": summary, "pairs_per_s": sum(per_step) / summary["seconds_this_run"],
                # without the first step (allocation; the compile under train.compile)
                "steady_pairs_per_s": sum(per_step[1:]) / after_first if after_first else None}

    def exit_code(self) -> int:
        print(f"{self.name}: {'PASS' if self.failures == 0 else f'{self.failures} FAIL'}")
        return 1 if self.failures else 0


def bvpo(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), *args],
                          capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (checks the script only)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import torch

    from micro_params import write_micro_params

    check = Checks("gpu_check", args.allow_cpu)
    if not check.available:
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        train = {"steps": args.steps, "batch_size": 16, "micro_batch_size": 8, "warmup_steps": 2, "lr": 1e-3,
                 "alpha_every": 10, "alpha_draws": 2, "alpha_draw_size": 4, "checkpoint_every": 20,
                 "mixed_precision": "bf16",
                 "methods": {"bvpo": {"alpha": 0.5}, "bvpo_auto": {"alpha": "auto"}}}
        params = write_micro_params(project / "params.yaml", {"train": train, "warmup": {"steps": 200}})
        for stage in ("prepare", "warmup", "policy", "sample", "pairs"):
            result = bvpo(project, "stage", stage, "--params", str(params))
            check(f"stage {stage}", result.returncode == 0, result.stderr.strip().splitlines()[-1]
                  if result.returncode else "")
            if result.returncode:
                return 1
        for variant, config in VARIANTS.items():
            print(f"{variant}:", flush=True)
            variant_params = write_micro_params(project / f"params-{variant}.yaml", {
                "train": {**train, "accelerate_config": config}, "warmup": {"steps": 200}})
            start = time.perf_counter()
            result = bvpo(project, "stage", "train", "--params", str(variant_params), "--fresh")
            seconds = time.perf_counter() - start
            if result.returncode != 0:
                lines = (result.stdout + result.stderr).splitlines()
                reason = [line for line in lines if line.startswith("bvpo train: error:")] or lines[-1:] or ["?"]
                check("train stage", False, reason[0])
                continue
            check("train stage", True, f"{seconds:.0f} s for 2 methods x {args.steps} steps (process start included)")
            for method in train["methods"]:
                model_dir = project / "data" / "models" / method
                trained = check.trained_method(model_dir, method, train["batch_size"], 1e-3)
                rows = trained["rows"]
                print(f"        {method}: {trained['pairs_per_s']:.0f} pairs/s "
                      f"(loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f})", flush=True)
                from safetensors.torch import load_file

                weights = load_file(model_dir / "model.safetensors")
                check(f"{method}: finite saved weights", all(bool(torch.isfinite(w).all()) for w in weights.values()))
        result = bvpo(project, "stage", "evaluate", "--params", str(params))
        check("stage evaluate", result.returncode == 0)
        from bvpo.modeling import compile_decoder_layers
        from bvpo.train import enable_gradient_checkpointing

        base, pairs = project / "data" / "base_model", project / "data" / "pairs" / "think"
        # Recomputation replays the same kernels (bit for bit on a CPU; GPU attention backward
        # kernels may sum in another order). Compiled kernels round bf16 intermediates elsewhere
        # (on a CPU a 13% relative difference, the size of bf16's own from fp32), so fp32 there.
        same_gradient(check, base, pairs, "gradient checkpointing", enable_gradient_checkpointing, 1e-3)
        same_gradient(check, base, pairs, "train.compile",
                      lambda policy: compile_decoder_layers(policy, next(policy.parameters()).device.type), 1e-3,
                      bf16=False)
    return check.exit_code()


def same_gradient(check: Checks, base: Path, pairs: Path, what: str, change, bound: float, bf16: bool = True,
                  n_pairs: int = 8) -> None:
    """One micro-batch's gradient on this device (under bf16 autocast, or fp32) with and without
    `change` (a function of the policy), within a relative `bound`, and whether it was bit for bit."""
    import copy

    import torch
    from datasets import load_from_disk

    from bvpo.modeling import load_model, load_tokenizer
    from bvpo.sequences import encode, score_pairs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = load_tokenizer(base), load_model(base, "fp32", device)
    dataset = load_from_disk(str(pairs))
    rows = dataset.select(range(min(n_pairs, len(dataset))))  # a micro pipeline may pair fewer
    chosen = [encode(tokenizer, r["prompt"], r["chosen"], True) for r in rows]
    rejected = [encode(tokenizer, r["prompt"], r["rejected"], True) for r in rows]
    grads = []
    for changed in (False, True):
        policy = copy.deepcopy(model)
        if changed:
            change(policy)
        policy.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logps, counts = score_pairs(policy, chosen, rejected, tokenizer.pad_token_id)
        (-(logps / counts).mean()).backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in policy.parameters()]))
    plain, changed = grads
    relative = ((changed - plain).norm() / plain.norm()).item()
    check(f"{what}: the same gradient", relative < bound,
          f"relative difference {relative:.1e}{' (bit for bit)' if torch.equal(plain, changed) else ''}")


if __name__ == "__main__":
    sys.exit(main())
