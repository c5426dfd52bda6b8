"""Training throughput of the BVPO recipe: fixed vs `auto` α, telemetry off vs on, precomputed vs
live reference, padded micro-batches vs packed rows, gradient checkpointing.

    python benchmarks/train_throughput.py [--steps 30] [--project-dir .] [--only CONFIG ...]

Uses the project's data/pairs and data/base_model when a pipeline run left them (the embedded
default after `make run`); otherwise builds pairs from the synthetic task and a fresh
embedded-size model. Each configuration runs in its own process (so peak memory is its own)
and prints pairs/s, tokens/s and peak memory; every configuration's time is reported as
overhead over fixed α with telemetry off (same reference kind).
Timings exclude the reference pre-pass and model loading.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "fixed α=0.5, precomputed ref": {"alpha": 0.5, "reference": "precomputed", "telemetry": False},
    "fixed α=0.5, telemetry on": {"alpha": 0.5, "reference": "precomputed", "telemetry": True},
    "auto α, precomputed ref": {"alpha": "auto", "reference": "precomputed", "telemetry": False},
    "auto α, telemetry on": {"alpha": "auto", "reference": "precomputed", "telemetry": True},
    "fixed α=0.5, live ref": {"alpha": 0.5, "reference": "live", "telemetry": False},
    "auto α, live ref": {"alpha": "auto", "reference": "live", "telemetry": False},
    # Padding-free packed rows (train.max_tokens_per_micro_batch) instead of micro-batches of
    # train.micro_batch_size pairs: under SDPA's dense mask on a CPU.
    "fixed α=0.5, packed rows ≤256": {"alpha": 0.5, "reference": "precomputed", "telemetry": False, "max_tokens": 256},
    "fixed α=0.5, packed rows ≤1024": {"alpha": 0.5, "reference": "precomputed", "telemetry": False,
                                        "max_tokens": 1024},
    # Activations recomputed in the backward (train.gradient_checkpointing): what the memory costs in time.
    "fixed α=0.5, gradient checkpointing": {"alpha": 0.5, "reference": "precomputed", "telemetry": False,
                                            "gradient_checkpointing": True},
    # Decoder layers compiled (train.compile): the first step pays the compile; see the column
    # after the first step for the rate a long run trains at.
    "fixed α=0.5, compiled layers": {"alpha": 0.5, "reference": "precomputed", "telemetry": False, "compile": True},
}


def synthetic_inputs(root: Path, params) -> tuple[Path, Path]:
    """Pairs from the task's own traces (chosen: right answer; rejected: off by a little)."""
    from datasets import Dataset

    from bvpo.chat import build_tokenizer, completion_text
    from bvpo.data import make_trace, warmup_examples
    from bvpo.modeling import build_tiny_model, save_model

    tokenizer = build_tokenizer()
    m = params.model
    model = build_tiny_model(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                             m.max_length, params.seed)
    save_model(model, tokenizer, root / "base")
    rng = random.Random(0)
    for mode, thinking in (("think", True), ("nothink", False)):
        rows = []
        for i, (prompt, answer, chain) in enumerate(warmup_examples(1024, set(), 2, 3, params.seed)):
            wrong = str(int(answer) + rng.choice([-10, -1, 1, 10]))
            trace = make_trace(rng, chain) if thinking else None
            rows.append({"prompt_id": i, "prompt": prompt, "chosen": completion_text(trace, answer, tokenizer.eos_token),
                         "rejected": completion_text(make_trace(rng, chain) if thinking else None, wrong,
                                                     tokenizer.eos_token),
                         "chosen_reward": 1.0, "rejected_reward": 0.0})
        Dataset.from_list(rows).save_to_disk(str(root / "pairs" / mode))
    return root / "pairs", root / "base"


def benchmark_inputs(root: Path, params, tmp: Path) -> tuple[Path, Path, str]:
    """(pairs dir, base model dir, description): the project's own after a pipeline run,
    else synthetic pairs and an untrained embedded-size model written under `tmp`."""
    pairs, base = root / "data" / "pairs", root / "data" / "base_model"
    if (pairs / "think").is_dir() and base.is_dir():
        return pairs, base, "project data/pairs + data/base_model"
    pairs, base = synthetic_inputs(tmp, params)
    return pairs, base, "synthetic pairs + untrained embedded-size model"


def run_one(args) -> None:
    """One configuration, in this process: setup, then `steps` timed optimizer steps."""
    import torch
    from accelerate import Accelerator

    from bvpo.config import load_params
    from bvpo.modeling import load_tokenizer
    from bvpo.reference import load_reference_model, reference_logps
    from bvpo.train import (RUN_FACTS, PairLoss, PairSet, encode_pairs, load_pair_rows,
                            train_method)

    config = CONFIGS[args.config]
    params = load_params(args.params)
    params.train.steps = args.steps
    params.train.checkpoint_every = 0
    params.train.reference = config["reference"]
    params.train.telemetry = config["telemetry"]
    params.train.max_tokens_per_micro_batch = config.get("max_tokens")
    params.train.gradient_checkpointing = config.get("gradient_checkpointing", False)
    params.train.compile = config.get("compile", False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(args.base)
    rows = load_pair_rows(Path(args.pairs))
    reference = load_reference_model(args.base, accelerator)
    data = {}
    for mode in ("think", "nothink"):
        chosen, rejected, _ = encode_pairs(tokenizer, rows[mode], mode == "think", params.model.max_length)
        if config["reference"] == "live":
            data[mode] = PairSet(chosen, rejected, None, None)
        else:
            data[mode] = PairSet(chosen, rejected, *reference_logps(reference, chosen, rejected, tokenizer.pad_token_id,
                                                                    autocast=accelerator.autocast,
                                                                    max_tokens=config.get("max_tokens")))
    if config["reference"] != "live":
        reference = None  # precomputed: no second model in memory while training, as in the trainer
    pair_loss = PairLoss(params, data, tokenizer.pad_token_id, reference)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        history = train_method("bench", config["alpha"], params, args.base, pair_loss, tokenizer, Path(work), "bench")
        seconds = time.perf_counter() - start
        facts = json.loads((Path(work) / "bench" / RUN_FACTS).read_text())
    per_step = [params.train.batch_size * ((r["alpha"] > 0) + (r["alpha"] < 1)) for r in history]
    pairs = sum(per_step)
    tokens = sum(params.train.batch_size * r.get(f"{p}/tokens_per_pair", 0.0) for r in history for p in ("think", "nothink"))
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": args.config, "seconds": seconds, "pairs_per_s": pairs / seconds,
                      "steady_pairs_per_s": sum(per_step[1:]) / facts["seconds_after_first_step"]
                      if "seconds_after_first_step" in facts else float("nan"),
                      "tokens_per_s": tokens / seconds, "peak_mb": peak_mb, "steps": len(history)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), metavar="CONFIG",
                        help="run these configurations only (the fixed-α baseline of each is added)")
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from bvpo.runtime import configure_environment

    configure_environment(args.project_dir)
    if args.config:
        run_one(args)
        return 0

    from bvpo.config import load_params
    from bvpo.modeling import pick_device, resolve_precision

    root = Path(args.project_dir).resolve()
    params_file = root / "params.yaml"
    params = load_params(params_file)
    # The precision the train stage would run here (`train.mixed_precision`, auto resolved).
    precision = resolve_precision(params.train.mixed_precision, pick_device())
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "no" if precision == "fp32" else precision}
    with tempfile.TemporaryDirectory() as tmp:
        pairs, base, source = benchmark_inputs(root, params, Path(tmp))
        print(f"BVPO training throughput: {args.steps} steps, batch {params.train.batch_size} pairs per mode, "
              f"{source}, {precision}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        results = []
        chosen = list(CONFIGS) if not args.only else \
            [n for n in CONFIGS if n in args.only or n in ("fixed α=0.5, precomputed ref", "fixed α=0.5, live ref")
             and any(("live" in o) == ("live" in n) for o in args.only)]
        for name in chosen:
            out = subprocess.run([sys.executable, __file__, "--config", name, "--params", str(params_file),
                                  "--pairs", str(pairs), "--base", str(base), "--steps", str(args.steps),
                                  "--project-dir", str(root)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by_name = {r["config"]: r for r in results}
    print(f"\n{'configuration':<38} {'pairs/s':>9} {'after step 1':>13} {'tokens/s':>10} {'peak MB':>9} "
          f"{'overhead':>9}")
    print('(pairs: both modes; after step 1: pairs/s without the first step, which pays allocation and any '
          'compile; tokens: scored completion tokens, chosen + rejected; overhead: time vs fixed α)')
    for r in results:
        ref = by_name["fixed α=0.5, live ref" if "live" in r["config"] else "fixed α=0.5, precomputed ref"]
        overhead = 100 * (r["seconds"] / ref["seconds"] - 1)
        print(f"{r['config']:<38} {r['pairs_per_s']:>9.1f} {r['steady_pairs_per_s']:>13.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['peak_mb']:>9.0f} {overhead:>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
