"""Preflight: what can be checked before any sampling, for any model.

A real run fails late in four ways this catches in seconds: a chat template that cannot run
both modes (`chat.check_thinking_template`), prompts that with `max_new_tokens` do not fit
`model.max_length` (the samples would be generated, then skipped in training), a sampling
batch whose KV cache does not fit the device, and training settings the model class or machine
cannot run (`train.gradient_checkpointing`, `train.compile`). It also refuses settings that need answers the
prompts do not have. `bvpo check` runs it; the flow runs it before the first stage, and the
sample stage sizes its batch with the same estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Params

# Sequences generated at once when `sample.batch_size: auto` and memory allows more.
AUTO_BATCH_CEILING = 256
# Share of the free memory the sampling batch may plan to use (the rest: activations, allocator slack).
MEMORY_SHARE = 0.8
# Where DVC looks for users' files: the prepare stage depends on data/inputs/, evaluate on data/benchmarks/.
INPUT_FOLDERS = {"prompts": "data/inputs", "benchmarks": "data/benchmarks"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Sizes:
    """What the memory estimate needs from a model's config."""

    layers: int
    kv_heads: int
    head_dim: int
    context: int | None  # max_position_embeddings

    @classmethod
    def of(cls, config) -> "Sizes":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   getattr(config, "max_position_embeddings", None))

    def kv_bytes(self, tokens: int, dtype: str) -> int:
        """Keys and values of every layer for `tokens` cached tokens."""
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype] * tokens


def free_memory(device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the machine's available RAM."""
    import torch

    import psutil

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available  # reclaimable page cache counts as available


def sampling_batch(setting: int | str, sizes: Sizes, sequence_tokens: int, dtype: str, free_bytes: int,
                   where: str = "sample.batch_size") -> int:
    """The sampling batch: `setting` if its KV cache (each sequence `sequence_tokens` long) fits
    in MEMORY_SHARE of `free_bytes`, else a clear error naming one that does; for `auto`, the
    largest that fits (at most AUTO_BATCH_CEILING). Model weights must already be in memory."""
    per_sequence = sizes.kv_bytes(sequence_tokens, dtype)
    fits = int(MEMORY_SHARE * free_bytes // per_sequence)
    if fits < 1:
        raise ConfigError(f"{where}: not even one sequence of {sequence_tokens} tokens fits: its KV cache needs "
                          f"{per_sequence / 2**30:.2f} GiB and {free_bytes / 2**30:.1f} GiB are free. Lower "
                          "sample.max_new_tokens or use a larger GPU")
    if setting == "auto":
        return min(AUTO_BATCH_CEILING, fits)
    if setting > fits:
        raise ConfigError(f"{where}: {setting} sequences of up to {sequence_tokens} tokens need "
                          f"{setting * per_sequence / 2**30:.1f} GiB of KV cache ({dtype}), but "
                          f"{free_bytes / 2**30:.1f} GiB are free here: set sample.batch_size to {fits} or less, "
                          "or to auto (the largest that fits)")
    return setting


def prompt_tokens(tokenizer, prompts: list, thinking: bool) -> list[int]:
    """Rendered prompt lengths in tokens in one mode."""
    from .chat import render_prompt

    return [len(tokenizer(render_prompt(tokenizer, p, thinking), add_special_tokens=False).input_ids)
            for p in prompts]


def check_fit(lengths: dict[bool, list[int]], params: Params) -> None:
    """Refuse a run whose prompts plus `sample.max_new_tokens` overflow the mode's length limit
    for more than `train.max_skipped_fraction` of them (their samples would all be skipped).
    With `model.max_length_nothink` set, a no-thinking prompt needs only room for an answer:
    that limit is tighter than the generation budget on purpose (a runaway answer is skipped)."""
    m, s, t = params.model, params.sample, params.train
    for thinking, values in lengths.items():
        limit = m.max_length_for(thinking)
        own_limit = not thinking and m.max_length_nothink is not None
        name = "model.max_length_nothink" if own_limit else "model.max_length"
        budget = 1 if own_limit else s.max_new_tokens
        over = sum(n + budget > limit for n in values)
        if values and over / len(values) > t.max_skipped_fraction:
            longest = max(values)
            needs = "leave no room for an answer within" if own_limit else \
                f"plus sample.max_new_tokens={s.max_new_tokens} exceed"
            raise ConfigError(
                f"{name}: {over} of {len(values)} prompts ({'thinking' if thinking else 'no thinking'}) {needs} "
                f"{limit} tokens, more than train.max_skipped_fraction={t.max_skipped_fraction}: their samples would "
                f"be generated, then skipped in training. Set {name} to at least {longest + budget} (the longest "
                f"prompt is {longest} tokens)" + ("" if own_limit else ", or lower sample.max_new_tokens"))


def _user_files(params: Params) -> dict[str, list[str]]:
    d, e = params.data, params.evaluate
    prompts = [f for f in (d.source, d.test_source) if f and f != "synthetic"]
    benchmarks = list(e.benchmarks.values()) + ([e.win_rate_prompts] if e.win_rate_prompts else [])
    return {"prompts": prompts, "benchmarks": benchmarks}


def untracked_inputs(params: Params, root: Path) -> list[str]:
    """Notes for users' files that DVC does not watch (outside data/inputs/ and data/benchmarks/)."""
    notes = []
    for kind, files in _user_files(params).items():
        folder = (root / INPUT_FOLDERS[kind]).resolve()
        for name in files:
            path = (root / name).resolve()
            if not path.is_relative_to(folder):
                notes.append(f"{name} is outside {INPUT_FOLDERS[kind]}/: the pipeline reads it, but DVC does not "
                             f"rerun a stage when it changes. Move it into {INPUT_FOLDERS[kind]}/ for that")
    return notes


def _prompts(params: Params, root: Path) -> tuple[list, bool, bool]:
    """The training and held-out prompts the run will use (the embedded task: its longest
    prompt), with the system prompt applied; and whether the training prompts and the held-out
    ones have answers."""
    from .data import longest_prompt, read_prompts_file, with_system_prompt

    d = params.data
    if d.source == "synthetic":
        return [longest_prompt(d.max_ops)], True, True
    rows = read_prompts_file(root / d.source)
    train_answers = test_answers = "answer" in rows.column_names
    prompts = list(rows["prompt"])
    if d.test_source:
        test = read_prompts_file(root / d.test_source)
        test_answers = "answer" in test.column_names
        prompts += list(test["prompt"])
    return [with_system_prompt(p, d.system_prompt) for p in prompts], train_answers, test_answers


def check_answers(params: Params, train_answers: bool, has_answers: bool) -> None:
    """Settings that need answers (or their absence) against what the prompts have: the reward
    grades the training prompts' samples, the promotion metric scores the held-out prompts."""
    if not train_answers and params.pairs.reward in ("verified", "graded", "verified_model"):
        raise ConfigError(f"pairs.reward: {params.pairs.reward} grades answers against an 'answer' column, which "
                          f"{params.data.source} does not have: set pairs.reward: model (and pairs.reward_model), "
                          "or add answers")
    metric = params.promotion.metric
    if not has_answers and metric.startswith("accuracy"):
        raise ConfigError(f"promotion.metric: {metric} needs held-out prompts with answers; these have none, so "
                          "evaluation judges answers with the reward model: set promotion.metric: reward_mean")
    if has_answers and metric.startswith("reward"):
        raise ConfigError(f"promotion.metric: {metric} is for held-out prompts without answers; these have "
                          "answers, so evaluation measures accuracy: use an accuracy_* metric")


def missing_dvc_params(root: Path, params_file: Path) -> list[str]:
    """Params that dvc.yaml's stages read but `params_file` does not spell out. The loader fills
    defaults for them; DVC does not, and would stop at the first stage that reads one (a params
    file written before this version of the pipeline added the key)."""
    import yaml

    dvc_file = root / "dvc.yaml"
    if not dvc_file.is_file() or not params_file.is_file():
        return []
    raw = yaml.safe_load(params_file.read_text()) or {}
    missing = set()
    for stage in (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}).values():
        for entry in stage.get("params", []):
            for name in [entry] if isinstance(entry, str) else [k for keys in entry.values() for k in keys]:
                node = raw
                for part in name.split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.add(name)
                        break
                    node = node[part]
    return sorted(missing)


def run(params: Params, project_dir: Path | str = ".", params_file: Path | str | None = None) -> list[str]:
    """Every check; returns notes to show (nothing wrong), raises ConfigError or ModelError.
    `params_file` (default the project's params.yaml) is checked against dvc.yaml's params."""
    from transformers import AutoConfig

    from .chat import build_tokenizer
    from .modeling import check_training_support, hub_kwargs, load_tokenizer, pick_device, resolve_dtype, tiny_config

    root = Path(project_dir).resolve()
    params_path = Path(params_file) if params_file is not None else root / "params.yaml"
    missing = missing_dvc_params(root, params_path)
    if missing:
        raise ConfigError(f"{params_path}: no {', '.join(missing)}, which dvc.yaml's stages read (a params file "
                          "from before this version added them): add them with their defaults (the shipped "
                          "params.yaml has every key; src/bvpo/config.py documents each), e.g. `data: {task: "
                          "arithmetic}` and an empty `reward_model: {}` section")
    notes = untracked_inputs(params, root)
    m, s = params.model, params.sample
    if m.path is None:
        tokenizer = build_tokenizer()
        config = tiny_config(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.max_length)
    else:
        local = root / m.path
        path = str(local.resolve()) if local.exists() else m.path
        tokenizer = load_tokenizer(path)  # the template check
        config = AutoConfig.from_pretrained(path, **hub_kwargs(path))
    prompts, train_answers, test_answers = _prompts(params, root)
    check_answers(params, train_answers, test_answers)
    lengths = {thinking: prompt_tokens(tokenizer, prompts, thinking) for thinking in (True, False)}
    check_fit(lengths, params)
    sizes = Sizes.of(config)
    longest = max(max(v) for v in lengths.values())
    if sizes.context is not None and longest + max(s.max_new_tokens, params.evaluate.max_new_tokens) > sizes.context:
        raise ConfigError(f"sample.max_new_tokens / evaluate.max_new_tokens: the longest prompt ({longest} tokens) plus "
                          f"{max(s.max_new_tokens, params.evaluate.max_new_tokens)} new tokens exceeds the model's "
                          f"context of {sizes.context} tokens (max_position_embeddings)")
    t = params.train
    if t.gradient_checkpointing or t.compile:  # else the train stage would say so after sampling
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            shape = AutoModelForCausalLM.from_config(config)
        check_training_support(shape, t.gradient_checkpointing, t.compile, pick_device().type)
    if s.backend == "hf":
        device = pick_device()
        dtype = resolve_dtype(m.dtype, device)
        weights = _weight_bytes(m.path, root, dtype)  # not loaded yet: the batch shares memory with them
        batch = sampling_batch(s.batch_size, sizes, longest + s.max_new_tokens, dtype,
                               max(free_memory(device) - weights, 0))
        notes.append(f"sampling: batch {batch} of up to {longest + s.max_new_tokens} tokens on {device.type} needs "
                     f"{batch * sizes.kv_bytes(longest + s.max_new_tokens, dtype) / 2**30:.2f} GiB of KV cache ({dtype})")
    return notes


def _weight_bytes(path: str | None, root: Path, dtype: str) -> int:
    """The model's weights in `dtype`, from its safetensors files (0 where unknown: a hub id)."""
    if path is None:
        return 0
    folder = root / path
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return 0
    import json

    stored = 4
    config = folder / "config.json"
    if config.is_file():  # config.json names the torch dtype
        raw = json.loads(config.read_text())
        stored = {"bfloat16": 2, "float16": 2}.get(str(raw.get("dtype") or raw.get("torch_dtype")), 4)
    return sum(f.stat().st_size for f in files) * DTYPE_BYTES[dtype] // stored
