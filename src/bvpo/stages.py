"""The pipeline stages: params + input paths → output paths. DVC and Prefect both call these.

Each stage writes its outputs under a temporary name and renames them at the end, so a failed
stage leaves nothing that looks finished. Stages record child runs in MLflow (via `tracking`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from . import tracking
from .config import Params

# Where each stage reads and writes, relative to the project root; dvc.yaml uses the same.
PATHS = {
    "prompts": "data/prompts",
    "base_model": "data/base_model",
    "champion": "data/champion.json",
    "policy": "data/policy",
    "inbox": "data/incoming",
    "samples": "data/samples",
    "pairs": "data/pairs",
    "models": "data/models",
    "eval": "metrics/eval.json",
    "eval_plot": "metrics/eval.png",
    "eval_prompts": "data/eval_prompts.json",
    "diagnostics": "metrics/diagnostics.json",
    "train_plots": "metrics/train",
    "checkpoints": "data/checkpoints",
    "cache": "data/cache",
    "experiment": "metrics/experiment.json",
    "experiment_plot": "metrics/experiment.png",
    "experiment_table": "metrics/experiment.md",
}
STAGES = ("prepare", "warmup", "policy", "sample", "pairs", "train", "evaluate", "analyze")


class StageError(RuntimeError):
    """A stage cannot run on its inputs. The message names what is wrong."""


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `final`, on failure it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _project(p: Path | str | None) -> Path:
    return Path(p or ".").resolve()


def _mode_name(thinking: bool) -> str:
    return "think" if thinking else "nothink"


# --------------------------------------------------------------------------------- prepare
def prepare(params: Params, project_dir: Path | str = ".") -> Path:
    """Prompts as a datasets DatasetDict (train/test) on disk."""
    from datasets import DatasetDict

    from .data import read_prompts_file, synthetic_prompts, with_system_prompt

    root = _project(project_dir)
    d = params.data
    if d.source == "synthetic":
        prompts = synthetic_prompts(d.n_train, d.n_test, d.min_ops, d.max_ops, params.seed,
                                    (d.min_operand, d.max_operand), d.small_operand_fraction)
    else:
        train = read_prompts_file(root / d.source)
        if d.test_source:
            prompts = DatasetDict(train=train, test=read_prompts_file(root / d.test_source))
        else:
            split = train.train_test_split(test_size=d.test_fraction, seed=params.seed)
            prompts = DatasetDict(train=split["train"], test=split["test"])
    if d.system_prompt is not None:
        prompts = DatasetDict({split: rows.map(lambda row: {"prompt": with_system_prompt(row["prompt"], d.system_prompt)})
                               for split, rows in prompts.items()})
    out = root / PATHS["prompts"]
    with tracking.stage_run(root, params.tracking.experiment, "prepare", params={"data": params.to_dict()["data"]}):
        with atomic_path(out) as tmp:
            prompts.save_to_disk(str(tmp))
        tracking.log_metrics({"n_train": len(prompts["train"]), "n_test": len(prompts["test"])})
    return out


def _load_samples(root: Path) -> list[dict]:
    from datasets import load_from_disk

    path = root / PATHS["samples"]
    if not path.is_dir():
        raise StageError(f"{path}: no samples (run the sample stage first)")
    return load_from_disk(str(path)).to_list()


def _load_prompts(root: Path):
    from datasets import load_from_disk

    path = root / PATHS["prompts"]
    if not path.is_dir():
        raise StageError(f"{path}: no prompts (run the prepare stage first)")
    return load_from_disk(str(path))


# --------------------------------------------------------------------------------- warmup
def warmup(params: Params, project_dir: Path | str = ".") -> Path:
    """The starting policy: the SFT'd embedded model, or a pointer to `model.path`."""
    from .modeling import load_tokenizer, resolve_precision, save_model, write_model_pointer
    from .warmup import sft_tiny_model

    root = _project(project_dir)
    out = root / PATHS["base_model"]
    if params.model.path is not None:
        local = root / params.model.path
        target = str(local.resolve()) if local.exists() else params.model.path
        with atomic_path(out) as tmp:
            write_model_pointer(target, tmp)
            load_tokenizer(tmp)  # refuse a model without a thinking template now, not mid-pipeline
        return out
    prompts = _load_prompts(root)
    with tracking.stage_run(root, params.tracking.experiment, "warmup",
                            params={"model": params.to_dict()["model"], "warmup": params.to_dict()["warmup"]}):
        model, tokenizer, history, seconds = sft_tiny_model(params, set(prompts["test"]["prompt"]))
        with atomic_path(out) as tmp:
            save_model(model, tokenizer, tmp)
            precision = resolve_precision(params.warmup.mixed_precision, next(model.parameters()).device)
            _write_json(tmp / "warmup_summary.json", {"seconds": seconds, "final_loss": history[-1]["loss"],
                                                      "steps": len(history), "mixed_precision": precision})
        tracking.log_history(history)
        tracking.log_metrics({"seconds": seconds, "n_parameters": sum(p.numel() for p in model.parameters())})
        tracking.set_tags({"mixed_precision": precision})
    return out


# --------------------------------------------------------------------------------- policy
def read_champion_pointer(root: Path) -> dict:
    """data/champion.json: which registered version this round starts from (version null = the
    base model). The flow writes it from the registry's `@champion` before the stages run; it is
    an input of the pipeline, never an output, so rounds make no dependency cycle."""
    path = root / PATHS["champion"]
    if not path.is_file():
        return {"registered_model": None, "version": None}
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err.msg}); expected "
                         '{"registered_model": "<name>", "version": "<n>" or null}') from None
    if not isinstance(pointer, dict) or "version" not in pointer or (
            pointer["version"] is not None and not pointer.get("registered_model")):
        raise StageError(f"{path}: expected {{\"registered_model\": \"<name>\", \"version\": \"<n>\" or null}}, "
                         f"got {pointer!r}")
    return pointer


def policy(params: Params, project_dir: Path | str = ".") -> Path:
    """The round's starting policy (and reference): the base model, or the registered version
    that data/champion.json names, fetched from the MLflow registry."""
    from .modeling import load_tokenizer

    root = _project(project_dir)
    pointer = read_champion_pointer(root)
    out = root / PATHS["policy"]
    with atomic_path(out) as tmp:
        if pointer["version"] is None:
            # A copy, not a pointer to data/base_model: DVC may restore this output into another
            # workspace (`dvc exp run --temp`), where an absolute path would be stale. A base
            # model given by `model.path` is itself a small pointer file, copied as is.
            base = root / PATHS["base_model"]
            if not base.is_dir():
                raise StageError(f"{base}: no base model (run the warmup stage first)")
            shutil.copytree(base, tmp)
        else:
            tracking.download_model_version(root, pointer["registered_model"], str(pointer["version"]), tmp)
        load_tokenizer(tmp)  # a champion without a thinking template is refused here
    return out


def _training_prompts(root: Path, system_prompt: str | None) -> tuple[list, list[str], dict]:
    """The prepared training prompts plus every prompts file in the inbox (data/incoming), with
    their answers ("" where there are none)."""
    from .data import prompt_key, read_inbox, with_system_prompt

    prompts = _load_prompts(root)
    train = prompts["train"]
    needs_answer = "answer" in train.column_names
    held_out = {prompt_key(p) for p in prompts["test"]["prompt"]}
    texts = list(train["prompt"])
    answers = list(train["answer"]) if needs_answer else [""] * len(texts)
    arrived, stats = read_inbox(root / PATHS["inbox"], held_out, needs_answer)
    if arrived is not None:
        texts += [with_system_prompt(p, system_prompt) for p in arrived["prompt"]]
        answers += list(arrived["answer"]) if needs_answer else [""] * len(arrived)
    return texts, answers, stats


# --------------------------------------------------------------------------------- sample
def sample(params: Params, project_dir: Path | str = ".", params_file: str | Path = "params.yaml") -> Path:
    """K completions per training prompt (inbox prompts included) with thinking on and K with it
    off, from the round's policy, in resumable shards (`bvpo.sampling`), sharded over
    `sample.num_processes` processes with the `hf` backend."""
    from datasets import Dataset

    from . import sampling
    from .modeling import pick_device
    from .runtime import files_digest

    root = _project(project_dir)
    s = params.sample
    policy_dir = root / PATHS["policy"]
    prompts, answers, inbox_stats = _training_prompts(root, params.data.system_prompt)
    key = sampling.work_key(params, files_digest(policy_dir), prompts, answers)
    shard_dir = root / PATHS["cache"] / f"samples-{key}"
    n_shards = len(sampling.plan(len(prompts), s.shard_prompts))
    reused = sum(1 for _ in shard_dir.glob("*.jsonl")) if shard_dir.is_dir() else 0
    if reused:
        print(f"sample: resuming, {reused} of {n_shards} shards already in {shard_dir}", flush=True)
    out = root / PATHS["samples"]
    with tracking.stage_run(root, params.tracking.experiment, "sample", params={"sample": params.to_dict()["sample"]}):
        start = time.perf_counter()
        try:
            if s.num_processes > 1:
                shard_dir.mkdir(parents=True, exist_ok=True)
                _write_json(shard_dir / sampling.PROMPTS_FILE, {"prompts": prompts, "answers": answers})
                params_path = Path(params_file) if Path(params_file).is_absolute() else root / params_file
                cmd, env = launch_command("bvpo.sampling", ["--params", str(params_path),
                                                            "--policy", str(policy_dir), "--shard-dir", str(shard_dir)],
                                          s.num_processes)
                result = subprocess.run(cmd, cwd=root, env=env)
                if result.returncode != 0:
                    raise StageError(f"sampling failed (exit {result.returncode}); its output is above. The "
                                     f"shards already written in {shard_dir} are reused by a rerun")
            else:
                sampling.run_shards(lambda: sampling.make_sampler(params, policy_dir, pick_device(), prompts), params,
                                    prompts, answers, shard_dir)
            rows = sampling.merge_shards(shard_dir, len(prompts), params)
        except sampling.SamplingError as err:
            raise StageError(str(err)) from None
        seconds = time.perf_counter() - start
        with atomic_path(out) as tmp:
            Dataset.from_list(rows).save_to_disk(str(tmp))
        # This run's shards, and those a killed run with other settings left (they could be GBs
        # with real traces); a rerun with those settings samples again.
        for stale in shard_dir.parent.glob("samples-*"):
            shutil.rmtree(stale, ignore_errors=True)
        metrics = {"seconds": seconds, "samples_per_s": len(rows) / seconds, "n_prompts": len(prompts),
                   "shards": n_shards, "shards_reused": reused, **inbox_stats}
        for mode in ("think", "nothink"):
            mine = [r for r in rows if r["mode"] == mode]
            metrics[f"{mode}/valid_rate"] = sum(r["valid"] for r in mine) / len(mine)
            metrics[f"{mode}/mean_tokens"] = sum(r["n_tokens"] for r in mine) / len(mine)
        tracking.log_metrics(metrics)
    return out


# --------------------------------------------------------------------------------- pairs
def score_samples(samples: list[dict], params: Params) -> None:
    """Set each sample's `reward` (invalid samples: 0, and they never enter a pair)."""
    from .modeling import pick_device
    from .rewards import REWARDS, combine_verified_and_model, reward_model, verified_reward

    kind = params.pairs.reward
    for r in samples:  # accuracy is reported whatever ranks the samples, when answers exist
        r["correct"] = verified_reward(r["response"], r["answer"]) if r["valid"] and r["answer"] else 0.0
    if kind in REWARDS:
        for r in samples:
            r["reward"] = REWARDS[kind](r["response"], r["answer"]) if r["valid"] else 0.0
        return
    valid = [r for r in samples if r["valid"]]
    model = reward_model(params.pairs.reward_model, params, str(pick_device()))
    # The prompt and the final answer only: the reward model judges what the user sees.
    scores = model.score([r["prompt"] for r in valid], [r["response"] for r in valid],
                         params.pairs.reward_batch_size)
    for r in samples:
        r["reward"] = 0.0
    for r, score in zip(valid, scores):
        r["reward"] = score if kind == "model" else combine_verified_and_model(r["correct"], score)


def pairs(params: Params, project_dir: Path | str = ".") -> Path:
    """Reward every sample and build D_t (think/) and D_e (nothink/)."""
    from datasets import Dataset

    from .pairs import build_pairs

    root = _project(project_dir)
    samples = _load_samples(root)
    if params.pairs.reward != "model" and not any(r["answer"] for r in samples):
        raise StageError(f"pairs.reward={params.pairs.reward} needs an 'answer' column in the prompts; "
                         f"{params.data.source} has none")
    score_samples(samples, params)
    built = build_pairs(samples, params.pairs.max_pairs_per_prompt)
    stats = {}
    for mode in ("think", "nothink"):
        mine = [r for r in samples if r["mode"] == mode]
        stats[f"{mode}/n_pairs"] = len(built[mode])
        stats[f"{mode}/sample_accuracy"] = sum(r["correct"] for r in mine) / max(len(mine), 1)
        stats[f"{mode}/mean_reward"] = sum(r["reward"] for r in mine) / max(len(mine), 1)
        stats[f"{mode}/invalid_rate"] = sum(not r["valid"] for r in mine) / max(len(mine), 1)
    out = root / PATHS["pairs"]
    with tracking.stage_run(root, params.tracking.experiment, "pairs", params={"pairs": params.to_dict()["pairs"]}):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            columns = ["prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"]
            for mode, rows in built.items():
                dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns})
                # An empty dataset saved with the default 0 shards cannot be loaded back.
                dataset.save_to_disk(str(tmp / mode), num_shards=None if rows else 1)
            _write_json(tmp / "stats.json", stats)
        tracking.log_metrics(stats)
    return out


# --------------------------------------------------------------------------------- train
def launch_command(module: str, module_args: list[str], num_processes: int, config_file: str | None = None,
                   mixed_precision: str = "fp32", threads_per_process: int | None = None,
                   ) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of `python -m <module>` on `num_processes` processes. On a CPU-only
    machine several processes need --multi_gpu plus ACCELERATE_USE_CPU (gloo); `--cpu
    --num_processes N` silently runs one. accelerate pins each process to ONE OpenMP thread
    unless told otherwise, so on a CPU the cores are shared out explicitly."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    on_cpu = not torch.cuda.is_available()
    if config_file:
        cmd += ["--config_file", config_file, "--num_processes", str(num_processes)]
    elif num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000)]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += ["--mixed_precision", "no" if mixed_precision == "fp32" else mixed_precision]
    if on_cpu:
        threads = threads_per_process or max(1, (os.cpu_count() or 1) // num_processes)
        cmd += ["--num_cpu_threads_per_process", str(threads)]
        # --multi_gpu only spawns the processes; without this each would work alone.
        env["ACCELERATE_USE_CPU"] = "true"
    return cmd + ["-m", module, *module_args], env


def accelerate_command(params: Params, module_args: list[str],
                       threads_per_process: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The train stage's launch: `train.num_processes`, `train.accelerate_config`, `train.mixed_precision`."""
    from .modeling import pick_device, resolve_precision

    t = params.train
    return launch_command("bvpo.train", module_args, t.num_processes, t.accelerate_config,
                          resolve_precision(t.mixed_precision, pick_device()), threads_per_process)


def train(params: Params, project_dir: Path | str = ".", params_file: str | Path = "params.yaml") -> Path:
    """Every method in `train.methods`, in one `accelerate launch` subprocess.

    Checkpoints and finished methods go to data/checkpoints/ (not a DVC output), so a rerun
    after a crash resumes there; only a complete run is moved into data/models at the end."""
    from .plots import gradient_telemetry, training_curves

    root = _project(project_dir)
    pairs_dir = root / PATHS["pairs"]
    if not pairs_dir.is_dir():
        raise StageError(f"{pairs_dir}: no pairs (run the pairs stage first)")
    work = root / PATHS["checkpoints"]
    # Relative to the project, as in `sample`: the subprocess must read the file `params` came
    # from, not whatever params.yaml the caller's working directory holds.
    params_path = Path(params_file) if Path(params_file).is_absolute() else root / params_file
    cmd, env = accelerate_command(params, [
        "--params", str(params_path.resolve()), "--pairs", str(pairs_dir),
        "--base", str(root / PATHS["policy"]), "--work", str(work),
        "--cache", str(root / PATHS["cache"]), "--project-dir", str(root),
    ])
    result = subprocess.run(cmd, cwd=root, env=env)
    if result.returncode != 0:
        raise StageError(f"training failed (exit {result.returncode}); its output is above. Checkpoints in "
                         f"{work} let a rerun resume")
    out = root / PATHS["models"]
    with atomic_path(out) as tmp, atomic_path(root / PATHS["train_plots"]) as plot_tmp:
        tmp.mkdir()
        plot_tmp.mkdir()
        for name in params.train.methods:
            shutil.move(str(work / name / "final" / "history.csv"), plot_tmp / f"{name}.csv")
            shutil.copytree(work / name / "final", tmp / name)
        training_curves(plot_tmp, plot_tmp / "curves.png")
        gradient_telemetry(plot_tmp, plot_tmp / "gradients.png")
    shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------- evaluate
def _accuracy(generated: list, answers: list[str], thinking: bool) -> tuple[list[float], int]:
    """Per prompt, the share of its completions (generated prompt-major: all prompts, then all
    again) with a verified answer (invalid ones count as wrong); and the number invalid."""
    from .rewards import verified_reward
    from .sequences import parse_completion

    correct, invalid = [0.0] * len(answers), 0
    repeats = len(generated) // len(answers)
    for i, g in enumerate(generated):
        parsed = parse_completion(g.text, thinking)
        if g.truncated or parsed.malformed:
            invalid += 1
            continue
        correct[i % len(answers)] += verified_reward(parsed.answer, answers[i % len(answers)]) / repeats
    return correct, invalid


def _score_prompts(model, tokenizer, prompts: list[str], answers: list[str], params: Params,
                   label: str) -> tuple[dict, dict]:
    """Greedy (and, with evaluate.n_samples, sampled) accuracy in both modes: the summary entry
    and the per-prompt scores."""
    import torch

    from .sequences import generate

    e = params.evaluate
    entry, scores = {}, {}
    for thinking in (True, False):
        mode = _mode_name(thinking)
        generated = generate(model, tokenizer, prompts, thinking, e.max_new_tokens, e.batch_size, greedy=True,
                             desc=f"evaluate {label} ({mode})")
        scores[f"accuracy_{mode}"], invalid = _accuracy(generated, answers, thinking)
        entry[f"mean_length_{mode}"] = sum(g.n_tokens for g in generated) / len(generated)
        entry[f"invalid_rate_{mode}"] = invalid / len(generated)
        if e.n_samples:
            # The same RNG stream for every model, so models differ by their weights only.
            torch.manual_seed(params.seed + (0 if thinking else 1))
            sampled = generate(model, tokenizer, prompts * e.n_samples, thinking, e.max_new_tokens, e.batch_size,
                               temperature=e.temperature, desc=f"evaluate {label} ({mode}, {e.n_samples} samples)")
            scores[f"accuracy_{mode}_sampled"], _ = _accuracy(sampled, answers, thinking)
    for key, values in scores.items():
        entry[key] = sum(values) / len(values)
    entry["accuracy_mean"] = (entry["accuracy_think"] + entry["accuracy_nothink"]) / 2
    if e.n_samples:
        entry["accuracy_mean_sampled"] = (entry["accuracy_think_sampled"] + entry["accuracy_nothink_sampled"]) / 2
    entry["n_prompts"] = len(prompts)
    return entry, scores


def _final_answers(model, tokenizer, prompts: list, params: Params, label: str) -> tuple[dict[str, list], dict]:
    """Greedy final answers (trace removed) in both modes, None where the completion is invalid;
    and their mean length and invalid rate per mode."""
    from .sequences import generate, parse_completion

    e, out, stats = params.evaluate, {}, {}
    for thinking in (True, False):
        mode = _mode_name(thinking)
        generated = generate(model, tokenizer, prompts, thinking, e.max_new_tokens, e.batch_size, greedy=True,
                             desc=f"answers {label} ({mode})")
        parsed = [parse_completion(g.text, thinking) for g in generated]
        out[mode] = [None if g.truncated or p.malformed else p.answer for g, p in zip(generated, parsed)]
        stats[f"mean_length_{mode}"] = sum(g.n_tokens for g in generated) / len(generated)
        stats[f"invalid_rate_{mode}"] = sum(a is None for a in out[mode]) / len(generated)
    return out, stats


def judge_answers(answers: dict[str, dict[str, list]], prompts: list, judge: str,
                  params: Params) -> dict[tuple[str, str], list]:
    """The reward model's score of every (model, mode) answer to every prompt; None where the
    answer is invalid (never shown to the judge)."""
    from .modeling import pick_device
    from .rewards import reward_model

    model = reward_model(judge, params, str(pick_device()))
    scores = {}
    for name, by_mode in answers.items():
        for mode, texts in by_mode.items():
            valid = [i for i, t in enumerate(texts) if t is not None]
            judged = model.score([prompts[i] for i in valid], [texts[i] for i in valid], params.pairs.reward_batch_size)
            column = [None] * len(texts)
            for i, value in zip(valid, judged):
                column[i] = value
            scores[(name, mode)] = column
    return scores


def win_rates(scores: dict[tuple[str, str], list], models: list[str], prefix: str = "") -> dict[str, dict[str, float]]:
    """Each model's reward-model win rate against `base` per mode: the share of prompts where the
    judge scores its answer above base's (ties half; an invalid answer loses to a valid one)."""

    def beats(a: float | None, b: float | None) -> float:
        if a is None or b is None:
            return 0.5 if a is None and b is None else float(b is None)
        return 1.0 if a > b else 0.5 if a == b else 0.0

    return {name: {f"{prefix}win_rate_{mode}": sum(beats(a, b) for a, b in zip(scores[(name, mode)], scores[("base", mode)]))
                   / len(scores[("base", mode)]) for mode in ("think", "nothink")}
            for name in models if name != "base"}


def reward_scores(scores: dict[tuple[str, str], list], models: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per-prompt reward of each model's greedy answers, an invalid answer scored as the worst
    answer the judge saw in this evaluation (so a model cannot gain by writing nothing)."""
    seen = [v for column in scores.values() for v in column if v is not None]
    floor = min(seen, default=0.0)
    return {name: {f"reward_{mode}": [floor if v is None else v for v in scores[(name, mode)]]
                   for mode in ("think", "nothink")} for name in models}


def with_instruction(prompt, instruction: str | None):
    """A benchmark prompt with the answer instruction appended to its (last) user turn."""
    if instruction is None:
        return prompt
    if isinstance(prompt, str):
        return f"{prompt}\n\n{instruction}"
    return [*prompt[:-1], {**prompt[-1], "content": f"{prompt[-1]['content']}\n\n{instruction}"}]


def _benchmarks(root: Path, params: Params) -> dict[str, tuple[list, list[str]]]:
    """Each benchmark's prompts (system prompt and answer instruction applied) and answers."""
    from .data import read_prompts_file, with_system_prompt

    out = {}
    for bench, path in params.evaluate.benchmarks.items():
        rows = read_prompts_file(root / path, prompt_columns=("prompt", "problem", "question", "messages"))
        if "answer" not in rows.column_names:
            raise StageError(f"evaluate.benchmarks.{bench}: {root / path} has no 'answer' column to check against")
        prompts = [with_system_prompt(with_instruction(p, params.evaluate.answer_instruction),
                                      params.data.system_prompt) for p in rows["prompt"]]
        out[bench] = (prompts, list(rows["answer"]))
    return out


def evaluate(params: Params, project_dir: Path | str = ".") -> Path:
    """Held-out prompts, thinking on and off, for the round's starting policy (`base`: the base
    model, or the champion it started from) and every method. With answers: accuracy, greedy
    and (evaluate.n_samples > 0) the mean over sampled completions (pass@1). Without: the
    reward model's mean score of the greedy answers (`reward_*`) and the win rate against
    `base` (`reward_win_rate_*`). Per-prompt scores go to data/eval_prompts.json for paired
    comparisons (the promotion gate). Each file in `evaluate.benchmarks` is scored for accuracy
    too, as `<name>/accuracy_*` keys, averaged over the benchmarks as `benchmarks/accuracy_*`."""
    from .data import read_prompts_file, with_system_prompt
    from .modeling import load_model, load_tokenizer, pick_device, resolve_dtype
    from .plots import eval_bar_chart

    root = _project(project_dir)
    test = _load_prompts(root)["test"]
    e = params.evaluate
    judge_path = e.win_rate_reward_model or params.pairs.reward_model
    has_answers = "answer" in test.column_names
    if not has_answers and judge_path is None:
        raise StageError("the held-out prompts have no 'answer' column, so evaluation needs a reward model to judge "
                         "the answers: set pairs.reward_model (or evaluate.win_rate_reward_model)")
    if e.n_prompts is not None:
        test = test.select(range(min(e.n_prompts, len(test))))
    benchmarks = _benchmarks(root, params)
    candidates = {"base": root / PATHS["policy"]}
    for name in params.train.methods:
        path = root / PATHS["models"] / name
        if not path.is_dir():
            raise StageError(f"{path}: no trained model for method {name!r} (run the train stage first)")
        candidates[name] = path
    results, per_prompt = {}, {}
    device = pick_device()
    prompts = list(test["prompt"])
    answers = list(test["answer"]) if has_answers else None
    win_prompts = None
    if e.win_rate_prompts:
        win_prompts = [with_system_prompt(p, params.data.system_prompt)
                       for p in read_prompts_file(root / e.win_rate_prompts)["prompt"]]
    held_out_answers, win_answers = {}, {}
    with tracking.stage_run(root, params.tracking.experiment, "evaluate",
                            params={"evaluate": params.to_dict()["evaluate"]}):
        for name, path in candidates.items():
            tokenizer = load_tokenizer(path)
            model = load_model(path, resolve_dtype(params.model.dtype, device), device)
            if has_answers:
                entry, per_prompt[name] = _score_prompts(model, tokenizer, prompts, answers, params, name)
            else:
                held_out_answers[name], entry = _final_answers(model, tokenizer, prompts, params, name)
                entry["n_prompts"] = len(prompts)
            per_bench = {}
            for bench, (bench_prompts, bench_answers) in benchmarks.items():
                per_bench[bench], _ = _score_prompts(model, tokenizer, bench_prompts, bench_answers, params,
                                                     f"{name} on {bench}")
                entry.update({f"{bench}/{k}": v for k, v in per_bench[bench].items() if k.startswith("accuracy")})
            for key in (per_bench[next(iter(per_bench))] if per_bench else {}):
                if key.startswith("accuracy"):
                    entry[f"benchmarks/{key}"] = sum(b[key] for b in per_bench.values()) / len(per_bench)
            if win_prompts:
                win_answers[name], _ = _final_answers(model, tokenizer, win_prompts, params, name)
            results[name] = entry
            del model
        if not has_answers:
            scores = judge_answers(held_out_answers, prompts, judge_path, params)
            per_prompt = reward_scores(scores, list(candidates))
            for name, columns in per_prompt.items():
                for key, values in columns.items():
                    results[name][key] = sum(values) / len(values)
                results[name]["reward_mean"] = (results[name]["reward_think"] + results[name]["reward_nothink"]) / 2
            for name, rates in win_rates(scores, list(candidates), prefix="reward_").items():
                results[name].update(rates)
        if win_prompts:
            for name, rates in win_rates(judge_answers(win_answers, win_prompts, judge_path, params),
                                         list(candidates)).items():
                results[name].update(rates)
        for name, entry in results.items():
            tracking.log_metrics({f"{name}/{k}": v for k, v in entry.items()})
        out = root / PATHS["eval"]
        with atomic_path(out) as tmp:
            _write_json(tmp, results)
        with atomic_path(root / PATHS["eval_prompts"]) as tmp:
            tmp.write_text(json.dumps({"prompts": prompts, "scores": per_prompt}) + "\n")
        with atomic_path(root / PATHS["eval_plot"]) as tmp:
            eval_bar_chart(results, tmp)
        tracking.log_artifact(out)
        tracking.log_artifact(root / PATHS["eval_plot"])
    return out


# --------------------------------------------------------------------------------- analyze
def analyze(params: Params, project_dir: Path | str = ".") -> Path:
    """The paper's trace diagnostics on the sampled completions, under the sampling policy."""
    from .diagnostics import trace_diagnostics
    from .modeling import THINK_CLOSE, load_model, load_tokenizer, pick_device, resolve_dtype
    from .sequences import collate, encode, fits, token_logps

    root = _project(project_dir)
    samples = _load_samples(root)
    tokenizer = load_tokenizer(root / PATHS["policy"])
    device = pick_device()
    model = load_model(root / PATHS["policy"], resolve_dtype(params.model.dtype, device), device)
    model.eval()
    encoded = [encode(tokenizer, r["prompt"], r["completion"], r["mode"] == "think") for r in samples]
    # A completion is only scored with its whole prompt; samples past their mode's limit are left out.
    kept = [i for i, e in enumerate(encoded) if fits(e, params.model.max_length_for(samples[i]["mode"] == "think"))]
    skipped = dict.fromkeys(("think", "nothink"), 0)
    for i in set(range(len(samples))) - set(kept):
        skipped[samples[i]["mode"]] += 1
    samples, encoded = [samples[i] for i in kept], [encoded[i] for i in kept]
    rows = []
    bs = params.analyze.batch_size
    order = sorted(range(len(samples)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        logps = token_logps(model, collate([encoded[i] for i in idx], tokenizer.pad_token_id)).cpu()
        for row, i in enumerate(idx):
            e, sample_row = encoded[i], samples[i]
            n = len(e.input_ids) - e.completion_start
            picked = logps[row, e.completion_start - 1:e.completion_start - 1 + n].tolist()
            n_trace = None
            if sample_row["mode"] == "think" and THINK_CLOSE in sample_row["completion"]:
                head = sample_row["completion"].split(THINK_CLOSE, 1)[0] + THINK_CLOSE
                n_trace = len(tokenizer(head, add_special_tokens=False).input_ids)
            rows.append({"prompt_id": sample_row["prompt_id"], "mode": sample_row["mode"],
                         "token_logps": picked, "n_trace_tokens": n_trace})
    result = trace_diagnostics(rows)
    out = root / PATHS["diagnostics"]
    with tracking.stage_run(root, params.tracking.experiment, "analyze"):
        with atomic_path(out) as tmp:
            _write_json(tmp, result)
        tracking.log_metrics({f"{group}/{k}": v for group, stats in result.items() for k, v in stats.items()})
        tracking.log_metrics({f"{mode}/skipped_too_long": n for mode, n in skipped.items()})
        tracking.log_artifact(out)
    return out


def run_stage(name: str, params: Params, project_dir: Path | str = ".", params_file: str | Path = "params.yaml") -> Path:
    if name in ("train", "sample"):
        return {"train": train, "sample": sample}[name](params, project_dir, params_file)
    functions = {"prepare": prepare, "warmup": warmup, "policy": policy, "sample": sample, "pairs": pairs,
                 "evaluate": evaluate, "analyze": analyze}
    if name not in functions:
        raise StageError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    return functions[name](params, project_dir)
