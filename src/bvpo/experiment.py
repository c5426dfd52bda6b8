"""Experiments: every configured method × several seeds on one shared base model, aggregated
into one comparison with 95% intervals.

Each seed is a DVC experiment of the ordinary pipeline (`dvc exp run --temp -n NAME-seedN
-S sample.seed=N -S train.seed=N -S train.methods=…`): prompts and the base model come from
the run-cache, sampling and training data order change with the seed. So every number in
metrics/experiment.json can be rebuilt with `dvc exp run` (the command is recorded per seed),
and `dvc exp show` lists the runs. This module holds the pure parts (intervals, paired
differences, the table) and the DVC calls; `flow.bvpo_experiment` runs it as a Prefect flow.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from .config import MethodConfig, Params
from .errors import BvpoError
from .paths import PATHS

METRICS = ("accuracy_think", "accuracy_nothink", "accuracy_mean",
           "accuracy_think_sampled", "accuracy_nothink_sampled", "accuracy_mean_sampled")
JUDGED_METRICS = ("gold_think", "gold_nothink", "gold_mean",
                  "gold_think_sampled", "gold_nothink_sampled", "gold_mean_sampled",
                  "accuracy_mean", "reward_mean")
"""The judged task is scored by the hidden gold grade (greedy and sampled), beside exact
accuracy and the reward model's own mean score on the greedy answers: the proxy rising while
gold falls is over-optimisation."""

TASKS = ("arithmetic", "judged")
TASK_OVERRIDES = {
    "arithmetic": ("data.task=arithmetic",),
    # The judged task's pairs are ranked by the reward model its own stage trains, as a user's
    # reward model would rank them; win rates are judged by that model too.
    "judged": ("data.task=judged", "pairs.reward=model", "pairs.reward_model=null",
               "evaluate.win_rate_reward_model=null"),
}


def metrics_for(task: str) -> tuple[str, ...]:
    return JUDGED_METRICS if task == "judged" else METRICS


def round_metrics(task: str) -> tuple[str, ...]:
    """The rounds table's metrics: not the reward model's score, whose floor for an invalid
    answer depends on which models one evaluation judged together (all methods in round 1, one
    later), so it does not compare across rounds."""
    return tuple(m for m in metrics_for(task) if not m.startswith("reward_"))


class ExperimentError(BvpoError, RuntimeError):
    """An experiment cannot run (no DVC repository, no commit, a failed run)."""


# ----------------------------------------------------------------------------------- statistics
def interval(values: list[float]) -> dict[str, float]:
    """Mean and two-sided 95% Student-t interval of the mean over independent runs."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def aggregate(per_seed: dict[int, dict[str, dict]], reference: str, wanted: tuple[str, ...] = METRICS) -> dict:
    """`per_seed`: seed → eval.json of that run. Per model and metric (those of `wanted` every
    run has) the mean and 95% interval over seeds; per model the paired difference against
    `reference` (same seed, same pairs)."""
    seeds = sorted(per_seed)
    models = list(per_seed[seeds[0]])
    metrics = [m for m in wanted if all(m in per_seed[s][model] for s in seeds for model in models)]
    summary = {model: {m: interval([per_seed[s][model][m] for s in seeds]) for m in metrics} for model in models}
    paired = {model: {m: interval([per_seed[s][model][m] - per_seed[s][reference][m] for s in seeds])
                      for m in metrics}
              for model in models if model != reference}
    runs = {str(s): {model: {m: per_seed[s][model][m] for m in metrics} for model in models} for s in seeds}
    return {"seeds": seeds, "reference": reference, "metrics": metrics, "models": summary,
            "paired_vs_reference": paired, "runs": runs}


def markdown_table(result: dict, name: str) -> str:
    def cell(stats: dict, metric: str) -> str:
        # Rates and gold grades (in [0, 1]) in points; a reward model's score as it is.
        scale, digits = (1, 2) if metric.startswith("reward_") else (100, 1)
        return (f"{scale * stats['mean']:.{digits}f} [{scale * stats['low']:.{digits}f}, "
                f"{scale * stats['high']:.{digits}f}]")

    metrics, reference = result["metrics"], result["reference"]
    unit = ("Gold reward and accuracy × 100, reward-model score as it is" if any(m.startswith("gold_") for m in metrics)
            else "Accuracy in %")
    lines = [f"# Experiment {name}: {len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))})", "",
             f"{unit}; mean over seeds [95% interval over training seeds, for this base model and test set].", "",
             "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model, stats in result["models"].items():
        lines.append(f"| {model} | " + " | ".join(cell(stats[m], m) for m in metrics) + " |")
    lines += ["", f"Paired difference against `{reference}` (same seed), in points (reward-model scores as they "
              "are); ▲ / ▼: the 95% interval is above / below zero.", "",
              "| model − " + reference + " | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model, stats in result["paired_vs_reference"].items():
        marks = ["▲" if stats[m]["low"] > 0 else "▼" if stats[m]["high"] < 0 else "" for m in metrics]
        lines.append(f"| {model} | " + " | ".join(f"{cell(stats[m], m)} {mark}".strip()
                                                  for m, mark in zip(metrics, marks)) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- DVC runs
def hydra_value(methods: dict[str, MethodConfig]) -> str:
    """`train.methods` as a Hydra override value for `dvc exp run -S`."""
    def fields(m: MethodConfig) -> str:
        loss = f",loss_type:{m.loss_type}" if m.loss_type else ""
        return f"alpha:{m.alpha},preference_weight:{m.preference_weight}{loss}"

    return "{" + ",".join(f"{name}:{{{fields(m)}}}" for name, m in methods.items()) + "}"


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ExperimentError(f"experiment task {task!r}: expected one of {', '.join(TASKS)}")


def check_rounds(params: Params, rounds: int) -> None:
    x = params.experiment
    if rounds < 1:
        raise ExperimentError(f"rounds: {rounds}; expected an integer >= 1 (1: the experiment alone)")
    missing = [m for m in x.round_methods if m not in x.methods]
    if rounds > 1 and (missing or not x.round_methods):
        raise ExperimentError(f"experiment.round_methods {x.round_methods}: expected one or more of "
                              f"experiment.methods {sorted(x.methods)} (the rounds continue from their models)")


def commit_of(root: Path, ref: str) -> str:
    return subprocess.run(["git", "rev-parse", ref], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def experiment_name(params: Params, task: str) -> str:
    """The task's experiment name: the arithmetic default keeps `experiment.name`, another task
    gets its own (NAME-judged), so its DVC experiments and outputs never replace the default's."""
    return params.experiment.name if task == "arithmetic" else f"{params.experiment.name}-{task}"


def output_paths(task: str) -> dict[str, str]:
    """metrics/experiment.{json,png,md}, or metrics/experiment-TASK.* for a task other than the
    default; the rounds table (`--rounds N`) beside them as experiment[-TASK]-rounds.{json,md}."""
    stem = "metrics/experiment" if task == "arithmetic" else f"metrics/experiment-{task}"
    return {"json": f"{stem}.json", "plot": f"{stem}.png", "table": f"{stem}.md",
            "rounds_json": f"{stem}-rounds.json", "rounds_table": f"{stem}-rounds.md"}


# ----------------------------------------------------------------------------------- rounds
def round_params(experiment_params: str, method: str, seed: int, round_number: int) -> str:
    """params.yaml of one later round: the seed's own experiment parameters (as its DVC
    experiment committed them, every -S setting included) with one method, `sample.seed` =
    seed + round − 1 (new samples each round) and the same data order."""
    import yaml

    params = yaml.safe_load(experiment_params)
    method_config = params["train"]["methods"][method]
    params["train"]["methods"] = {method: method_config}
    params["train"]["seed"] = seed
    params["sample"]["seed"] = seed + round_number - 1
    params["tracking"]["register_method"] = method
    return yaml.safe_dump(params, sort_keys=False)


ROUND_STAGES = ("sample", "pairs", "train", "evaluate")
ROUND_INPUTS = tuple(PATHS[key] for key in ("prompts", "base_model", "reward_model", "champion"))
"""What a later round takes from the seed's DVC experiment besides its starting model."""


def round_label(method: str, round_number: int) -> str:
    return f"{method}@r{round_number}"


def run_name(params: Params, seed: int, task: str = "arithmetic") -> str:
    return f"{experiment_name(params, task)}-seed{seed}"


def seed_command(params: Params, seed: int, task: str = "arithmetic") -> list[str]:
    """The `dvc exp run` that produces one seed's results (up to the evaluate stage)."""
    x = params.experiment
    settings = list(TASK_OVERRIDES[task])
    if task == "judged" and x.judged_train_steps is not None:
        settings.append(f"train.steps={x.judged_train_steps}")
    task_settings = [arg for setting in settings for arg in ("-S", setting)]
    return ["dvc", "exp", "run", "--temp", "-n", run_name(params, seed, task),
            "-S", f"sample.seed={seed}", "-S", f"train.seed={seed}",
            "-S", f"data.n_test={x.n_test}", "-S", f"evaluate.n_samples={x.eval_samples}",
            # Experiments promote nothing: every held-out prompt reports.
            "-S", "evaluate.selection_fraction=0",
            # Gradient telemetry only watches (auto-α methods draw their estimates anyway): off, the
            # same weights train faster.
            "-S", "train.telemetry=false", *task_settings,
            # Hydra merges into an existing mapping: delete it, then add the experiment's methods.
            "-S", "~train.methods", "-S", f"+train.methods={hydra_value(x.methods)}",
            "-S", f"tracking.register_method={x.reference_method}", "evaluate"]


def check_repository(root: Path) -> None:
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        raise ExperimentError(f"{root}: not a DVC project (expected .dvc/ and dvc.yaml); `make run` sets one up")
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        raise ExperimentError(f"{root}: DVC experiments need a git commit to start from; commit the project "
                              "first (git add -A && git commit -m baseline)")


def remove_run(root: Path, name: str) -> None:
    """Drop an earlier DVC experiment of the same name, so a rerun replaces it."""
    subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", name], cwd=root, capture_output=True, text=True)


def run_ref(root: Path, name: str) -> str:
    """The git ref of DVC experiment `name` (the newest, if several baselines have one)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                          capture_output=True, text=True, check=True).stdout.split()
    matching = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if not matching:
        raise ExperimentError(f"DVC experiment {name!r} left no result (no refs/exps/…/{name})")
    return matching[-1]


def run_results(root: Path, name: str) -> dict:
    """metrics/eval.json as committed in DVC experiment `name`."""
    shown = subprocess.run(["git", "show", f"{run_ref(root, name)}:metrics/eval.json"], cwd=root,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise ExperimentError(f"DVC experiment {name!r} has no metrics/eval.json: {shown.stderr.strip()}")
    return json.loads(shown.stdout)
