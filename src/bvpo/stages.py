"""The pipeline stages: params + input paths → output paths. DVC and Prefect both call these.

Each stage reads and writes the files `paths.PATHS` names, atomically (`paths.atomic_path`), and
records a child run in MLflow (via `tracking`). What a stage computes lives in the modules it
calls (data, sampling, pairs, train, evaluation, diagnostics); a stage is the I/O around it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from . import tracking
from .config import Params
from .errors import BvpoError
from .modes import MODES
from .paths import PATHS, atomic_path, project_root, read_champion_pointer, record_run_facts, write_json

STAGES = ("prepare", "warmup", "reward_model", "policy", "sample", "pairs", "train", "evaluate", "analyze")


class StageError(BvpoError, RuntimeError):
    """A stage cannot run on its inputs. The message names what is wrong."""


# --------------------------------------------------------------------------------- prepare
def prepare(params: Params, project_dir: Path | str = ".") -> Path:
    """Prompts as a datasets DatasetDict (train/test) on disk."""
    from datasets import DatasetDict

    from .data import read_prompts_file, synthetic_prompts, with_system_prompt

    root = project_root(project_dir)
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

    root = project_root(project_dir)
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
            write_json(tmp / "warmup_summary.json", {"final_loss": history[-1]["loss"], "steps": len(history),
                                                      "mixed_precision": precision})
        record_run_facts(root, "warmup", {"seconds": seconds})
        tracking.log_history(history)
        tracking.log_metrics({"seconds": seconds, "n_parameters": sum(p.numel() for p in model.parameters())})
        tracking.set_tags({"mixed_precision": precision})
    return out


# --------------------------------------------------------------------------------- reward_model
def reward_model(params: Params, project_dir: Path | str = ".") -> Path:
    """The judged task's reward model (`data.task: judged`): Bradley–Terry on noisy comparisons
    the hidden gold scorer labelled, from the base model's backbone (`reward_training`). Other
    tasks train none: the folder then holds a note saying so, and the metrics `trained: 0`."""
    root = project_root(project_dir)
    out, metrics_file = root / PATHS["reward_model"], root / PATHS["reward_model_metrics"]
    if params.data.task != "judged":
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "README.md").write_text(f"No reward model: data.task is {params.data.task}. The reward_model "
                                           "stage trains one for data.task: judged only.\n")
        with atomic_path(metrics_file) as tmp:
            write_json(tmp, {"trained": 0})
        return out
    # Here, not at the top: the other tasks' note needs no torch (a stage's imports are seconds).
    from .judged import comparisons
    from .reward_training import train_reward_model

    r = params.reward_model
    prompts = _load_prompts(root)["train"]
    texts, answers = list(prompts["prompt"]), list(prompts["answer"])
    # Held-out comparisons come from training prompts the training comparisons never use.
    n_held = max(1, len(texts) // 10)
    held_out = comparisons(texts[:n_held], answers[:n_held], r.held_out, 0.0, params.seed + 1)
    train_rows = comparisons(texts[n_held:], answers[n_held:], r.comparisons, r.noise, params.seed)
    with tracking.stage_run(root, params.tracking.experiment, "reward_model",
                            params={"reward_model": params.to_dict()["reward_model"]}):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            metrics = train_reward_model(root / PATHS["base_model"], train_rows, held_out, r, params.seed, tmp)
        with atomic_path(metrics_file) as tmp:
            write_json(tmp, {"trained": 1, **metrics})
        tracking.log_metrics(metrics)
    print(f"reward model: agrees with the gold scorer on {metrics['accuracy_vs_gold']:.1%} of {len(held_out)} "
          f"held-out comparisons (untrained: {metrics['accuracy_vs_gold_untrained']:.1%})", flush=True)
    return out


def reward_model_path(path: str | None, root: Path) -> str | None:
    """Where a reward model that params name loads from: the pipeline's own in this project; a
    user's as given (a local directory or a hub id)."""
    return str(root / path) if path == PATHS["reward_model"] else path


# --------------------------------------------------------------------------------- policy
def policy(params: Params, project_dir: Path | str = ".") -> Path:
    """The round's starting policy (and reference): the base model, or the registered version
    that data/champion.json names, fetched from the MLflow registry."""
    from .modeling import load_tokenizer

    root = project_root(project_dir)
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
    from .runtime import files_digest, launch_command

    root = project_root(project_dir)
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
                write_json(shard_dir / sampling.PROMPTS_FILE, {"prompts": prompts, "answers": answers})
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
        for mode in MODES:
            mine = [r for r in rows if r["mode"] == mode]
            metrics[f"{mode}/valid_rate"] = sum(r["valid"] for r in mine) / len(mine)
            metrics[f"{mode}/mean_tokens"] = sum(r["n_tokens"] for r in mine) / len(mine)
        tracking.log_metrics(metrics)
    return out


# --------------------------------------------------------------------------------- pairs
def pairs(params: Params, project_dir: Path | str = ".") -> Path:
    """Reward every sample and build D_t (think/) and D_e (nothink/)."""
    from datasets import Dataset

    from .pairs import build_pairs

    root = project_root(project_dir)
    samples = _load_samples(root)
    if params.pairs.reward != "model" and not any(r["answer"] for r in samples):
        raise StageError(f"pairs.reward={params.pairs.reward} needs an 'answer' column in the prompts; "
                         f"{params.data.source} has none")
    from .rewards import score_samples

    score_samples(samples, params, reward_model_path(params.ranking_reward_model(), root))
    built = build_pairs(samples, params.pairs.max_pairs_per_prompt)
    stats = {}
    for mode in MODES:
        mine = [r for r in samples if r["mode"] == mode]
        stats[f"{mode}/n_pairs"] = len(built[mode])
        stats[f"{mode}/sample_accuracy"] = sum(r["correct"] for r in mine) / max(len(mine), 1)
        stats[f"{mode}/mean_reward"] = sum(r["reward"] for r in mine) / max(len(mine), 1)
        stats[f"{mode}/invalid_rate"] = sum(not r["valid"] for r in mine) / max(len(mine), 1)
        if params.data.task == "judged":
            stats[f"{mode}/mean_gold"] = sum(r["gold"] for r in mine) / max(len(mine), 1)
    out = root / PATHS["pairs"]
    with tracking.stage_run(root, params.tracking.experiment, "pairs", params={"pairs": params.to_dict()["pairs"]}):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            columns = ["prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"]
            for mode, rows in built.items():
                dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns})
                # An empty dataset saved with the default 0 shards cannot be loaded back.
                dataset.save_to_disk(str(tmp / mode), num_shards=None if rows else 1)
            write_json(tmp / "stats.json", stats)
        tracking.log_metrics(stats)
    return out


# --------------------------------------------------------------------------------- train
def train(params: Params, project_dir: Path | str = ".", params_file: str | Path = "params.yaml") -> Path:
    """Every method in `train.methods`, in one `accelerate launch` subprocess.

    Checkpoints and finished methods go to data/checkpoints/ (not a DVC output), so a rerun
    after a crash resumes there; only a complete run is moved into data/models at the end."""
    from .plots import gradient_telemetry, training_curves
    from .train import accelerate_command

    root = project_root(project_dir)
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
def evaluate(params: Params, project_dir: Path | str = ".") -> Path:
    """Held-out prompts, thinking on and off, for the round's starting policy (`base`: the base
    model, or the champion it started from) and every method. With answers: accuracy, greedy
    and (evaluate.n_samples > 0) the mean over sampled completions (pass@1). Without: the
    reward model's mean score of the greedy answers (`reward_*`) and the win rate against
    `base` (`reward_win_rate_*`).

    The held-out prompts are split (`evaluate.selection_fraction`): the selection prompts'
    per-prompt scores go to data/eval_prompts.json for the promotion gate's paired comparison;
    eval.json reports the other prompts only, which never decide a promotion. Each file in
    `evaluate.benchmarks` is scored for accuracy too, as `<name>/accuracy_*` keys, averaged over
    the benchmarks as `benchmarks/accuracy_*`."""
    from .data import read_prompts_file, with_system_prompt
    from .evaluation import (benchmark_sets, final_answers, judge_answers, proxy_gold_gaps, reward_scores,
                             score_prompts, selection_split, subset, summarize, win_rates)
    from .modeling import load_model, load_tokenizer, pick_device, resolve_dtype
    from .plots import eval_bar_chart

    root = project_root(project_dir)
    test = _load_prompts(root)["test"]
    e = params.evaluate
    has_answers = "answer" in test.column_names
    # The judged task has answers (for the gold grade) and its reward model's judgement too.
    judged = params.data.task == "judged"
    judge_path = reward_model_path(params.judging_reward_model(), root)
    if not has_answers and judge_path is None:
        raise StageError("the held-out prompts have no 'answer' column, so evaluation needs a reward model to judge "
                         "the answers: set pairs.reward_model (or evaluate.win_rate_reward_model)")
    if e.n_prompts is not None:
        test = test.select(range(min(e.n_prompts, len(test))))
    prompts = list(test["prompt"])
    selection, report = selection_split(prompts, e.selection_fraction)
    if not report:
        raise StageError(f"evaluate.selection_fraction {e.selection_fraction} leaves none of the {len(prompts)} "
                         "held-out prompts to report on: lower it or add held-out prompts")
    benchmarks = benchmark_sets(root, params)
    candidates = {"base": root / PATHS["policy"]}
    for name in params.train.methods:
        path = root / PATHS["models"] / name
        if not path.is_dir():
            raise StageError(f"{path}: no trained model for method {name!r} (run the train stage first)")
        candidates[name] = path
    results, per_prompt = {}, {}
    device = pick_device()
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
                final = {} if judged else None
                per_prompt[name] = score_prompts(model, tokenizer, prompts, answers, params, name, final, gold=judged)
                if judged:
                    held_out_answers[name] = final
            else:
                held_out_answers[name], per_prompt[name] = final_answers(model, tokenizer, prompts, params, name)
            per_bench = {bench: summarize(score_prompts(model, tokenizer, bench_prompts, bench_answers, params,
                                                        f"{name} on {bench}"))
                         for bench, (bench_prompts, bench_answers) in benchmarks.items()}
            entry = {}
            for bench, scores in per_bench.items():
                entry.update({f"{bench}/{k}": v for k, v in scores.items() if k.startswith("accuracy")})
            for key in (per_bench[next(iter(per_bench))] if per_bench else {}):
                if key.startswith("accuracy"):
                    entry[f"benchmarks/{key}"] = sum(b[key] for b in per_bench.values()) / len(per_bench)
            if win_prompts:
                win_answers[name], _ = final_answers(model, tokenizer, win_prompts, params, name)
            results[name] = entry
            del model
        if not has_answers or judged:
            scores = judge_answers(held_out_answers, prompts, judge_path, params)
            for name, columns in reward_scores(scores, list(candidates)).items():
                per_prompt[name].update(columns)
            reported = {key: [column[i] for i in report] for key, column in scores.items()}
            reward_rates = win_rates(reported, list(candidates), prefix="reward_")
            for name, rates in reward_rates.items():
                results[name].update(rates)
            if judged:
                # An invalid answer loses to any valid one here too, as in the reward win rate.
                gold = {(name, mode): [None if per_prompt[name][f"invalid_{mode}"][i] else per_prompt[name][f"gold_{mode}"][i]
                                       for i in report] for name in candidates for mode in MODES}
                gold_rates = win_rates(gold, list(candidates), prefix="gold_")
                for name, gaps in proxy_gold_gaps(reward_rates, gold_rates).items():
                    results[name].update({**gold_rates[name], **gaps})
        for name in candidates:
            results[name] = {**summarize(subset(per_prompt[name], report)), **results[name]}
        if win_prompts:
            for name, rates in win_rates(judge_answers(win_answers, win_prompts, judge_path, params),
                                         list(candidates)).items():
                results[name].update(rates)
        for name, entry in results.items():
            tracking.log_metrics({f"{name}/{k}": v for k, v in entry.items()})
        out = root / PATHS["eval"]
        with atomic_path(out) as tmp:
            write_json(tmp, results)
        with atomic_path(root / PATHS["eval_prompts"]) as tmp:
            tmp.write_text(json.dumps({
                "prompts": [prompts[i] for i in selection],
                "scores": {name: subset(columns, selection) for name, columns in per_prompt.items()},
                "report": {"prompts": [prompts[i] for i in report],
                           "scores": {name: subset(columns, report) for name, columns in per_prompt.items()}},
            }) + "\n")
        with atomic_path(root / PATHS["eval_plot"]) as tmp:
            eval_bar_chart(results, tmp)
        tracking.log_artifact(out)
        tracking.log_artifact(root / PATHS["eval_plot"])
    return out


# --------------------------------------------------------------------------------- analyze
def analyze(params: Params, project_dir: Path | str = ".") -> Path:
    """The paper's trace diagnostics on the sampled completions, under the sampling policy."""
    from .chat import THINK_CLOSE
    from .diagnostics import prompt_subset, trace_diagnostics
    from .modeling import load_model, load_tokenizer, pick_device, resolve_dtype
    from .packing import grouped_token_logps
    from .sequences import encode, fits

    root = project_root(project_dir)
    samples = _load_samples(root)
    chosen = prompt_subset([r["prompt_id"] for r in samples], params.analyze.n_prompts, params.seed)
    samples = [r for r in samples if r["prompt_id"] in chosen]
    tokenizer = load_tokenizer(root / PATHS["policy"])
    device = pick_device()
    model = load_model(root / PATHS["policy"], resolve_dtype(params.model.dtype, device), device)
    model.eval()
    encoded = [encode(tokenizer, r["prompt"], r["completion"], r["mode"] == "think") for r in samples]
    # A completion is only scored with its whole prompt; samples past their mode's limit are left out.
    kept = [i for i, e in enumerate(encoded) if fits(e, params.model.max_length_for(samples[i]["mode"] == "think"))]
    skipped = dict.fromkeys(MODES, 0)
    for i in set(range(len(samples))) - set(kept):
        skipped[samples[i]["mode"]] += 1
    samples, encoded = [samples[i] for i in kept], [encoded[i] for i in kept]
    # The k samples of a prompt in a mode run their prompt once (the same log-probs as scoring
    # each alone, fewer tokens).
    token_logps = grouped_token_logps(model, encoded, [(r["prompt_id"], r["mode"]) for r in samples],
                                      params.analyze.batch_size, tokenizer.pad_token_id)
    rows = []
    for sample_row, values in zip(samples, token_logps):
        n_trace = None
        if sample_row["mode"] == "think" and THINK_CLOSE in sample_row["completion"]:
            head = sample_row["completion"].split(THINK_CLOSE, 1)[0] + THINK_CLOSE
            n_trace = len(tokenizer(head, add_special_tokens=False).input_ids)
        rows.append({"prompt_id": sample_row["prompt_id"], "mode": sample_row["mode"],
                     "token_logps": values.tolist(), "n_trace_tokens": n_trace})
    result = trace_diagnostics(rows)
    out = root / PATHS["diagnostics"]
    with tracking.stage_run(root, params.tracking.experiment, "analyze"):
        with atomic_path(out) as tmp:
            write_json(tmp, result)
        tracking.log_metrics({f"{group}/{k}": v for group, stats in result.items() for k, v in stats.items()})
        tracking.log_metrics({f"{mode}/skipped_too_long": n for mode, n in skipped.items()})
        tracking.log_metrics({"n_prompts": len(chosen)})
        tracking.log_artifact(out)
    return out


def run_stage(name: str, params: Params, project_dir: Path | str = ".", params_file: str | Path = "params.yaml") -> Path:
    if name in ("train", "sample"):
        return {"train": train, "sample": sample}[name](params, project_dir, params_file)
    functions = {"prepare": prepare, "warmup": warmup, "reward_model": reward_model, "policy": policy, "pairs": pairs,
                 "evaluate": evaluate, "analyze": analyze}
    if name not in functions:
        raise StageError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
    return functions[name](params, project_dir)
