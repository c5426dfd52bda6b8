"""Typed, validated parameters, loaded from params.yaml.

Every option is declared here with its type, default and meaning (the TRL `DPOConfig` way).
`load_params` refuses unknown keys and out-of-range values with one message naming the field,
so a typo in params.yaml fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import BvpoError
from .paths import PATHS


class ConfigError(BvpoError, ValueError):
    """A parameter is missing, unknown or out of range. The message names the field."""


# `pairs.reward_model_output`: a model output field, optionally indexed in its last dimension.
REWARD_OUTPUT = re.compile(r"(?P<field>[A-Za-z_]\w*)(\[(?P<index>\d+)\])?")


def _check(cond: bool, field_name: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: expected {expected}, got {value!r}")


def _local(path: str, base_dir: Path | None) -> Path:
    """A file named in params.yaml: relative paths are relative to the params file's folder."""
    local = Path(path)
    return base_dir / local if base_dir is not None and not local.is_absolute() else local


def _is_name(name: str) -> bool:
    """A name that can key metrics, folders and DVC experiments: letters, digits, '_' and '-'."""
    return bool(name) and name.replace("_", "").replace("-", "").isalnum()


def _check_file(path: str | None, field_name: str, base_dir: Path | None, expected: str = "an existing file") -> None:
    if path is not None:
        _check(_local(path, base_dir).is_file(), field_name, expected, str(_local(path, base_dir)))


@dataclass
class DataConfig:
    source: str = "synthetic"
    """`synthetic` for the embedded arithmetic task, or a local `.jsonl`/`.parquet` file with a
    `prompt` column (non-empty text) or a `messages` column (a chat: a list of {role, content}
    ending with a user turn) and, for the verified reward, an `answer` column. Keep it under
    data/inputs/: that folder is a DVC dependency of the prepare stage, so editing the file reruns
    the pipeline from there (a file elsewhere is read, but DVC does not see it change)."""
    task: Literal["arithmetic", "judged"] = "arithmetic"
    """The embedded task (`source: synthetic`). `arithmetic`: answers are right or wrong
    (`pairs.reward: verified`). `judged`: the same prompts, answers graded for closeness by a
    hidden gold scorer; the reward_model stage trains a Bradley–Terry reward model on noisy
    gold-labelled comparisons, and the pairs stage ranks samples with it (set `pairs.reward:
    model` and leave `pairs.reward_model` null). Evaluation adds the gold reward (`gold_*`), the
    reward model's win rate against the starting model and the proxy-vs-gold gap."""
    test_source: str | None = None
    """Held-out prompts file for evaluation. None: split `test_fraction` off `source`."""
    test_fraction: float = 0.2
    """Share of a user's prompts held out for evaluation when no `test_source` is given."""
    system_prompt: str | None = None
    """A system message put before every prompt of a user's file (a chat that already starts
    with a system message keeps its own). None: none. DeepSeek-R1-Distill's card advises against
    one (instructions belong in the user turn)."""
    n_train: int = 4096
    """Synthetic task: number of training prompts (the sampling/pairs stage uses them). 1,024
    gave the default base model only ~180 trace pairs, on which DPO overfits."""
    n_test: int = 1000
    """Synthetic task: number of held-out evaluation prompts, disjoint from every training prompt."""
    n_warmup: int = 20000
    """Synthetic task: number of distinct prompts the warmup SFT draws from (disjoint from test)."""
    min_ops: int = 1
    """Synthetic task: fewest operations in a chain (2 operations = 3 operands)."""
    max_ops: int = 2
    """Synthetic task: most operations in a chain."""
    min_operand: int = 1
    """Synthetic task: smallest operand after the first (the first is always 10..99)."""
    max_operand: int = 19
    """Synthetic task: largest operand after the first."""
    small_operand_fraction: float = 0.0
    """Synthetic task: share of chains whose later operands are single-digit (1..9) instead.
    Those are within reach without a trace, the others mostly are not, so a mix gives both
    modes room to learn (a difficulty mix like a real benchmark's)."""

    def check(self, base_dir: Path | None) -> None:
        _check(self.task == "arithmetic" or self.source == "synthetic", "data.task",
               "arithmetic for a prompts file (the judged task is the embedded one: data.source synthetic)", self.task)
        if self.source != "synthetic":
            _check(Path(self.source).suffix in (".jsonl", ".parquet"), "data.source",
                   "'synthetic' or a .jsonl/.parquet file", self.source)
            _check_file(self.source, "data.source", base_dir)
        _check_file(self.test_source, "data.test_source", base_dir)
        _check(0 < self.test_fraction < 1, "data.test_fraction", "a fraction in (0, 1)", self.test_fraction)
        _check(self.system_prompt is None or bool(self.system_prompt.strip()), "data.system_prompt",
               "null or non-empty text", self.system_prompt)
        for name in ("n_train", "n_test", "n_warmup", "max_ops"):
            _check(getattr(self, name) >= 1, f"data.{name}", "an integer >= 1", getattr(self, name))
        _check(1 <= self.min_ops <= self.max_ops, "data.min_ops", f"an integer in [1, max_ops={self.max_ops}]",
               self.min_ops)
        _check(1 <= self.max_operand <= 99, "data.max_operand", "an integer in [1, 99]", self.max_operand)
        _check(1 <= self.min_operand <= self.max_operand, "data.min_operand",
               f"an integer in [1, max_operand={self.max_operand}]", self.min_operand)
        _check(0 <= self.small_operand_fraction <= 1, "data.small_operand_fraction", "a number in [0, 1]",
               self.small_operand_fraction)


@dataclass
class ModelConfig:
    path: str | None = None
    """None: the embedded tiny Qwen3-architecture model, built and SFT'd by the warmup stage.
    Otherwise a local directory or a hub id (`Qwen/Qwen3-0.6B`, downloaded into the user's own
    Hugging Face cache when online) of a reasoning causal LM: its chat template either honours
    `enable_thinking` (Qwen3) or always opens the think block (DeepSeek-R1-Distill,
    Qwen3-*-Thinking-2507; thinking off then closes it). `bvpo init` writes a params.yaml for one."""
    hidden_size: int = 128
    """Embedded model: width."""
    num_layers: int = 4
    """Embedded model: transformer blocks."""
    num_heads: int = 4
    """Embedded model: attention heads (key/value heads = heads / 2, as Qwen3 uses GQA)."""
    intermediate_size: int = 512
    """Embedded model: MLP width."""
    max_length: int = 192
    """Longest prompt + completion, in tokens, of a thinking-mode sequence (and of both modes
    unless `max_length_nothink` is set); also the embedded model's rotary position range.
    Sequences that do not fit are skipped and counted, never truncated."""
    max_length_nothink: int | None = None
    """Longest prompt + completion of a no-thinking sequence; None: `max_length`. At most
    `max_length`. No-thinking answers are short, so a tighter limit keeps a runaway answer from
    setting a micro-batch's padded length (it is skipped and counted instead)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights precision for inference (sampling, evaluation, analysis) and for storing trained
    models. `auto`: bf16 on a CUDA GPU with bf16, fp32 elsewhere. Training always keeps fp32
    master weights and computes in `train.mixed_precision`, whatever this says. (One precision
    vocabulary everywhere: fp32, bf16, fp16, auto.)"""

    def max_length_for(self, thinking: bool) -> int:
        return self.max_length if thinking or self.max_length_nothink is None else self.max_length_nothink

    def check(self, base_dir: Path | None) -> None:
        if self.path is not None:
            local = _local(self.path, base_dir)
            if self.path.startswith((".", "/", "~")) or local.exists():  # else a hub id
                _check(local.is_dir(), "model.path", "an existing model directory", str(local))
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"):
            _check(getattr(self, name) >= 1, f"model.{name}", "an integer >= 1", getattr(self, name))
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", "a multiple of model.num_heads",
               self.hidden_size)
        _check(self.num_heads % 2 == 0, "model.num_heads", "an even number", self.num_heads)
        if self.max_length_nothink is not None:
            _check(1 <= self.max_length_nothink <= self.max_length, "model.max_length_nothink",
                   f"null or an integer in [1, model.max_length={self.max_length}]", self.max_length_nothink)


@dataclass
class WarmupConfig:
    steps: int = 1600
    """SFT optimizer steps for the embedded model (ignored when `model.path` is set)."""
    batch_size: int = 32
    """Examples per SFT step, an even number: batch_size / 2 problems, each written once with a
    trace and once with the empty think block, scored as one sequence that runs their shared
    prompt head once (a quarter less work than two sequences, and the model sees every problem
    solved both ways)."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay)."""
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast of the SFT forward and backward: fp32, bf16, or auto (bf16 where the hardware
    computes it natively: a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX; else fp32).
    Weights and optimizer stay fp32. On a CPU bf16 (attention kept in fp32) reaches the same
    loss faster (docs/method.md). The base model differs between the two, so with auto it
    depends on the machine's CPU; warmup_summary.json records which one ran."""

    def check(self, base_dir: Path | None) -> None:
        _check(self.steps >= 1, "warmup.steps", "an integer >= 1", self.steps)
        _check(self.batch_size >= 2 and self.batch_size % 2 == 0, "warmup.batch_size",
               "an even integer >= 2 (each problem is written in both modes)", self.batch_size)
        _check(self.lr > 0, "warmup.lr", "a number > 0", self.lr)


@dataclass
class SampleConfig:
    k: int = 4
    """Completions per prompt and per mode (thinking on and off). At least 2, to form a pair."""
    temperature: float = 1.0
    """Sampling temperature; traces must vary, as a real model's do."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Sample from the k likeliest tokens only; 0 = off (Qwen3's card: 20)."""
    max_new_tokens: int = 96
    """Generation budget; a sample that hits it is flagged invalid (truncated)."""
    batch_size: int | Literal["auto"] = 256
    """Sequences generated at once (KV-cached, left-padded; `hf` backend). The preflight checks
    the KV cache it needs (longest prompt + max_new_tokens) against the GPU's free memory and
    refuses a batch that cannot fit, naming one that does. `auto`: the largest batch (up to 256)
    that fits, decided on the machine that samples (the samples then depend on its memory)."""
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    """Hugging Face `generate` (the `hf` backend, and evaluation): `dynamic` grows the KV cache
    as tokens come; `static` preallocates one length for every batch (longest prompt +
    max_new_tokens), and on a GPU transformers then compiles the decode step (`torch.compile`;
    the first batch of each batch size pays the compile; not yet measured on a GPU). Same
    samples at a fixed seed up to kernel rounding (tested equal on the CPU)."""
    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: Hugging Face `generate`, sharded over `num_processes`. `vllm`: vLLM's offline
    engine in one process (optional extra, `pip install 'bvpo[vllm]'`; needs a GPU), parallel
    over `vllm_tensor_parallel_size` GPUs. Both honour `enable_thinking`, k, the seeds,
    `max_new_tokens`, temperature and top_p, and flag truncated and malformed samples alike."""
    num_processes: int = 1
    """`hf` backend: processes (`accelerate launch`, one GPU each; on a CPU they split the
    cores). Shards go round robin over processes and are merged in prompt order."""
    shard_prompts: int = 64
    """Prompts per shard (each sampled k times in both modes). A finished shard is written to
    data/cache at once, so a killed stage restarts from the shards it already has. Each shard
    has its own seed (from the sample seed, the mode and the shard's index), so its samples do
    not depend on which process made it."""
    vllm_tensor_parallel_size: int = 1
    """`vllm` backend: GPUs the sampling engine spans."""
    vllm_gpu_memory_utilization: float = 0.9
    """`vllm` backend: share of each GPU's memory vLLM may take (weights + KV cache)."""
    seed: int | None = None
    """Seed of the sampling RNG; None uses the top-level `seed`. Experiments vary this (and
    `train.seed`) per run while the base model, built from `seed`, stays the same."""

    def check(self, base_dir: Path | None) -> None:
        _check(self.k >= 2, "sample.k", "an integer >= 2 (a pair needs two samples)", self.k)
        _check(self.temperature > 0, "sample.temperature", "a number > 0", self.temperature)
        _check(0 < self.top_p <= 1, "sample.top_p", "a number in (0, 1]", self.top_p)
        _check(self.top_k >= 0, "sample.top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check(self.max_new_tokens >= 1, "sample.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        _check(self.batch_size == "auto" or self.batch_size >= 1, "sample.batch_size", "an integer >= 1 or 'auto'",
               self.batch_size)
        _check(self.num_processes >= 1, "sample.num_processes", "an integer >= 1", self.num_processes)
        _check(self.backend == "hf" or self.num_processes == 1, "sample.num_processes",
               "1 with sample.backend vllm (vLLM parallelises inside its one process: set "
               "sample.vllm_tensor_parallel_size)", self.num_processes)
        _check(self.shard_prompts >= 1, "sample.shard_prompts", "an integer >= 1", self.shard_prompts)
        _check(self.vllm_tensor_parallel_size >= 1, "sample.vllm_tensor_parallel_size", "an integer >= 1",
               self.vllm_tensor_parallel_size)
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "sample.vllm_gpu_memory_utilization",
               "a fraction in (0, 1]", self.vllm_gpu_memory_utilization)
        _check(self.seed is None or self.seed >= 0, "sample.seed", "an integer >= 0 or null", self.seed)


@dataclass
class PairsConfig:
    max_pairs_per_prompt: int = 2
    """Preference pairs per prompt and mode: i-th best against i-th worst, strictly better only."""
    reward: Literal["verified", "graded", "model", "verified_model"] = "verified"
    """`verified`: 1 when the final answer matches the `answer` column (math-verify), else 0.
    `graded`: as verified, plus partial credit (< 0.5) for numeric answers close to the reference.
    `model`: the score of `reward_model` on the prompt and the final answer (the trace removed,
    so both modes are judged on what the user sees). `verified_model`: verified first, the
    reward model breaks ties: verified + 0.5·sigmoid(score), so a correct answer always ranks
    above a wrong one and two correct (or two wrong) answers are ranked by the reward model."""
    reward_model: str | None = None
    """Local directory of a sequence-classification reward model with one output
    (`AutoModelForSequenceClassification`, e.g. a copy of ArmoRM or Skywork-Reward); needed by
    `model` and `verified_model`. It is a param, not a DVC dep: replacing the files under the
    same path does not rerun the pairs stage (`dvc repro -f -s pairs` does)."""
    reward_batch_size: int = 32
    """Sequences scored at once by the reward model."""
    reward_model_output: str = "logits"
    """Which output of the reward model is the score: a field of its output, with `[k]` to pick
    one of several values per sequence. `logits`: a standard one-output classifier
    (num_labels=1, e.g. Skywork-Reward). `score`: ArmoRM's preference score. `rewards[k]`: one of
    ArmoRM's objectives; `logits[k]`: one label of a multi-label classifier."""
    reward_model_trust_remote_code: bool = False
    """Run the modeling code shipped with the reward model (ArmoRM's `LlamaForRewardModelWithGating`
    is custom code). Off by default: it executes the model directory's Python files."""

    def check(self, base_dir: Path | None) -> None:
        _check(self.max_pairs_per_prompt >= 1, "pairs.max_pairs_per_prompt", "an integer >= 1",
               self.max_pairs_per_prompt)
        _check(self.reward_batch_size >= 1, "pairs.reward_batch_size", "an integer >= 1", self.reward_batch_size)
        _check(REWARD_OUTPUT.fullmatch(self.reward_model_output) is not None, "pairs.reward_model_output",
               "an output field with an optional index, e.g. logits[0], score or rewards[3]",
               self.reward_model_output)
        # Whether one is needed depends on the task (the judged task trains its own): `validate`.
        if self.reward in ("model", "verified_model") and self.reward_model is not None:
            _check(_local(self.reward_model, base_dir).is_dir(), "pairs.reward_model",
                   "an existing local model directory", str(_local(self.reward_model, base_dir)))


@dataclass
class MethodConfig:
    alpha: float | Literal["auto"] = 0.5
    """Weight of the trace loss: alpha*L_trace + (1-alpha)*L_empty. 1 = DPO on trace pairs,
    0 = DPO on empty-trace pairs, 0.5 = BVPO as trained in the paper. `auto`: the plug-in
    MSE-optimal α* (bvpo.alpha), re-estimated every `train.alpha_every` steps from gradient
    draws of both estimators, smoothed by `train.alpha_ema` and clipped to
    [`train.alpha_min`, `train.alpha_max`]. It assumes the trace estimator is unbiased for the
    marginal gradient and the two estimators are independent (docs/method.md)."""
    preference_weight: float = 1.0
    """Weight of the DPO/IPO term. 0 turns the method into the NLL-only control (fine-tuning on
    the chosen completions with the same data, α and schedule), which a toy that is still
    under-trained needs beside any preference result to be read honestly."""
    loss_type: Literal["sigmoid", "ipo"] | None = None
    """This method's preference loss; null = `train.loss_type`. Lets one run (or experiment)
    train a DPO and an IPO variant of the same mix side by side."""

    def check(self, where: str) -> None:
        _check(self.alpha == "auto" or 0.0 <= self.alpha <= 1.0, f"{where}.alpha", "a number in [0, 1] or 'auto'",
               self.alpha)
        _check(self.preference_weight >= 0, f"{where}.preference_weight", "a number >= 0", self.preference_weight)
        _check(self.loss_type in (None, "sigmoid", "ipo"), f"{where}.loss_type", "sigmoid, ipo or null",
               self.loss_type)


def _check_methods(methods: dict[str, MethodConfig], where: str, reserved: tuple[str, ...] = ()) -> None:
    """One check for both method tables (train.methods, experiment.methods)."""
    _check(len(methods) >= 1, where, "at least one method", methods)
    for name, method in methods.items():
        _check(_is_name(name) and name not in reserved, f"{where}.{name}",
               "a name of letters, digits, '_' or '-'" + (f" other than {', '.join(reserved)}" if reserved else ""),
               name)
        method.check(f"{where}.{name}")


@dataclass
class TrainConfig:
    methods: dict[str, MethodConfig] = field(default_factory=lambda: {"bvpo": MethodConfig(alpha=0.5)})
    """Methods to train, each from the same base model and pairs; the name keys eval.json. The
    default trains the round's candidate alone: each method costs a whole training run (on a real
    model, GPU hours), and comparing methods is what `experiment.methods` does, over seeds and
    with intervals. Add the single estimators as controls to see them every round, e.g.
    `dpo_think: {alpha: 1.0}` and `dpo_nothink: {alpha: 0.0}`."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO (Rafailov et al.); `ipo`: squared-margin IPO (Azar et al.)."""
    beta: float = 2.0
    """DPO temperature on the trace estimator."""
    beta_nothink: float | None = None
    """DPO temperature on the empty-trace estimator; None uses `beta`."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped, in [0, 0.5)."""
    nll_weight: float = 1.0
    """Weight of the per-token NLL of the chosen completion, added to each estimator's loss.
    Plain DPO makes the toy forget (its chosen log-prob falls); NLL keeps it anchored."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear learning-rate warmup, then cosine decay to zero."""
    steps: int = 400
    """Optimizer steps per method."""
    batch_size: int = 32
    """Pairs of each mode per optimizer step, over all processes (the global batch)."""
    micro_batch_size: int = 8
    """Pairs of each mode per forward pass per process; gradient accumulation fills the rest.
    The step's pairs are sorted longest first before they are cut, so each micro-batch pads
    only to its own longest pair. The gradient does not depend on it (losses are per-pair
    means). On a CPU small is fast (less padding, activations that stay in cache; measured in
    docs/benchmarks.md); on a GPU raise it as far as memory allows."""
    shared_prompt: bool = True
    """Score each pair as one sequence [prompt, chosen, rejected] that runs the prompt once (a
    custom attention mask keeps the rejected completion from seeing the chosen one). Same
    log-probs, fewer tokens (how many fewer: docs/benchmarks.md). Needs SDPA attention; models
    with another attention implementation score chosen and rejected separately."""
    max_tokens_per_micro_batch: int | None = None
    """Pack the step's pairs, each as [prompt, chosen, rejected] with the prompt run once, side by
    side into padding-free rows of at most this many tokens, one row per forward pass
    (`micro_batch_size` is then unused; a pair longer than this gets a row of its own). The same
    log-probs and gradient as the unpacked path. Pays on a GPU with
    `attn_implementation: flex_attention`, whose block mask skips what a row's pairs cannot see;
    under SDPA the mask is dense ([tokens, tokens] per row), so keep rows short there. null = off:
    `micro_batch_size` pairs per forward, padded to the longest. Needs SDPA, eager or
    FlexAttention, and DDP (not FSDP: its collective passes need the same number of rows on
    every process)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during the backward pass instead of keeping them
    from the forward (transformers' activation checkpointing, non-reentrant): each layer keeps
    only its input, so a GPU fits longer rows or more pairs per forward (`micro_batch_size`,
    `max_tokens_per_micro_batch`), for one more forward of the decoder layers per step (at most
    a third more FLOPs; the LM head and loss are not recomputed; on the embedded CPU model the
    step took 52% longer, docs/benchmarks.md). The same gradients as without it (bit for bit on
    the CPU, fp32 and bf16 autocast; the same computation on a GPU), so it does not enter the
    training fingerprint: a run stopped by an out-of-memory error resumes from its last
    checkpoint with it turned on. Under FSDP use the accelerate config's
    `fsdp_activation_checkpointing` instead (configs/fsdp.yaml sets it); both at once is refused.
    The policy only: the reference runs without gradients."""
    compile: bool = False
    """Compile each decoder layer with `torch.compile` (inductor, dynamic shapes), in place: one
    layer's graph serves every layer and every micro-batch length, and the weights' names are
    unchanged, so checkpoints and the saved model are as without it. The first steps pay the
    compile (on a 2-core CPU about 45 s for the embedded model with an empty inductor cache, under
    10 s with a warm one; its steps then ran 18% faster, which a 400-step CPU run does not earn
    back, hence off by default: docs/benchmarks.md; a CPU needs a C++ compiler; not yet measured
    on a GPU, where runs are long enough to gain). Fused kernels round differently, so the
    weights agree with an uncompiled run to float rounding, not bit for bit; like
    `num_processes` it stays out of the training fingerprint (a run resumes with it switched).
    The reference's layers are compiled too (its precomputed log-probs are cached per setting):
    under bf16 compiled kernels round otherwise, and the log-ratio must start at 0. One GPU or
    DDP: refused with FSDP, and beside the accelerate config's `dynamo_config` (which compiles the
    whole model)."""
    attention: str = "sdpa"
    """The policy's (and live reference's) attention kernel while training: `sdpa`, or
    `flex_attention` (GPU only: torch has no FlexAttention backward on a CPU), which needs
    `max_tokens_per_micro_batch` (it reads the packed rows' block mask)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold on the mixed gradient."""
    alpha_every: int = 10
    """Steps between gradient-statistics estimates: α* for `auto` methods, and the variance,
    bias and α² telemetry for every method (when `telemetry` is on). Step 0 always estimates."""
    alpha_draws: int = 4
    """Gradient draws of EACH estimator per estimate. A draw's pairs depend only on the seed and
    the step, and every process computes its share of each draw, so 1 and N processes estimate
    the same α*."""
    alpha_draw_size: int = 8
    """Pairs per gradient draw (a multiple of `num_processes`). The variances of these draws are
    rescaled to the step's `batch_size` before α* is formed (bvpo.alpha.step_statistics):
    variances shrink with the batch, the bias does not."""
    alpha_ema: float = 0.8
    """Smoothing of α* between estimates: α ← ema·α + (1−ema)·α*; the first estimate is used as is."""
    alpha_min: float = 0.0
    """Lower clip for `auto` α."""
    alpha_max: float = 1.0
    """Upper clip for `auto` α."""
    alpha_init: float = 0.5
    """α used by `auto` methods before the first estimate (only if alpha_every skips step 0)."""
    telemetry: bool = True
    """Also estimate gradient statistics for fixed-α methods (costs the same extra passes)."""
    grad_sketch_dim: int = 65536
    """Gradient statistics (α*, telemetry) on a seeded count-sketch of this dimension, which
    keeps norms and inner products unbiased at O(parameters) time and O(N) memory, so no
    parameter-sized fp32 copy is made per draw; a model with fewer parameters uses its full
    gradient (no larger). 0: always the full flattened fp32 gradient, one copy per draw (fine
    for small models only). FSDP needs N > 0: each process sketches its own shard."""
    reference: Literal["precomputed", "live"] = "precomputed"
    """`precomputed`: reference log-probs computed once per pairs dataset and reference model,
    cached under data/cache/ (keyed by both hashes), so no reference model stays in memory.
    `live`: keep the frozen reference model and score each micro-batch with it."""
    checkpoint_every: int = 50
    """Steps between checkpoints (model, optimizer, scheduler, RNG, data position, α state) in
    data/checkpoints/; a rerun of the stage resumes from the last one. 0 = off."""
    max_skipped_fraction: float = 0.1
    """Pairs whose prompt + completion exceed `model.max_length` are skipped (never truncated)
    and counted per mode; training stops with an error if a mode loses more than this share."""
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast of the policy's forward (passed to `accelerate launch`, over any config file;
    fp32 = none; auto = bf16 where the hardware computes it natively, as `warmup.
    mixed_precision`, else fp32). The reference is scored under the same autocast, so the
    log-ratio is 0 at step 0. bf16 on a CPU keeps the attention in fp32, which is faster there
    (docs/method.md)."""
    num_processes: int = 1
    """Processes `accelerate launch` starts (GPUs, or gloo processes on a CPU)."""
    accelerate_config: str | None = None
    """Optional accelerate config file (configs/*.yaml) for multi-GPU DDP or FSDP. DeepSpeed is
    refused: its engine steps on every backward, which is not a BVPO step."""
    seed: int | None = None
    """Seed of the training data order and gradient draws; None uses the top-level `seed`."""

    def check(self, base_dir: Path | None) -> None:
        _check_methods(self.methods, "train.methods")
        for name in ("lr", "beta", "max_grad_norm"):
            _check(getattr(self, name) > 0, f"train.{name}", "a number > 0", getattr(self, name))
        _check(self.beta_nothink is None or self.beta_nothink > 0, "train.beta_nothink", "null or a number > 0",
               self.beta_nothink)
        _check(0 <= self.label_smoothing < 0.5, "train.label_smoothing", "a number in [0, 0.5)", self.label_smoothing)
        for name in ("nll_weight", "weight_decay"):
            _check(getattr(self, name) >= 0, f"train.{name}", "a number >= 0", getattr(self, name))
        for name in ("steps", "num_processes", "alpha_every", "alpha_draw_size"):
            _check(getattr(self, name) >= 1, f"train.{name}", "an integer >= 1", getattr(self, name))
        for name in ("warmup_steps", "grad_sketch_dim", "checkpoint_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", "an integer >= 0", getattr(self, name))
        _check(self.batch_size >= self.num_processes and self.batch_size % self.num_processes == 0,
               "train.batch_size", f"a multiple of train.num_processes ({self.num_processes})", self.batch_size)
        per_process = self.batch_size // self.num_processes
        _check(1 <= self.micro_batch_size and per_process % min(self.micro_batch_size, per_process) == 0,
               "train.micro_batch_size", f"a divisor of the per-process batch ({per_process})", self.micro_batch_size)
        _check(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 2,
               "train.max_tokens_per_micro_batch", "an integer >= 2 or null", self.max_tokens_per_micro_batch)
        _check(self.max_tokens_per_micro_batch is None or self.shared_prompt, "train.max_tokens_per_micro_batch",
               "null while train.shared_prompt is false (packing lays each pair out with its prompt once)",
               self.max_tokens_per_micro_batch)
        _check(self.attention in ("sdpa", "flex_attention"), "train.attention", "sdpa or flex_attention",
               self.attention)
        _check(self.attention == "sdpa" or self.max_tokens_per_micro_batch, "train.attention",
               "sdpa unless train.max_tokens_per_micro_batch is set (flex_attention reads packed rows)",
               self.attention)
        _check(self.alpha_draws >= 2, "train.alpha_draws", "an integer >= 2 (a variance needs two draws)",
               self.alpha_draws)
        _check(self.alpha_draw_size % self.num_processes == 0, "train.alpha_draw_size",
               f"a multiple of train.num_processes ({self.num_processes})", self.alpha_draw_size)
        _check(0 <= self.alpha_ema < 1, "train.alpha_ema", "a number in [0, 1)", self.alpha_ema)
        _check(0 <= self.alpha_max <= 1, "train.alpha_max", "a number in [0, 1]", self.alpha_max)
        _check(0 <= self.alpha_min <= self.alpha_max, "train.alpha_min", f"a number in [0, alpha_max={self.alpha_max}]",
               self.alpha_min)
        _check(0 <= self.alpha_init <= 1, "train.alpha_init", "a number in [0, 1]", self.alpha_init)
        _check(0 <= self.max_skipped_fraction <= 1, "train.max_skipped_fraction", "a fraction in [0, 1]",
               self.max_skipped_fraction)
        _check(self.seed is None or self.seed >= 0, "train.seed", "an integer >= 0 or null", self.seed)
        if self.accelerate_config is not None:
            _check_accelerate_config(self.accelerate_config, base_dir, self.gradient_checkpointing, self.compile)


@dataclass
class EvalConfig:
    n_prompts: int | None = None
    """Held-out prompts to score; None = all of them."""
    selection_fraction: float = 0.5
    """Share of the held-out prompts that decide promotions (the promotion gate compares the
    candidate and the champion on them); eval.json and the MLflow metrics report the others,
    which never pick a champion, so a reported score is not flattered by the selection. Prompts
    are assigned by a hash of their text. 0: every prompt reports and nothing can be promoted
    (what `bvpo experiment` uses)."""
    max_new_tokens: int = 96
    """Greedy generation budget per answer."""
    batch_size: int = 256
    """Sequences generated at once."""
    n_samples: int = 0
    """Sampled completions per prompt and mode at `temperature`, for the sampled accuracy (the
    mean over them, `accuracy_*_sampled`); 0 = greedy accuracy only."""
    temperature: float = 1.0
    """Sampling temperature of the sampled accuracy."""
    benchmarks: dict[str, str] = field(default_factory=dict)
    """Named benchmark files scored like the held-out prompts, in both modes, for every model:
    `{math500: data/benchmarks/math500.jsonl, gsm8k: data/benchmarks/gsm8k_test.jsonl}` (both
    shipped). JSONL or Parquet with `prompt`, `problem` or `question` and an `answer` (LaTeX as
    MATH writes it, or GSM8K's `... #### 72`), graded by `rewards.verified_reward`. Results land
    in eval.json as `<name>/accuracy_*` and their mean over benchmarks as
    `benchmarks/accuracy_*`. Files under data/benchmarks/ are a DVC dependency of evaluate."""
    answer_instruction: str | None = "Please reason step by step, and put your final answer within \\boxed{}."
    """Appended (after a blank line) to every benchmark prompt: the usual instruction of MATH-500
    and GSM8K evaluations (DeepSeek-R1's and Qwen's), so the final answer can be found. None: the
    prompts as the file has them. The held-out prompts of `data.source` are never changed."""
    win_rate_prompts: str | None = None
    """A prompts file (JSONL/Parquet, `prompt` column) for the reward-model win rate, the offline
    analogue of AlpacaEval: every trained model and the starting model answer each prompt
    greedily in both modes, `win_rate_reward_model` scores (prompt, final answer), and a model's
    win rate is the share of prompts where it scores above the starting model (ties count
    half). eval.json: `win_rate_think`, `win_rate_nothink`. None = off."""
    win_rate_reward_model: str | None = None
    """Reward model directory for the win rate (one-output sequence classifier); None uses
    `pairs.reward_model`. The judged task always judges with the reward model it trained (its
    proxy-vs-gold gap is about that proxy)."""

    def check(self, base_dir: Path | None) -> None:
        _check(self.n_prompts is None or self.n_prompts >= 1, "evaluate.n_prompts", "an integer >= 1 or null (all)",
               self.n_prompts)
        _check(0 <= self.selection_fraction < 1, "evaluate.selection_fraction", "a number in [0, 1)",
               self.selection_fraction)
        for name in ("max_new_tokens", "batch_size"):
            _check(getattr(self, name) >= 1, f"evaluate.{name}", "an integer >= 1", getattr(self, name))
        _check(self.n_samples >= 0, "evaluate.n_samples", "an integer >= 0", self.n_samples)
        _check(self.temperature > 0, "evaluate.temperature", "a number > 0", self.temperature)
        for bench, path in self.benchmarks.items():
            _check(_is_name(bench), f"evaluate.benchmarks.{bench}", "a name of letters, digits, '-' and '_'", bench)
            _check_file(path, f"evaluate.benchmarks.{bench}", base_dir, "an existing .jsonl or .parquet file")
        _check_file(self.win_rate_prompts, "evaluate.win_rate_prompts", base_dir, "an existing .jsonl or .parquet file")


@dataclass
class AnalyzeConfig:
    batch_size: int = 64
    """Sequences scored at once when computing sample log-probabilities."""
    n_prompts: int | None = 1024
    """Training prompts whose samples the diagnostics score: a random subset (drawn with `seed`),
    every sample of each in both modes; null = all. 1,024 of the default's 4,096 take a quarter of
    the scoring time; the thinking ÷ no-thinking ratios they give were within 15% of all prompts'
    (variance ratios are heavy-tailed: set null for the paper's figures to the last digit)."""

    def check(self, base_dir: Path | None) -> None:
        _check(self.batch_size >= 1, "analyze.batch_size", "an integer >= 1", self.batch_size)
        _check(self.n_prompts is None or self.n_prompts >= 1, "analyze.n_prompts", "null or an integer >= 1",
               self.n_prompts)


@dataclass
class RewardModelConfig:
    """The reward_model stage (`data.task: judged` only): a Bradley–Terry reward model trained
    from the base model's backbone on comparisons of candidate answers to training prompts,
    labelled by the hidden gold scorer with noise."""

    comparisons: int = 16384
    """Labelled comparisons to train on (two candidate answers to a random training prompt)."""
    held_out: int = 1024
    """Comparisons on other training prompts, to report agreement with the labels and the gold scorer."""
    noise: float = 0.1
    """Label noise as a Bradley–Terry temperature on the gold grades: the better answer is labelled
    chosen with probability sigmoid(Δgold / noise). 0: always the better one."""
    steps: int = 1500
    """Optimizer steps. The backbone must learn to do the sum in one pass to judge closeness,
    which it learns slowly (agreement with the gold scorer by steps and comparisons: docs/results.md)."""
    batch_size: int = 64
    """Comparisons per step."""
    lr: float = 3e-4
    """Peak AdamW learning rate (linear warmup, cosine decay)."""
    warmup_steps: int = 20
    """Learning-rate warmup steps."""

    def check(self, base_dir: Path | None) -> None:
        for name in ("comparisons", "held_out", "steps", "batch_size"):
            _check(getattr(self, name) >= 1, f"reward_model.{name}", "an integer >= 1", getattr(self, name))
        _check(self.noise >= 0, "reward_model.noise", "a number >= 0", self.noise)
        _check(self.lr > 0, "reward_model.lr", "a number > 0", self.lr)
        _check(self.warmup_steps >= 0, "reward_model.warmup_steps", "an integer >= 0", self.warmup_steps)


@dataclass
class TrackingConfig:
    experiment: str = "bvpo"
    """MLflow experiment that holds the pipeline runs."""
    registered_model: str = "bvpo"
    """MLflow registered model that receives a version per pipeline run."""
    register_method: str = "bvpo"
    """The round's candidate for `@champion` (must be one of `train.methods`). Every trained
    method is registered as a version; only this one can be promoted."""

    def check(self, base_dir: Path | None) -> None:
        for name in ("experiment", "registered_model"):
            _check(bool(getattr(self, name).strip()), f"tracking.{name}", "a non-empty name", getattr(self, name))


@dataclass
class PromotionConfig:
    """When a round's candidate (`tracking.register_method`) replaces `@champion`. Read by the
    flow after evaluation only, so changing it reruns no stage."""

    metric: Literal["accuracy_mean", "accuracy_think", "accuracy_nothink", "accuracy_mean_sampled",
                    "accuracy_think_sampled", "accuracy_nothink_sampled", "reward_mean", "reward_think",
                    "reward_nothink", "gold_mean", "gold_think", "gold_nothink"] = "accuracy_mean"
    """eval.json metric compared on the held-out prompts; `accuracy_mean` is the two-mode average
    of greedy accuracy. `*_sampled` metrics need `evaluate.n_samples` > 0. `reward_*`: the mean
    reward-model score of the greedy final answers (`pairs.reward_model`), for held-out prompts
    without answers. `gold_*`: the judged task's hidden gold grade of the greedy answers (what
    its experiments compare; a real task has no gold scorer)."""
    margin: float = 0.0
    """The candidate is promoted when its score minus the champion's exceeds this (accuracy
    units: 0.01 is one point). Negative values promote a candidate that is not much worse."""
    require_interval: bool = False
    """Also require the lower end of the paired 95% interval (per held-out prompt, candidate
    minus champion) to exceed `margin`: promote only on evidence, not on a lucky draw."""

    def check(self, base_dir: Path | None) -> None:
        _check(-1.0 <= self.margin < 1.0 or self.metric.startswith("reward"), "promotion.margin",
               "a number in [-1, 1) (accuracy units)", self.margin)


@dataclass
class StackConfig:
    """Shared servers for a team (`bvpo stack up` starts them on one machine). Exported
    `MLFLOW_TRACKING_URI` / `PREFECT_API_URL` win over these; without either, a project uses its
    local stack while it is up, else mlruns/ and a temporary Prefect server. Never put a password
    here: PostgreSQL clients read `PGPASSWORD` or the file `PGPASSFILE` names."""

    tracking_uri: str | None = None
    """An MLflow tracking server every clone logs to and registers in (http://mlflow.example:5000)."""
    prefect_api_url: str | None = None
    """A Prefect server's API (http://prefect.example:4200/api): deployments, schedules and the
    one-round-at-a-time limit live there."""
    work_pool: str | None = None
    """The Prefect work pool `bvpo schedule` deploys to (its workers run the rounds); None: the
    local stack's pool while it is up, else the schedule is served in-process."""
    dvc_remote: str | None = None
    """Where each round's DVC outputs are pushed (`dvc push`) when it finishes: the name of a remote
    in .dvc/config, or a path or URL (s3://, gs://, ssh://), added as the project's default remote
    `bvpo`. Another clone then `dvc pull`s round N's data. None: the project's default DVC remote
    (`dvc remote add -d`) if it has one, else nothing is pushed."""

    def check(self, base_dir: Path | None) -> None:
        for name in ("tracking_uri", "prefect_api_url"):
            value = getattr(self, name)
            _check(value is None or "://" in value, f"stack.{name}", "a URL (http://host:port...)", value)
        for name in ("tracking_uri", "prefect_api_url", "dvc_remote"):
            value = getattr(self, name)
            _check(value is None or urllib.parse.urlsplit(value).password is None, f"stack.{name}",
                   "a URL without a password (use PGPASSWORD, a password file or the service's own credentials)",
                   "a URL with a password")


def _experiment_methods() -> dict[str, MethodConfig]:
    return {
        "bvpo": MethodConfig(alpha=0.5),
        "bvpo_auto": MethodConfig(alpha="auto"),
        "dpo_think": MethodConfig(alpha=1.0),
        "dpo_nothink": MethodConfig(alpha=0.0),
        "nll_control": MethodConfig(alpha=0.5, preference_weight=0.0),
        "bvpo_ipo": MethodConfig(alpha=0.5, loss_type="ipo"),
    }


@dataclass
class ExperimentConfig:
    name: str = "bvpo-experiment"
    """Experiment name: the MLflow parent run, the DVC experiment names (NAME-seedN) and the
    rows of metrics/experiment.json."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One run per seed: the seed sets `sample.seed` and `train.seed` (sampling and data order);
    prompts and the base model are shared by every run."""
    methods: dict[str, MethodConfig] = field(default_factory=_experiment_methods)
    """Methods trained in every run (replacing `train.methods` there); `base` is always evaluated."""
    reference_method: str = "bvpo"
    """Every other model's paired difference (same seed, same pairs) is taken against this one."""
    n_test: int = 1000
    """Held-out prompts of the embedded task in every run (sets `data.n_test`): one binomial
    standard error is about ±1.5 points at 1,000, ±3 at 256."""
    eval_samples: int = 4
    """Sampled completions per prompt and mode in every run's evaluation (sets
    `evaluate.n_samples`), for the sampled accuracy beside the greedy one."""
    round_methods: list[str] = field(default_factory=lambda: ["bvpo", "nll_control"])
    """Methods that `bvpo experiment --rounds N` carries on for rounds 2..N (each from its own
    newest model, per seed); the first is the reference of the rounds table. Checked against
    `methods` only when rounds are asked for."""
    judged_train_steps: int | None = 200
    """`train.steps` of every run on the judged task (`--task judged`); null keeps `train.steps`.
    Half the arithmetic recipe's 400: the same gold grades within their intervals, half the
    training time (the experiment fits an hour on 2 cores), and the ~70%-accurate judge a little
    less over-optimised (docs/results.md, "The judged task")."""

    def check(self, base_dir: Path | None) -> None:
        _check(_is_name(self.name), "experiment.name", "a name of letters, digits, '_' or '-'", self.name)
        _check(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
               "experiment.seeds", "at least 2 distinct integers >= 0 (an interval needs two runs)", self.seeds)
        _check_methods(self.methods, "experiment.methods", reserved=("base",))
        _check(self.reference_method in self.methods, "experiment.reference_method",
               f"one of experiment.methods {sorted(self.methods)}", self.reference_method)
        _check(self.n_test >= 1, "experiment.n_test", "an integer >= 1", self.n_test)
        _check(self.eval_samples >= 0, "experiment.eval_samples", "an integer >= 0", self.eval_samples)
        _check(self.judged_train_steps is None or self.judged_train_steps >= 1, "experiment.judged_train_steps",
               "null or an integer >= 1", self.judged_train_steps)


@dataclass
class Params:
    seed: int = 0
    """Seeds every generator: the task, initialisation, sampling, data order."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    stack: StackConfig = field(default_factory=StackConfig)

    @property
    def sample_seed(self) -> int:
        return self.seed if self.sample.seed is None else self.sample.seed

    @property
    def train_seed(self) -> int:
        return self.seed if self.train.seed is None else self.train.seed

    def ranking_reward_model(self) -> str | None:
        """The reward model that ranks samples into pairs: `pairs.reward_model`, or on the judged
        task the one its reward_model stage trains; None when nothing needs one."""
        if self.pairs.reward_model is not None:
            return self.pairs.reward_model
        return PATHS["reward_model"] if self.data.task == "judged" else None

    def judging_reward_model(self) -> str | None:
        """The reward model that judges evaluation's answers (win rates, `reward_*`): on the judged
        task the one that ranked the pairs, so that the proxy-vs-gold gap measures that proxy;
        else `evaluate.win_rate_reward_model`, else the ranking one."""
        if self.data.task == "judged":
            return self.ranking_reward_model()
        return self.evaluate.win_rate_reward_model or self.ranking_reward_model()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce one YAML value to its declared type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for candidate in non_none:
            try:
                return _convert(value, candidate, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args
        return {str(k): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 5e-5 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf and .nan pass every range check
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown parameter {prefix}{unknown[0]}: expected one of {sorted(known)}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def validate(params: Params, base_dir: Path | None = None) -> Params:
    """Range checks that types alone cannot express: each section checks itself (`check`), then
    what spans sections. Raises ConfigError naming the field. `base_dir`: the params file's folder,
    against which relative file names resolve."""
    _check(params.seed >= 0, "seed", "an integer >= 0", params.seed)
    for section in (getattr(params, f.name) for f in dataclasses.fields(params)):
        if dataclasses.is_dataclass(section):
            section.check(base_dir)
    p, e, metric = params.pairs, params.evaluate, params.promotion.metric
    judged = params.data.task == "judged"
    if judged:
        _check(p.reward in ("model", "verified_model") and p.reward_model is None, "pairs.reward",
               "model with pairs.reward_model null for data.task judged (the reward_model stage trains the "
               "reward model that ranks the samples)", f"{p.reward} with reward_model {p.reward_model!r}")
    else:
        _check(p.reward not in ("model", "verified_model") or p.reward_model is not None, "pairs.reward_model",
               f"a reward model directory (pairs.reward is {p.reward!r})", p.reward_model)
    judge = params.judging_reward_model()
    _check(e.win_rate_prompts is None or judge is not None, "evaluate.win_rate_reward_model",
           "a reward model directory (or pairs.reward_model) for evaluate.win_rate_prompts", judge)
    _check(not metric.startswith("reward") or judge is not None, "pairs.reward_model",
           f"a reward model directory for promotion.metric {metric}", judge)
    _check(not judged or e.win_rate_reward_model is None, "evaluate.win_rate_reward_model",
           "null for data.task judged (it judges with the reward model it trains)", e.win_rate_reward_model)
    _check(not metric.startswith("gold") or judged, "promotion.metric",
           "a metric other than gold_* (only data.task judged has a gold scorer)", metric)
    _check(not metric.endswith("_sampled") or e.n_samples > 0, "evaluate.n_samples",
           f"> 0 for promotion.metric {metric}", e.n_samples)
    _check(params.tracking.register_method in params.train.methods, "tracking.register_method",
           f"one of train.methods {sorted(params.train.methods)}", params.tracking.register_method)
    if params.data.source == "synthetic" and params.model.path is None:
        _check_task_fits(params)
    return params


def _check_accelerate_config(config_file: str, base_dir: Path | None, gradient_checkpointing: bool = False,
                             compile_layers: bool = False) -> None:
    path = Path(config_file)
    if base_dir is not None and not path.is_absolute() and not path.is_file():
        path = base_dir / path
    _check(path.is_file(), "train.accelerate_config", "an existing accelerate config file", config_file)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"train.accelerate_config: {path} is not a readable YAML file ({err})") from None
    kind = raw.get("distributed_type") if isinstance(raw, dict) else None
    _check(kind != "DEEPSPEED", "train.accelerate_config",
           "a DDP or FSDP config (DeepSpeed steps its engine on every backward pass, but a BVPO step runs "
           "several and clips the mixed gradient itself)", config_file)
    fsdp = raw.get("fsdp_config") if kind == "FSDP" else None
    # accelerate reads the key with or without its fsdp_ prefix.
    fsdp_checkpoints = isinstance(fsdp, dict) and any(
        str(fsdp.get(key)).lower() == "true" for key in ("fsdp_activation_checkpointing", "activation_checkpointing"))
    _check(not (gradient_checkpointing and fsdp_checkpoints), "train.gradient_checkpointing",
           f"false while {config_file} sets fsdp_activation_checkpointing (FSDP already recomputes each layer; "
           "both would recompute every layer twice: keep one of them)", gradient_checkpointing)
    # As accelerate reads it: a top-level `dynamo_backend` (older files) wins over dynamo_config's
    # `dynamo_backend`, which may also be written without its prefix.
    dynamo = (raw.get("dynamo_config") if isinstance(raw, dict) else None) or {}
    dynamo = dynamo if isinstance(dynamo, dict) else {}
    backend = str((raw if isinstance(raw, dict) else {}).get("dynamo_backend")
                  or dynamo.get("dynamo_backend") or dynamo.get("backend") or "NO").upper()
    _check(not (compile_layers and backend != "NO"), "train.compile",
           f"false while {config_file} sets dynamo_config (dynamo_backend {backend}: accelerate compiles the whole "
           "model; train.compile compiles its layers; keep one of them)", compile_layers)
    _check(not (compile_layers and kind == "FSDP"), "train.compile",
           f"false with the FSDP config {config_file} (FSDP's activation checkpointing would wrap the compiled "
           "layers; not supported): use it with DDP", compile_layers)


def _check_task_fits(params: Params) -> None:
    """The embedded task's longest prompt plus the generation budget must fit the model's
    context, or samples would be scored without their prompt (and then skipped)."""
    from .chat import build_tokenizer, render_prompt
    from .data import longest_prompt

    tokenizer = build_tokenizer()
    text = longest_prompt(params.data.max_ops)
    prompt_tokens = max(len(tokenizer(render_prompt(tokenizer, text, thinking), add_special_tokens=False).input_ids)
                        for thinking in (True, False))
    budget = max(params.sample.max_new_tokens, params.evaluate.max_new_tokens)
    _check(prompt_tokens + budget <= params.model.max_length, "model.max_length",
           f"at least {prompt_tokens + budget} (the task's longest prompt, {prompt_tokens} tokens, plus "
           f"max_new_tokens {budget})", params.model.max_length)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate params.yaml. Relative files resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path}: not found (expected a YAML file of parameters)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"params file {path}: not valid UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"params file {path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params file {path}: expected a mapping at the top level")
    params = _build(Params, raw, "")
    return validate(params, base_dir=path.resolve().parent)
