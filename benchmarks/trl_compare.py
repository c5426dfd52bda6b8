"""The BVPO trainer against Hugging Face TRL's `DPOTrainer` on the same work, side by side.

    make bench-trl            # installs the `bench` extra (trl==1.16.0), then runs this
    python benchmarks/trl_compare.py [--project-dir .] [--steps 30] [--rounds 3] [--emulated-bf16]
    python benchmarks/trl_compare.py --qwen3-shape [--steps 20] [--rounds 1]   # on a GPU

Same model (the project's data/base_model), same trace pairs (data/pairs/think), same batch,
β, NLL weight, learning rate, schedule, clipping, threads; α = 1, so the BVPO trainer does what
a plain DPO + NLL trainer does; reference log-probs precomputed by both (not timed); telemetry
off. TRL runs in two shapes: the whole batch in one forward (`trl`) and the project's
micro-batch with gradient accumulation (`trl_micro`, per-device batch `train.micro_batch_size`),
so the project's micro-batching is not counted as its own win; the ratio is against the faster
TRL shape of each round. Then both again under bf16 autocast (`bvpo_bf16`: the project's bf16
path, attention kept in fp32 on a CPU; `trl_bf16`: TRL's `bf16=True`, whole batch), which is
what `mixed_precision: auto` picks on a CPU with native bf16 (on a CPU without it the bf16 rows are
skipped: emulated bf16 ran 16× slower than fp32; `--emulated-bf16` runs them anyway). On a CPU
the utilisation column is against the fp32 matmul rate. The trainers alternate over `rounds` (the order flips every round, so
drift of the machine hits all), each in a fresh process. Without a pipeline run it falls back to synthetic
pairs and an untrained embedded-size model.

Reported per trainer: pairs/s and tokens/s over the steps after the first (the first pays for
allocation), peak RSS (on a GPU: peak allocated GPU memory while training), and achieved FLOP/s
as a share of the machine's dense fp32 matmul rate, measured here in the same invocation (on a
GPU: of its dense bf16 peak). FLOPs per pair are what each trainer usefully runs,
forward + backward (3× forward), padding excluded: 6 × (matmul parameters) × (tokens
forwarded: the BVPO trainer runs each prompt once per pair, TRL twice) + 12 × layers ×
(heads × head size) × (causal attention context summed over those tokens: QKᵀ and ·V). The
attention kernels compute masked blocks too; those are not counted. tokens/s counts chosen +
rejected sequences whole for both, so it compares work done, not tokens run.

On a GPU (CUDA available) only the bf16 rows run (fp32 training is not what a GPU run uses):
BVPO with padded micro-batches (`bvpo_bf16`) and, under `--qwen3-shape`, with packed rows under
FlexAttention (`bvpo_bf16_packed`, rows of ≤ 16,384 tokens: the GPU configuration of
docs/scaling.md), against TRL in both shapes (`trl_bf16` whole batch, `trl_bf16_micro`
micro-batched); a trainer that fails (out of memory, say) is reported, not retried in later
rounds, and the others still run; the exit code is 0 when BVPO and at least one TRL shape ran.
`--qwen3-shape` (GPU only) compares on `gpu_scale.py`'s work instead of the project's: a
Qwen3-0.6B-shaped random model (152k vocabulary) and 48 trace pairs of ~2k tokens, batch 8,
micro-batch 2, max length 8,192 (issue 22's "≥ 1.5× TRL" is measured there). Use 20 steps or
more there: step times are synchronised with the GPU, and short runs let one-off costs weigh.
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


def pair_flops(model, chosen, rejected, shared_prompt: bool) -> float:
    """Useful forward + backward FLOPs per pair (see the module docstring)."""
    config = model.config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_size
    n_matmul = matmul_parameters(model)
    tokens = context = 0
    for c, r in zip(chosen, rejected):
        a, b = len(c.input_ids), len(r.input_ids)
        if shared_prompt:  # [prompt, chosen, rejected tail]: the tail sees the prompt and itself
            prefix, tail = r.completion_start, b - r.completion_start
            tokens += a + tail
            context += a * (a + 1) // 2 + tail * prefix + tail * (tail + 1) // 2
        else:
            tokens += a + b
            context += a * (a + 1) // 2 + b * (b + 1) // 2
    return (6 * n_matmul * tokens + 12 * config.num_hidden_layers * attention_width * context) / len(chosen)


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
        import torch

        if torch.cuda.is_available():  # the step's kernels done, not merely queued
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def flush(self) -> None:
        pass

    def rate(self, batch_size: int) -> tuple[float, float]:
        """(pairs/s, seconds) over the steps after the first."""
        seconds = self.ends[-1] - self.ends[0]
        return batch_size * (len(self.ends) - 1) / seconds, seconds


def meta_model(base: Path):
    """The model's shape on the meta device: FLOP counting without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))


def run_bvpo(args, params) -> StepClock:
    import torch
    from accelerate import Accelerator

    from bvpo.reference import load_reference_model, reference_logps
    from bvpo.train import PairLoss, PairSet, train_method

    t = params.train
    tokenizer, _, chosen, rejected = encoded_think_pairs(params, Path(args.base), Path(args.pairs))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    reference = load_reference_model(args.base, accelerator, t.attention)
    # Scored in the layout the policy trains in (packed or padded); long rows on a GPU: the
    # reference pass batched like the training forward.
    logps = reference_logps(reference, chosen, rejected, tokenizer.pad_token_id,
                            batch_size=t.micro_batch_size if torch.cuda.is_available() else 32,
                            autocast=accelerator.autocast, max_tokens=t.max_tokens_per_micro_batch)
    data = {"think": PairSet(chosen, rejected, *logps), "nothink": PairSet([], [], torch.empty(0), torch.empty(0))}
    del reference
    clock = StepClock()
    with tempfile.TemporaryDirectory() as work:
        train_method("bench", 1.0, params, args.base, PairLoss(params, data, tokenizer.pad_token_id), tokenizer,
                     Path(work), "bench", logger=clock)
    return clock


def run_trl(args, params) -> StepClock:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bvpo.chat import render_prompt
    from bvpo.modeling import load_model

    t = params.train
    tokenizer, rows, _, _ = encoded_think_pairs(params, Path(args.base), Path(args.pairs))
    dataset = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"], True), "chosen": r["chosen"],
                                  "rejected": r["rejected"]} for r in rows])
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            # The peak of training, as the BVPO trainer reports it (not the reference precompute).
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *_, **__):
            clock.log({})

    import torch

    gpu = torch.cuda.is_available()
    micro = t.micro_batch_size if args.trainer.endswith("_micro") else t.batch_size
    with tempfile.TemporaryDirectory() as work:
        config = DPOConfig(
            output_dir=work, per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // micro,
            max_steps=t.steps, learning_rate=t.lr,
            lr_scheduler_type="cosine", warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, beta=t.beta, loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, t.nll_weight], precompute_ref_log_probs=True,
            # Long rows on a GPU: the reference pass batched like the training forward.
            precompute_ref_batch_size=t.micro_batch_size if gpu else 64,
            max_length=params.model.max_length, report_to=[], save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, use_cpu=not gpu, dataloader_num_workers=0, seed=params.train_seed,
            bf16=args.trainer.startswith("trl_bf16"),
            # TRL's DPOConfig turns gradient checkpointing on by default, which recomputes every
            # forward: off, TRL runs at its fastest, and that is what the ratio is against.
            gradient_checkpointing=False,
        )
        trainer = DPOTrainer(model=load_model(args.base, "fp32"), args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    return clock


def run_one(args) -> None:
    import torch

    from bvpo.config import load_params

    params = load_params(args.params)
    params.train.steps = args.steps
    params.train.checkpoint_every = 0
    params.train.telemetry = False
    params.train.reference = "precomputed"
    if args.trainer == "bvpo_bf16_packed":
        from gpu_scale import PACKED

        for key, value in PACKED.items():
            setattr(params.train, key, value)
    clock = (run_bvpo if args.trainer.startswith("bvpo") else run_trl)(args, params)
    pairs_per_s, seconds = clock.rate(params.train.batch_size)
    _, _, chosen, rejected = encoded_think_pairs(params, Path(args.base), Path(args.pairs))
    tokens_per_pair = sum(len(e.input_ids) for e in chosen + rejected) / len(chosen)
    # What the trainer actually runs: with prefix sharing the prompt once per pair.
    flops = pair_flops(meta_model(Path(args.base)), chosen, rejected,
                       args.trainer.startswith("bvpo") and params.train.shared_prompt)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"trainer": args.trainer, "pairs_per_s": pairs_per_s, "seconds": seconds,
                      "tokens_per_s": pairs_per_s * tokens_per_pair,
                      "flops_per_s": flops * pairs_per_s, "peak_mb": peak_mb,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="run the bf16 rows on a CPU without native bf16 (emulated: very slow)")
    parser.add_argument("--qwen3-shape", action="store_true",
                        help="gpu_scale.py's Qwen3-0.6B-shaped model and ~2k-token trace pairs (GPU only)")
    parser.add_argument("--trainer-timeout", type=float, default=1800,
                        help="seconds one trainer's process may run before it counts as failed")
    parser.add_argument("--trainers", default=None,
                        help="comma-separated subset of the rows, in this order (default: every row for the device)")
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
    from bvpo.modeling import native_bf16

    root = Path(args.project_dir).resolve()
    params_file = root / "params.yaml"
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import benchmark_inputs

    gpu = torch.cuda.is_available()  # no CUDA context in this process: the trainers' processes get the memory
    if args.qwen3_shape and not gpu:
        print("--qwen3-shape needs a GPU: on a CPU its fp32 rows on a 0.6B model with 4k-token pairs take hours",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.qwen3_shape:
            from gpu_scale import QWEN3_MODEL, QWEN3_TRAIN, build_project  # puts tests/ on the path
            from micro_params import write_micro_params

            build_project(Path(tmp), argparse.Namespace(pairs=48, trace_tokens=2000, answer_tokens=200))
            pairs, base = Path(tmp) / "data" / "pairs", Path(tmp) / "data" / "policy"
            params_file = write_micro_params(Path(tmp) / "params.yaml", {"model": QWEN3_MODEL, "train": QWEN3_TRAIN})
            source = "Qwen3-0.6B-shaped random model, 48 trace pairs of ~2k tokens (gpu_scale.py)"
        else:
            pairs, base, source = benchmark_inputs(root, load_params(params_file), Path(tmp))
        params = load_params(params_file)
        if gpu:
            peak = float("nan")  # from the device name the first trainer reports
            peak_text = "GPU: bf16 rows"
            # fp32 training is not what a GPU run uses; TRL in both of its shapes.
            trainers = ("bvpo_bf16", "bvpo_bf16_packed", "trl_bf16", "trl_bf16_micro") if args.qwen3_shape else \
                ("bvpo_bf16", "trl_bf16", "trl_bf16_micro")
        else:
            peak = matmul_rate()
            peak_text = f"{torch.get_num_threads()} threads; dense fp32 matmul {peak / 1e9:.1f} GFLOP/s"
            trainers = ("bvpo", "trl", "trl_micro", "bvpo_bf16", "trl_bf16")
            if not native_bf16(torch.device("cpu")) and not args.emulated_bf16:
                # Emulated bf16 ran 16x slower than fp32 on an AVX2-only CPU: rows nobody would train with.
                print("no native bf16 on this CPU (AVX512-BF16/AMX): the bf16 rows are skipped "
                      "(--emulated-bf16 runs them)")
                trainers = trainers[:3]
        if args.trainers:
            asked = args.trainers.split(",")
            unknown = [t for t in asked if t not in trainers]
            if unknown:
                print(f"--trainers: {', '.join(unknown)} not among this device's rows ({', '.join(trainers)})",
                      file=sys.stderr)
                return 2
            trainers = tuple(asked)
        print(f"{source}; {args.steps} steps x batch {params.train.batch_size}, alpha = 1, precomputed reference; "
              f"torch {torch.__version__}, trl {trl.__version__}; {peak_text}")
        results: dict[str, list[dict]] = {name: [] for name in trainers}
        failed: dict[str, str] = {}
        for r in range(args.rounds):
            for trainer in (trainers if r % 2 == 0 else trainers[::-1]):
                if trainer in failed:  # not retried: a row that ran out of memory would again
                    continue
                # The BVPO trainer's Accelerator reads its precision from accelerate's variable.
                precision = "bf16" if trainer.startswith("bvpo_bf16") else "no"
                try:
                    out = subprocess.run(
                        [sys.executable, __file__, "--trainer", trainer, "--params", str(params_file),
                         "--pairs", str(pairs), "--base", str(base), "--steps", str(args.steps),
                         "--project-dir", str(root)], capture_output=True, text=True, timeout=args.trainer_timeout,
                        env={**os.environ, "TQDM_DISABLE": "1", "ACCELERATE_MIXED_PRECISION": precision})
                except subprocess.TimeoutExpired:
                    out = subprocess.CompletedProcess([], 1, "", f"TimeoutError: over {args.trainer_timeout:.0f} s")
                if out.returncode != 0:  # reported, and the other trainers still run (a GPU may run out of memory)
                    lines = out.stderr.strip().splitlines() or ["?"]
                    failed[trainer] = next((x for x in reversed(lines) if "Error" in x), lines[-1])[:300]
                    print(f"  round {r + 1} {trainer:16s} FAILED: {failed[trainer]}", flush=True)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[trainer].append({**row, "round": r})
                print(f"  round {r + 1} {trainer:16s} {row['pairs_per_s']:7.1f} pairs/s", flush=True)
        if gpu:
            from gpu_scale import bf16_peak

            device = next((row["device"] for rows in results.values() for row in rows), "?")
            peak = bf16_peak(device) or float("nan")
            print(f"{device}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s")

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):8.1f} ({min(values):.1f}–{max(values):.1f})"

    memory = "GPU MiB, training" if gpu else "peak RSS MB"
    print(f"\n{'trainer':16s} {'pairs/s median (min–max)':>28s} {'tokens/s':>10s} {memory:>18s} "
          f"{'of ' + ('bf16' if gpu else 'matmul') + ' peak':>15s}")
    for trainer, rows in results.items():
        if not rows:
            print(f"{trainer:16s} failed: {failed.get(trainer, '?')}")
            continue
        print(f"{trainer:16s} {spread([r['pairs_per_s'] for r in rows]):>28s} "
              f"{statistics.median(r['tokens_per_s'] for r in rows):10.0f} "
              f"{max(r['peak_mb'] for r in rows):18.0f} "
              f"{100 * statistics.median(r['flops_per_s'] for r in rows) / peak:14.1f}%"
              f"{'  (failed in a later round: ' + failed[trainer] + ')' if trainer in failed else ''}")
    # Against the faster of TRL's shapes in the same round (a shape that failed does not count).
    compared = False
    for label, ours, theirs in (("fp32", "bvpo", ("trl", "trl_micro")),
                                ("bf16", "bvpo_bf16", ("trl_bf16", "trl_bf16_micro")),
                                ("bf16, packed rows", "bvpo_bf16_packed", ("trl_bf16", "trl_bf16_micro"))):
        ran = [t for t in theirs if results.get(t)]
        if not results.get(ours) or not ran:
            continue
        rounds = [(row, [x["pairs_per_s"] for t in ran for x in results[t] if x["round"] == row["round"]])
                  for row in results[ours]]
        ratios = [row["pairs_per_s"] / max(trl) for row, trl in rounds if trl]
        if ratios:
            compared = True
            print(f"BVPO ({ours}) / best of {' and '.join(ran)}, {label}, per round: "
                  f"{', '.join(f'{x:.2f}x' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
    return 0 if compared else 1


if __name__ == "__main__":
    sys.exit(main())
