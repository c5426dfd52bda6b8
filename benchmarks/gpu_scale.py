"""Realistic-size GPU check: a Qwen3-0.6B-shaped random model (152k vocabulary, 28 layers)
trained by the project's own train stage on pairs with ~2k-token traces, then sampled.

    python benchmarks/gpu_scale.py [--steps 6] [--trace-tokens 2000]   # on a machine with CUDA

What the small gpu_check cannot show: memory and speed where the vocabulary and the traces are
real-sized. Per variant (1-process DDP; DDP with packed rows under FlexAttention; the same with
rows twice as long under `train.gradient_checkpointing`; packed rows with `train.compile`;
1-process FSDP2 with activation checkpointing), both
`bvpo` (α = 0.5) and `bvpo_auto` train in bf16 with a precomputed reference; printed per
method: pairs/s, completion+prompt tokens/s, peak GPU memory, finite losses, step-0 log-ratio
~ 0, α in [0, 1], achieved TFLOP/s and MFU (6 × matmul parameters × tokens + attention, against the
GPU's dense bf16 peak), over the whole run and after its first step (which pays the compile).
Then Hugging Face `generate` tokens/s, one-by-one vs batched, both modes (a random model rarely
stops, so every row runs to `--new-tokens`). Exit 0 = every check passed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by the name CUDA reports; the first key in
# the name wins, so the PCIe and NVL H100s come before the SXM one.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def bf16_peak(name: str) -> float | None:
    """This GPU's dense bf16 peak from its CUDA name, or None for a GPU not in BF16_PEAK."""
    return next((value for key, value in BF16_PEAK.items() if key in name), None)

# The work both this script and trl_compare.py --qwen3-shape train on: batch, length, lr.
QWEN3_TRAIN = {"batch_size": 8, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1e-5, "max_skipped_fraction": 0.0}
QWEN3_MODEL = {"max_length": 8192}
# packed: the step's pairs in padding-free rows of up to 16k tokens (about four 2k-trace pairs
# each) under FlexAttention's block mask, instead of micro-batches of 2 padded pairs.
PACKED = {"max_tokens_per_micro_batch": 16384, "attention": "flex_attention"}

# Model shapes (a Qwen3 config's sizes), shared with gpu_recipe.py; tiny (with --allow-cpu): the
# scripts' every path on a CPU in a minute, nothing timed worth reading.
SHAPES = {
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 2048},
}


def text_of_tokens(tokenizer, rng: random.Random, n_tokens: int) -> str:
    """Trace-like text of about `n_tokens` tokens, from the embedded task's trace generator."""
    from bvpo.data import make_problem, make_trace

    parts, count = [], 0
    while count < n_tokens:
        _, chain = make_problem(rng, 2, 4, (10, 999))
        piece = make_trace(rng, chain)
        parts.append(piece)
        count += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return "\n".join(parts)


def build_project(project: Path, args, with_pairs: bool = True) -> None:
    import torch
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bvpo.data import make_problem
    from realistic_model import train_tokenizer

    tokenizer = train_tokenizer("qwen3", vocab_size=2048)
    config = Qwen3Config(**SHAPES[getattr(args, "shape", "qwen3-0.6b")], max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    print(f"model: Qwen3, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"vocabulary {config.vocab_size}", flush=True)
    model.save_pretrained(project / "data" / "policy")
    tokenizer.save_pretrained(project / "data" / "policy")
    if not with_pairs:
        return
    rng = random.Random(0)
    eos = tokenizer.eos_token
    for mode in ("think", "nothink"):
        rows = []
        for i in range(args.pairs):
            prompt, _ = make_problem(rng, 2, 4, (10, 999))
            if mode == "think":
                chosen, rejected = (f"<think>\n{text_of_tokens(tokenizer, rng, args.trace_tokens)}\n</think>\n\n"
                                    f"{rng.randint(0, 999)}{eos}" for _ in range(2))
            else:
                chosen, rejected = (f"{text_of_tokens(tokenizer, rng, args.answer_tokens)}{eos}" for _ in range(2))
            rows.append({"prompt_id": i, "prompt": prompt, "chosen": chosen, "rejected": rejected})
        Dataset.from_list(rows).save_to_disk(str(project / "data" / "pairs" / mode))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=48, help="pairs per mode")
    parser.add_argument("--trace-tokens", type=int, default=2000, help="about this many tokens per trace")
    parser.add_argument("--answer-tokens", type=int, default=200, help="about this many per no-thinking answer")
    parser.add_argument("--new-tokens", type=int, default=512, help="sampling: tokens generated per sequence")
    parser.add_argument("--variants", default="ddp,packed,packed_ckpt,packed_compile,fsdp",
                        help="comma-separated: ddp, packed, packed_ckpt, packed_compile, fsdp; empty: sampling only")
    parser.add_argument("--no-sampling", action="store_true", help="skip the generate throughput part")
    parser.add_argument("--sampling-modes", default="think,nothink", help="comma-separated: think, nothink")
    parser.add_argument("--no-one-by-one", action="store_true",
                        help="sampling: skip the one-prompt-at-a-time row (slow; docs/scaling.md has it)")
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--methods", default="bvpo,bvpo_auto", help="comma-separated: bvpo (alpha 0.5), bvpo_auto")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from bvpo.config import load_params
    from bvpo.runtime import configure_environment
    from bvpo.stages import train
    from gpu_check import Checks
    from micro_params import write_micro_params

    configure_environment()
    check = Checks("gpu_scale", args.allow_cpu)
    if not check.available:
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        start = time.perf_counter()
        variants = [v for v in args.variants.split(",") if v]
        build_project(project, args, with_pairs=bool(variants))  # sampling alone needs only the model
        built = f"model and {args.pairs} pairs per mode" if variants else "model"
        print(f"built {built} in {time.perf_counter() - start:.0f} s", flush=True)
        base_train = {**QWEN3_TRAIN, "steps": args.steps, "alpha_every": 3, "alpha_draws": 2, "alpha_draw_size": 2,
                      "checkpoint_every": 0, "telemetry": False, "mixed_precision": "bf16",
                      "methods": {name: {"alpha": {"bvpo": 0.5, "bvpo_auto": "auto"}[name]}
                                  for name in args.methods.split(",")}}
        model = QWEN3_MODEL
        configs = {"ddp": {"accelerate_config": None}, "fsdp": {"accelerate_config": str(ROOT / "configs" / "fsdp.yaml")},
                   "packed": {"accelerate_config": None, **PACKED},
                   # Activations recomputed in the backward: rows of 32k tokens (a whole step's
                   # pairs of a mode in one or two rows); MFU counts the useful FLOPs, not the recompute.
                   "packed_ckpt": {"accelerate_config": None, **PACKED, "max_tokens_per_micro_batch": 32768,
                                   "gradient_checkpointing": True},
                   # Decoder layers compiled (train.compile); the first step pays the compile,
                   # so read its rate after the first step.
                   "packed_compile": {"accelerate_config": None, **PACKED, "compile": True}}
        import torch

        if not torch.cuda.is_available():  # --allow-cpu: torch has no FlexAttention backward on a CPU
            for config in configs.values():
                if config.get("attention") == "flex_attention":
                    config["attention"] = "sdpa"
        flops = None
        for variant in variants:
            print(f"{variant}:", flush=True)
            params_file = write_micro_params(project / f"params-{variant}.yaml", {
                "model": model, "train": {**base_train, **configs[variant]}})
            if flops is None:
                flops = pair_flops_by_mode(project, load_params(params_file))
            start = time.perf_counter()
            try:
                train(load_params(params_file), project, params_file)
            except Exception as err:  # report and go on to the next variant
                check("train stage", False, str(err))
                continue
            check("train stage", True, f"{time.perf_counter() - start:.0f} s with model loading and reference")
            for method in base_train["methods"]:
                model_dir = project / "data" / "models" / method
                trained = check.trained_method(model_dir, method, base_train["batch_size"], 1e-2)
                rows, summary = trained["rows"], trained["summary"]
                tokens = sum(base_train["batch_size"] * r[f"{prefix}/tokens_per_pair"]
                             for r in rows for prefix in ("think", "nothink") if f"{prefix}/tokens_per_pair" in r)
                seconds = summary["seconds_this_run"]
                # Every step runs both estimators for these methods (α in (0, 1), and auto).
                step_flops = base_train["batch_size"] * (flops["think"] + flops["nothink"])
                achieved = len(rows) * step_flops / seconds
                steady = ""
                if trained["steady_pairs_per_s"]:
                    rate = (len(rows) - 1) * step_flops / summary["seconds_after_first_step"]
                    steady = (f"; after the first step {trained['steady_pairs_per_s']:.1f} pairs/s, "
                              f"{rate / 1e12:.1f} TFLOP/s{mfu(rate)}")
                print(f"        {method}: {trained['pairs_per_s']:.1f} pairs/s, {tokens / seconds:.0f} scored tokens/s, "
                      f"peak {summary.get('peak_gpu_memory_gib', float('nan')):.1f} GiB, "
                      f"scored tokens per trace pair {rows[0].get('think/tokens_per_pair', 0):.0f}, "
                      f"{achieved / 1e12:.1f} TFLOP/s{mfu(achieved)}{steady}", flush=True)
        if not args.no_sampling:
            sampling(project, args)
    return check.exit_code()


def pair_flops_by_mode(project: Path, params) -> dict[str, float]:
    """Useful forward + backward FLOPs per pair of each mode with the prompt run once: 6 × matmul
    parameters × tokens + attention (trl_compare.pair_flops), on a meta-device copy of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bvpo.modeling import load_tokenizer
    from bvpo.train import encode_pairs, load_pair_rows
    from trl_compare import pair_flops

    policy = project / "data" / "policy"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy))
    tokenizer, rows = load_tokenizer(policy), load_pair_rows(project / "data" / "pairs")
    out = {}
    for mode in ("think", "nothink"):
        chosen, rejected, _ = encode_pairs(tokenizer, rows[mode], mode == "think", params.model.max_length)
        out[mode] = pair_flops(model, chosen, rejected, shared_prompt=True)
    return out


def mfu(achieved: float) -> str:
    """', MFU x%' against this GPU's dense bf16 peak, when the GPU is in BF16_PEAK."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    peak = bf16_peak(name)
    return f", MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""


def sampling(project: Path, args) -> None:
    import torch

    from bvpo.modeling import load_model, load_tokenizer
    from bvpo.sequences import generate

    base = project / "data" / "policy"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = load_tokenizer(base), load_model(base, "bf16", device)
    prompts = [f"What is {a} + {b}?" for a, b in zip(range(100, 356), range(200, 456))]
    print(f"sampling: {args.new_tokens} new tokens per sequence, T = 1, bf16")
    rows = [(64, 64, args.new_tokens, "dynamic"), (64, 64, args.new_tokens, "static"),
            (256, 256, args.new_tokens, "static")]
    if not args.no_one_by_one:
        rows.insert(0, (1, 2, args.new_tokens // 4, "dynamic"))
    for thinking in (mode == "think" for mode in args.sampling_modes.split(",")):
        rates = {}
        for batch_size, n, new, kv_cache in rows:
            if kv_cache == "static":  # the first batch of a shape compiles the decode step: not timed
                generate(model, tokenizer, prompts[:n], thinking, new, batch_size, kv_cache=kv_cache)
            torch.manual_seed(0)
            start = time.perf_counter()
            out = generate(model, tokenizer, prompts[:n], thinking, new, batch_size, kv_cache=kv_cache)
            elapsed = time.perf_counter() - start
            rates[batch_size, kv_cache] = sum(g.n_tokens for g in out) / elapsed
            print(f"  {'think' if thinking else 'nothink':8s} batch {batch_size:3d} {kv_cache:7s} cache: "
                  f"{rates[batch_size, kv_cache]:8.0f} tokens/s ({n} prompts, {elapsed:.1f} s)", flush=True)
        if (1, "dynamic") in rates:
            print(f"  batch 64 / one-by-one: {rates[64, 'dynamic'] / rates[1, 'dynamic']:.1f}x", flush=True)
        print(f"  static / dynamic cache at batch 64: {rates[64, 'static'] / rates[64, 'dynamic']:.1f}x; static at "
              f"batch 256 / dynamic at batch 64: {rates[256, 'static'] / rates[64, 'dynamic']:.1f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
