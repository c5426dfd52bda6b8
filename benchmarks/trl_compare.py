"""The BVPO trainer against Hugging Face TRL's `DPOTrainer` on the same work, side by side.

    make bench-trl            # installs the `bench` extra (trl==1.16.0), then runs this
    python benchmarks/trl_compare.py [--project-dir .] [--steps 30] [--rounds 3]

Same model (the project's data/base_model), same trace pairs (data/pairs/think), same batch,
β, NLL weight, learning rate, schedule, clipping, threads; α = 1, so the BVPO trainer does what
a plain DPO + NLL trainer does; reference log-probs precomputed by both (not timed); telemetry
off. The two trainers alternate over `rounds` (the order flips every round, so drift of the
machine hits both), each in a fresh process. Without a pipeline run it falls back to synthetic
pairs and an untrained embedded-size model.

Reported per trainer: pairs/s and tokens/s over the steps after the first (the first pays for
allocation), peak RSS, and achieved FLOP/s as a share of the machine's dense fp32 matmul rate,
measured here in the same invocation. FLOPs are counted as 6 × (matmul parameters) × (tokens
actually forwarded: the BVPO trainer runs each prompt once per pair, TRL twice), the usual
forward + backward estimate; attention scores are left out (short sequences), so the share
is a slight under-count. tokens/s counts chosen + rejected sequences whole for both, so it
compares work done, not tokens run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def matmul_rate(seconds: float = 3.0, n: int = 1024) -> float:
    """Dense fp32 matmul FLOP/s of this machine with torch's threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token (every 2-D weight but the input
    embedding; a tied output head counts once, as the head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding)
    return total + (head.numel() if head is embedding else 0)


def encoded_think_pairs(params, base: Path, pairs: Path):
    from bvpo.modeling import load_tokenizer
    from bvpo.train import encode_pairs, load_pair_rows

    tokenizer = load_tokenizer(base)
    rows = load_pair_rows(pairs)["think"]
    chosen, rejected, _ = encode_pairs(tokenizer, rows, True, params.model.max_length)
    return tokenizer, rows, chosen, rejected


class StepClock:
    """Wall-clock time of every optimizer step (its end), for both trainers."""

    def __init__(self):
        self.ends: list[float] = []

    def log(self, row: dict) -> None:  # the BVPO trainer's logger interface
        self.ends.append(time.perf_counter())

    def flush(self) -> None:
        pass

    def rate(self, batch_size: int) -> tuple[float, float]:
        """(pairs/s, seconds) over the steps after the first."""
        seconds = self.ends[-1] - self.ends[0]
        return batch_size * (len(self.ends) - 1) / seconds, seconds


def run_bvpo(args, params) -> StepClock:
    import torch
    from accelerate import Accelerator

    from bvpo.modeling import load_model
    from bvpo.train import PairSet, Recipe, reference_logps, train_method

    tokenizer, _, chosen, rejected = encoded_think_pairs(params, Path(args.base), Path(args.pairs))
    Accelerator(cpu=not torch.cuda.is_available())
    reference = load_model(args.base, params.model.dtype).eval().requires_grad_(False)
    data = {"think": PairSet(chosen, rejected, *reference_logps(reference, chosen, rejected, tokenizer.pad_token_id)),
            "nothink": PairSet([], [], torch.empty(0), torch.empty(0))}
    del reference
    clock = StepClock()
    with tempfile.TemporaryDirectory() as work:
        train_method("bench", 1.0, params, args.base, Recipe(params, data, tokenizer.pad_token_id), tokenizer,
                     Path(work), "bench", logger=clock)
    return clock


def run_trl(args, params) -> StepClock:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bvpo.modeling import load_model, render_prompt

    t = params.train
    tokenizer, rows, _, _ = encoded_think_pairs(params, Path(args.base), Path(args.pairs))
    dataset = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"], True), "chosen": r["chosen"],
                                  "rejected": r["rejected"]} for r in rows])
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.log({})

    with tempfile.TemporaryDirectory() as work:
        config = DPOConfig(
            output_dir=work, per_device_train_batch_size=t.batch_size, max_steps=t.steps, learning_rate=t.lr,
            lr_scheduler_type="cosine", warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, beta=t.beta, loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, t.nll_weight], precompute_ref_log_probs=True, precompute_ref_batch_size=64,
            max_length=params.model.max_length, report_to=[], save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=params.train_seed,
        )
        trainer = DPOTrainer(model=load_model(args.base, params.model.dtype), args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    return clock


def run_one(args) -> None:
    from bvpo.config import load_params
    from bvpo.modeling import load_model

    params = load_params(args.params)
    params.train.steps = args.steps
    params.train.checkpoint_every = 0
    params.train.telemetry = False
    params.train.reference = "precomputed"
    clock = (run_bvpo if args.trainer == "bvpo" else run_trl)(args, params)
    pairs_per_s, seconds = clock.rate(params.train.batch_size)
    _, _, chosen, rejected = encoded_think_pairs(params, Path(args.base), Path(args.pairs))
    tokens_per_pair = sum(len(e.input_ids) for e in chosen + rejected) / len(chosen)
    # What the trainer actually runs: with prefix sharing the prompt once per pair.
    forwarded = tokens_per_pair
    if args.trainer == "bvpo" and params.train.shared_prompt:
        forwarded = sum(len(c.input_ids) + len(r.input_ids) - r.completion_start
                        for c, r in zip(chosen, rejected)) / len(chosen)
    n_matmul = matmul_parameters(load_model(args.base, params.model.dtype))
    print(json.dumps({"trainer": args.trainer, "pairs_per_s": pairs_per_s, "seconds": seconds,
                      "tokens_per_s": pairs_per_s * tokens_per_pair,
                      "flops_per_s": 6 * n_matmul * forwarded * pairs_per_s,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    for hidden in ("--trainer", "--params", "--pairs", "--base"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from bvpo.runtime import configure_environment

    configure_environment(args.project_dir)
    if args.trainer:
        run_one(args)
        return 0
    try:
        import trl
    except ImportError:
        print("TRL is not installed: `make bench-trl` installs the bench extra (trl==1.16.0)", file=sys.stderr)
        return 1

    import torch

    from bvpo.config import load_params

    root = Path(args.project_dir).resolve()
    params_file = root / "params.yaml"
    params = load_params(params_file)
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import benchmark_inputs

    with tempfile.TemporaryDirectory() as tmp:
        pairs, base, source = benchmark_inputs(root, params, Path(tmp))
        peak = matmul_rate()
        print(f"{source}; {args.steps} steps x batch {params.train.batch_size}, alpha = 1, precomputed reference; "
              f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads; "
              f"dense fp32 matmul {peak / 1e9:.1f} GFLOP/s")
        results: dict[str, list[dict]] = {"bvpo": [], "trl": []}
        for r in range(args.rounds):
            for trainer in (("bvpo", "trl") if r % 2 == 0 else ("trl", "bvpo")):
                out = subprocess.run([sys.executable, __file__, "--trainer", trainer, "--params", str(params_file),
                                      "--pairs", str(pairs), "--base", str(base), "--steps", str(args.steps),
                                      "--project-dir", str(root)], capture_output=True, text=True,
                                     env={**os.environ, "TQDM_DISABLE": "1"})
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[trainer].append(row)
                print(f"  round {r + 1} {trainer:5s} {row['pairs_per_s']:7.1f} pairs/s", flush=True)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):8.1f} ({min(values):.1f}–{max(values):.1f})"

    print(f"\n{'trainer':8s} {'pairs/s median (min–max)':>28s} {'tokens/s':>10s} {'peak MB':>8s} {'of matmul peak':>15s}")
    for trainer, rows in results.items():
        print(f"{trainer:8s} {spread([r['pairs_per_s'] for r in rows]):>28s} "
              f"{statistics.median(r['tokens_per_s'] for r in rows):10.0f} "
              f"{max(r['peak_mb'] for r in rows):8.0f} "
              f"{100 * statistics.median(r['flops_per_s'] for r in rows) / peak:14.1f}%")
    ratios = [b["pairs_per_s"] / t["pairs_per_s"] for b, t in zip(results["bvpo"], results["trl"])]
    print(f"BVPO / TRL, per round: {', '.join(f'{x:.2f}x' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
