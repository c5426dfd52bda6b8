"""Recipes: params.yaml for real reasoning models, every value with where it comes from.

The embedded default is tuned for a 1M-parameter toy (β = 2, lr 1e-4, 96 new tokens). A recipe
replaces every such value for a real model and names its source: the paper, a peer's
documented recipe, the model card, or a budget choice stated as one. `bvpo init` writes one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, Params, load_params

# Sources, cited by the values below.
PAPER = "BVPO paper (arXiv 2510.05095): five samples per prompt, best vs worst in each mode"
QWEN3_CARD = ("Qwen3 model card, 'Best Practices': thinking mode Temperature=0.6, TopP=0.95, TopK=20 (non-thinking "
              "0.7 / 0.8 / 20; one setting serves both modes here)")
R1_CARD = ("DeepSeek-R1 README, 'Usage Recommendations': temperature 0.6, top-p 0.95, no system prompt "
           "(instructions in the user turn)")
TRL = "TRL DPOConfig defaults: learning_rate 1e-6, beta 0.1 (the DPO paper's beta)"
OPENRLHF = "OpenRLHF examples/scripts/train_dpo_llama.sh (Llama-3-8B DPO): learning_rate 5e-7, beta 0.1, micro batch 1"
WARMUP = "5% of the steps, as ms-swift's DPO examples (warmup_ratio 0.05)"
BF16 = "the checkpoint ships bf16 weights (config.json); training keeps fp32 masters regardless"
NO_NLL = ("plain DPO in each estimator, as the paper trains; the toy's 1.0 anchors a 1M-parameter model. Raise it "
          "toward 1.0 (Iterative RPO's weight) if the chosen log-prob falls during training")
MATH500 = "MATH-500 (shipped, data/benchmarks/; README there): the paper reports MATH-500 among its math benchmarks"


def budget(what: str) -> str:
    return f"budget choice, not a published value: {what}"


@dataclass(frozen=True)
class Recipe:
    description: str
    values: dict[str, tuple[object, str]]
    """Dotted params key → (value, where it comes from)."""


_SINGLE_GPU_TRAIN = {
    "train.lr": (1e-6, TRL),
    "train.beta": (0.1, TRL),
    "train.nll_weight": (0.0, NO_NLL),
    "train.steps": (200, budget("200 steps of 32 pairs per mode (6,400 pairs each): about one epoch over "
                                "~1,500 prompts with one pair per prompt and mode")),
    "train.warmup_steps": (10, WARMUP),
    "train.batch_size": (32, budget("32 pairs per mode per step, as the embedded default")),
    "train.mixed_precision": ("bf16", "bf16 autocast on fp32 masters, native on A100/H100/H200"),
    "train.checkpoint_every": (20, budget("a checkpoint every ~10% of the run")),
    "pairs.max_pairs_per_prompt": (1, PAPER),
    "sample.k": (5, PAPER),
    "sample.batch_size": ("auto", "the largest batch whose KV cache fits the GPU (bvpo check shows it)"),
    "sample.shard_prompts": (32, budget("32 prompts x 5 samples per resumable shard")),
    "model.dtype": ("bf16", BF16),
    "analyze.batch_size": (8, budget("8 long sequences per log-prob batch")),
    "evaluate.benchmarks": ({"math500": "data/benchmarks/math500.jsonl"}, MATH500),
}

# DeepSeek-R1-Distill-Qwen at any size: the README's sampling settings and an 8k-token budget.
_R1_DISTILL = {
    **_SINGLE_GPU_TRAIN,
    "model.max_length": (9216, "the prompt budget (1,024) + sample.max_new_tokens"),
    "model.max_length_nothink": (2048, budget("prompt (1,024) + an answer of up to 1,024 tokens")),
    "data.system_prompt": (None, R1_CARD),
    "sample.temperature": (0.6, R1_CARD),
    "sample.top_p": (0.95, R1_CARD),
    "sample.max_new_tokens": (8192, budget("8,192 new tokens (the README evaluates at 32,768); a longer trace "
                                           "is flagged truncated and never paired")),
    "train.micro_batch_size": (1, budget("one pair of up to 9k tokens per forward")),
    "evaluate.max_new_tokens": (8192, "as sample.max_new_tokens"),
    "evaluate.batch_size": (32, budget("32 greedy sequences at once")),
}

RECIPES: dict[str, Recipe] = {
    "qwen3-0.6b": Recipe("Qwen3-0.6B (or any Qwen3 with enable_thinking) on one GPU", {
        **_SINGLE_GPU_TRAIN,
        "model.max_length": (5120, "the prompt budget (1,024) + sample.max_new_tokens"),
        "model.max_length_nothink": (2048, budget("prompt (1,024) + an answer of up to 1,024 tokens")),
        "sample.temperature": (0.6, QWEN3_CARD),
        "sample.top_p": (0.95, QWEN3_CARD),
        "sample.top_k": (20, QWEN3_CARD),
        "sample.max_new_tokens": (4096, budget("4,096 new tokens (the card allows 32,768); a longer trace is "
                                               "flagged truncated and never paired")),
        "train.micro_batch_size": (2, budget("2 pairs of up to 5k tokens per forward on an 80 GB GPU")),
        "evaluate.max_new_tokens": (4096, "as sample.max_new_tokens"),
        "evaluate.batch_size": (64, budget("64 greedy sequences at once")),
    }),
    "r1-distill-qwen-1.5b": Recipe("DeepSeek-R1-Distill-Qwen-1.5B (always-open think block) on one GPU", _R1_DISTILL),
    "r1-distill-qwen-7b-8gpu": Recipe("DeepSeek-R1-Distill-Qwen-7B on 8 GPUs, FSDP2", {
        **_R1_DISTILL,
        "sample.num_processes": (8, "one sampling process per GPU (hf backend)"),
        "train.lr": (5e-7, OPENRLHF),
        "train.batch_size": (64, budget("64 pairs per mode per step: 8 per GPU")),
        "train.micro_batch_size": (1, OPENRLHF),
        "train.num_processes": (8, "one training process per GPU"),
        "train.accelerate_config": ("configs/fsdp.yaml", "FSDP2: a 7B model's fp32 masters and AdamW state "
                                    "(~112 GB) do not fit one GPU; wraps the model's own decoder layers"),
    }),
}


def recipe_params(name: str, model: str, prompts: str | None = None, reward_model: str | None = None,
                  has_answers: bool = True) -> tuple[dict, dict[str, str]]:
    """The full parameter dict of a recipe for `model` (and the user's prompts, with or without
    answers, and reward model), and the source of every value that is not the embedded default's."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r}: expected one of {', '.join(RECIPES)}")
    values = dict(RECIPES[name].values)
    values["model.path"] = (model, "the model to align (bvpo init --model)")
    if prompts is not None:
        values["data.source"] = (prompts, "your prompts (bvpo init --prompts)")
        values["data.test_fraction"] = (0.1, budget("10% of the prompts held out for evaluation"))
    else:
        values["data.source"] = ("synthetic", "the embedded arithmetic task, to try the model end to end; give your "
                                 "prompts with bvpo init --prompts (or set this to a file under data/inputs/)")
    if reward_model is not None:
        values["pairs.reward_model"] = (reward_model, "your reward model (bvpo init --reward-model)")
    if not has_answers:
        if reward_model is None:
            raise ConfigError(f"--prompts {prompts}: no 'answer' column, so samples cannot be graded: give a reward "
                              "model (--reward-model PATH) to rank them")
        values["pairs.reward"] = ("model", "the prompts have no answers: the reward model ranks the samples")
        values["promotion.metric"] = ("reward_mean", "no answers: promotion compares the reward model's mean score")
    raw = Params().to_dict()
    sources = {}
    for key, (value, source) in values.items():
        section, _, field = key.rpartition(".")
        (raw[section] if section else raw)[field] = value
        sources[key] = source
    return raw, sources


# Values a real model never reads, said once where they stand.
UNUSED = {
    "model.hidden_size": "hidden_size .. intermediate_size: the embedded model's shape, unused with model.path",
    "warmup": "the embedded model's SFT: not run with model.path",
    "data.n_train": "n_train .. small_operand_fraction: the embedded arithmetic task, unused with your prompts",
}


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False)
    return text.strip().removesuffix("\n...").strip()


def render(raw: dict, sources: dict[str, str], header: str) -> str:
    """params.yaml text: every key in declaration order, a `#` line above each recipe value."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()] + [""]
    for name, value in raw.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(Params(), name)):
            if name in UNUSED:
                lines.append(f"# {UNUSED[name]}")
            lines.append(f"{name}:")
            for key, inner in value.items():
                if f"{name}.{key}" in sources:
                    lines.append(f"  # {sources[f'{name}.{key}']}")
                elif f"{name}.{key}" in UNUSED and (name != "data" or raw["data"]["source"] != "synthetic"):
                    lines.append(f"  # {UNUSED[f'{name}.{key}']}")
                lines.append(f"  {key}: {_scalar(inner)}")
            lines.append("")
        else:
            if name in sources:
                lines.append(f"# {sources[name]}")
            lines.append(f"{name}: {_scalar(value)}")
            lines.append("")
    return "\n".join(lines)


def write(name: str, model: str, out: Path, prompts: str | None = None, reward_model: str | None = None,
          force: bool = False) -> Path:
    """Write the recipe's params.yaml to `out` (refusing to replace one unless `force`), checked
    by loading it back; nothing is left behind when it does not load."""
    from .paths import atomic_path

    if out.exists() and not force:
        raise ConfigError(f"{out} exists: pass --force to replace it (git keeps the old one if it is committed)")
    has_answers = True
    if prompts is not None:
        from .data import read_prompts_file

        has_answers = "answer" in read_prompts_file(out.parent / prompts).column_names
    raw, sources = recipe_params(name, model, prompts, reward_model, has_answers)
    header = (f"Written by `bvpo init --recipe {name}`: {RECIPES[name].description}.\n"
              "A line above a value says where it comes from; values without one are the embedded default's,\n"
              "documented where they are declared (src/bvpo/config.py). `bvpo check` runs the preflight.")
    with atomic_path(out) as tmp:
        tmp.write_text(render(raw, sources, header), encoding="utf-8")
        load_params(tmp)
    return out
