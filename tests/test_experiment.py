"""Experiments: the statistics (by hand), and a real 2-seed experiment of the micro pipeline as
DVC experiments (`dvc exp run --temp`) under a real Prefect flow and MLflow store."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bvpo.config import MethodConfig
from bvpo.experiment import aggregate, hydra_value, interval, markdown_table
from micro_params import make_project


def test_interval_is_the_student_t_interval():
    stats = interval([0.5, 0.6, 0.7])
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.302653, half-width 4.302653 * 0.1 / sqrt(3)
    assert stats["mean"] == pytest.approx(0.6)
    assert stats["high"] - stats["mean"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert stats["low"] == pytest.approx(2 * 0.6 - stats["high"])
    assert interval([0.4, 0.4])["low"] == pytest.approx(0.4)


def test_aggregate_pairs_each_seed_with_the_reference():
    per_seed = {
        0: {"base": {"accuracy_think": 0.5, "accuracy_nothink": 0.3, "accuracy_mean": 0.4},
            "bvpo": {"accuracy_think": 0.6, "accuracy_nothink": 0.4, "accuracy_mean": 0.5},
            "dpo_think": {"accuracy_think": 0.62, "accuracy_nothink": 0.3, "accuracy_mean": 0.46}},
        1: {"base": {"accuracy_think": 0.5, "accuracy_nothink": 0.3, "accuracy_mean": 0.4},
            "bvpo": {"accuracy_think": 0.7, "accuracy_nothink": 0.5, "accuracy_mean": 0.6},
            "dpo_think": {"accuracy_think": 0.71, "accuracy_nothink": 0.41, "accuracy_mean": 0.56}},
    }
    result = aggregate(per_seed, "bvpo")
    assert result["metrics"] == ["accuracy_think", "accuracy_nothink", "accuracy_mean"]
    assert result["models"]["bvpo"]["accuracy_think"]["mean"] == pytest.approx(0.65)
    # Paired: dpo_think − bvpo per seed = −0.04 and −0.04 on the mean: a zero-width interval below 0,
    # although the unpaired intervals of the two overlap widely.
    paired = result["paired_vs_reference"]["dpo_think"]["accuracy_mean"]
    assert paired["mean"] == pytest.approx(-0.04) and paired["high"] == pytest.approx(-0.04)
    assert "bvpo" not in result["paired_vs_reference"]
    table = markdown_table(result, "demo")
    assert "| dpo_think | 1.5 [" in table and "▼" in table.split("Paired difference")[1]


def test_methods_as_a_hydra_override():
    value = hydra_value({"bvpo": MethodConfig(0.5), "auto": MethodConfig("auto"),
                         "nll": MethodConfig(0.5, preference_weight=0.0)})
    assert value == ("{bvpo:{alpha:0.5,preference_weight:1.0},auto:{alpha:auto,preference_weight:1.0},"
                     "nll:{alpha:0.5,preference_weight:0.0}}")
    assert hydra_value({"ipo": MethodConfig(0.5, loss_type="ipo")}) == \
        "{ipo:{alpha:0.5,preference_weight:1.0,loss_type:ipo}}"


def test_the_task_switch_sets_the_judged_tasks_parameters_and_names():
    from bvpo.config import Params
    from bvpo.experiment import ExperimentError, check_task, output_paths, run_name, seed_command

    params = Params()
    arithmetic, judged = seed_command(params, 3), seed_command(params, 3, "judged")
    assert "data.task=judged" not in arithmetic and "data.task=arithmetic" in arithmetic
    assert arithmetic[arithmetic.index("-n") + 1] == "bvpo-experiment-seed3" == run_name(params, 3)
    assert judged[judged.index("-n") + 1] == "bvpo-experiment-judged-seed3"
    settings = [judged[i + 1] for i, arg in enumerate(judged) if arg == "-S"]
    assert {"data.task=judged", "pairs.reward=model", "pairs.reward_model=null", "train.steps=200"} <= set(settings)
    assert not any(arg.startswith("train.steps=") for arg in arithmetic)
    params.experiment.judged_train_steps = None
    assert not any(arg.startswith("train.steps=") for arg in seed_command(params, 3, "judged"))
    assert output_paths("arithmetic")["json"] == "metrics/experiment.json"
    assert output_paths("judged") == {"json": "metrics/experiment-judged.json", "plot": "metrics/experiment-judged.png",
                                      "table": "metrics/experiment-judged.md",
                                      "rounds_json": "metrics/experiment-judged-rounds.json",
                                      "rounds_table": "metrics/experiment-judged-rounds.md"}
    with pytest.raises(ExperimentError, match="expected one of arithmetic, judged"):
        check_task("chat")
    from bvpo.experiment import check_rounds

    params.experiment.round_methods = ["bvpo", "dpo_ipo"]
    check_rounds(params, 1)  # no rounds asked for: nothing to check
    with pytest.raises(ExperimentError, match=r"experiment.round_methods \['bvpo', 'dpo_ipo'\]: expected one or more"):
        check_rounds(params, 2)


def test_judged_tables_report_gold_in_points_and_reward_scores_as_they_are():
    per_seed = {seed: {"base": {"gold_mean": 0.5, "accuracy_mean": 0.4, "reward_mean": -1.25},
                       "bvpo": {"gold_mean": 0.6 + seed / 100, "accuracy_mean": 0.5, "reward_mean": 0.5}}
                for seed in (0, 1)}
    from bvpo.experiment import metrics_for

    result = aggregate(per_seed, "bvpo", metrics_for("judged"))
    assert result["metrics"] == ["gold_mean", "accuracy_mean", "reward_mean"]
    table = markdown_table(result, "judged")
    assert "| base | 50.0 [50.0, 50.0] | 40.0 [40.0, 40.0] | -1.25 [-1.25, -1.25] |" in table
    assert "Gold reward" in table


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_two_seed_experiment_and_its_second_round_end_to_end(tmp_path, prefect_harness, monkeypatch):
    import yaml
    from dvc.api import DVCFileSystem
    from prefect import flow

    from bvpo.experiment import run_ref
    from bvpo.flow import bvpo_experiment, run_experiment_round
    from bvpo.tracking import tracking_uri

    repo = make_project(tmp_path / "project", {
        "experiment": {"name": "micro", "seeds": [1, 2], "reference_method": "bvpo", "n_test": 10,
                       "eval_samples": 2, "methods": {"bvpo": {"alpha": 0.5}, "dpo_think": {"alpha": 1.0}},
                       "round_methods": ["bvpo"]}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(repo))
    # A round promoted version 7 (this store has none): experiments still start from the base
    # model. They used to take the pointer into every `dvc exp run` and fail on a missing version.
    pointer = '{\n  "registered_model": "bvpo",\n  "version": "7"\n}\n'
    (repo / "data/champion.json").write_text(pointer)
    subprocess.run(["git", "commit", "-qam", "a promoted round"], cwd=repo, check=True)

    out = bvpo_experiment(project_dir=str(repo), rounds=2)
    assert (repo / "data/champion.json").read_text() == pointer  # the round's pointer is back

    result = json.loads((repo / "metrics/experiment.json").read_text())
    assert result["seeds"] == [1, 2] and set(result["models"]) == {"base", "bvpo", "dpo_think"}
    assert "accuracy_mean_sampled" in result["metrics"]
    runs = result["runs"]
    # The base model is shared: identical in every run. Training changes with the seed.
    assert runs["1"]["base"] == runs["2"]["base"]
    for model in ("bvpo", "dpo_think"):
        for metric in result["metrics"]:
            assert 0 <= runs["1"][model][metric] <= 1
    # Mean and 95% t-interval over the two seeds, by hand: t(0.975, 1 df) = 12.706, sd = |a - b| / sqrt(2).
    a, b = runs["1"]["bvpo"]["accuracy_think"], runs["2"]["bvpo"]["accuracy_think"]
    stats = result["models"]["bvpo"]["accuracy_think"]
    half = 12.7062 * abs(a - b) / 2
    assert (stats["mean"], stats["low"], stats["high"]) == pytest.approx(((a + b) / 2, (a + b) / 2 - half,
                                                                          (a + b) / 2 + half), abs=1e-4)
    assert ("dvc exp run --temp -n micro-seed1 -S sample.seed=1 -S train.seed=1 -S data.n_test=10 "
            "-S evaluate.n_samples=2") in result["commands"]["1"]
    assert result["models"]["base"]["accuracy_think"]["n"] == 2
    assert (repo / "metrics/experiment.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "metrics/experiment.md").read_text() == out["markdown"]
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "micro-seed1" in shown.stdout and "micro-seed2" in shown.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri(repo))
    parent = client.get_run(out["mlflow_parent_run_id"])
    assert parent.data.tags["kind"] == "experiment"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = [run.info.run_name for run in children]
    assert {"bvpo/seed1", "bvpo/seed2", "dpo_think/seed1", "base/seed2"} <= set(names)
    # Prompts and the base model are shared: the first seed's DVC experiment builds the base model
    # (a fresh project has none), the second restores it from DVC's run cache; training runs per seed.
    # Training runs per seed, in the experiment (round 1) and in round 2.
    assert names.count("warmup") == 1 and names.count("train/bvpo") == 4
    seed_run = next(r for r in children if r.info.run_name == "bvpo/seed2")
    assert seed_run.data.tags["seed"] == "2" and seed_run.data.tags["method"] == "bvpo"
    assert seed_run.data.metrics["accuracy_think"] == pytest.approx(runs["2"]["bvpo"]["accuracy_think"])

    # Round 2 (`--rounds 2`): each seed's bvpo model samples again with the next sampling seed,
    # is paired and trained from its own weights, and is evaluated; round 1 is the experiment.
    rounds = json.loads((repo / "metrics/experiment-rounds.json").read_text())
    assert rounds == out["rounds"] and rounds["reference"] == "bvpo@r2"
    assert (repo / "metrics/experiment-rounds.md").read_text() == out["rounds_markdown"]
    assert "reward_mean" not in rounds["metrics"]
    assert list(rounds["models"]) == ["bvpo@r1", "bvpo@r2"]
    for seed in ("1", "2"):
        assert rounds["runs"][seed]["bvpo@r1"] == runs[seed]["bvpo"]
        work = repo / "data/experiment_rounds/micro/round2" / f"seed{seed}-bvpo"
        round_params = yaml.safe_load((work / "params.yaml").read_text())
        assert round_params["sample"]["seed"] == int(seed) + 1 and round_params["train"]["seed"] == int(seed)
        assert list(round_params["train"]["methods"]) == ["bvpo"] and round_params["evaluate"]["n_samples"] == 2
        evaluated = json.loads((work / "metrics/eval.json").read_text())
        assert evaluated["bvpo"]["accuracy_mean"] == pytest.approx(rounds["runs"][seed]["bvpo@r2"]["accuracy_mean"])
        # It started from this seed's round-1 model: the DVC experiment's bvpo weights, byte for byte.
        fs = DVCFileSystem(str(repo), rev=run_ref(repo, f"micro-seed{seed}"))
        assert (work / "data/policy/model.safetensors").read_bytes() == \
            fs.read_bytes("data/models/bvpo/model.safetensors")
        assert (work / "data/models/bvpo/model.safetensors").read_bytes() != \
            (work / "data/policy/model.safetensors").read_bytes()
    assert {"bvpo@r2/seed1", "bvpo@r2/seed2"} <= set(names)
    # A round evaluated from the same start model under the same params is reused, not rerun.
    work = repo / "data/experiment_rounds/micro/round2/seed1-bvpo"
    before = (work / "metrics/eval.json").stat().st_mtime_ns

    @flow
    def round_again(start: str) -> dict:
        return run_experiment_round(str(repo), "micro-seed1", "bvpo", 1, 2, start, str(work))

    again = round_again("data/models/bvpo")
    assert (work / "metrics/eval.json").stat().st_mtime_ns == before
    assert again["accuracy_mean"] == pytest.approx(rounds["runs"]["1"]["bvpo@r2"]["accuracy_mean"])
    # From another start model (here seed 2's round-2 model) the same round is run again.
    round_again(str(repo / "data/experiment_rounds/micro/round2/seed2-bvpo/data/models/bvpo"))
    assert (work / "metrics/eval.json").stat().st_mtime_ns != before


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_judged_experiment_with_an_ipo_variant_end_to_end(tmp_path, prefect_harness, monkeypatch):
    """`bvpo experiment --task judged` on a project whose params.yaml is the arithmetic default:
    every seed's DVC experiment trains the reward model (once: the run-cache serves the second),
    ranks pairs with it, trains a DPO and an IPO variant, and reports the gold grade."""
    import mlflow

    from bvpo.flow import bvpo_experiment
    from bvpo.tracking import tracking_uri

    repo = make_project(tmp_path / "project", {
        "pairs": {"reward": "verified"},
        "experiment": {"name": "micro", "seeds": [1, 2], "reference_method": "bvpo", "n_test": 10,
                       "eval_samples": 2, "judged_train_steps": 4,
                       "methods": {"bvpo": {"alpha": 0.5}, "bvpo_ipo": {"alpha": 0.5, "loss_type": "ipo"}}}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(repo))
    out = bvpo_experiment(project_dir=str(repo), task="judged")

    assert not (repo / "metrics/experiment.json").exists()
    result = json.loads((repo / "metrics/experiment-judged.json").read_text())
    assert result["task"] == "judged" and set(result["models"]) == {"base", "bvpo", "bvpo_ipo"}
    assert {"gold_mean", "gold_mean_sampled", "accuracy_mean", "reward_mean"} <= set(result["metrics"])
    assert "-n micro-judged-seed1 -S sample.seed=1" in result["commands"]["1"]
    assert "-S train.telemetry=false -S data.task=judged -S pairs.reward=model" in result["commands"]["1"]
    assert "-S evaluate.win_rate_reward_model=null -S train.steps=4 " in result["commands"]["1"]
    assert "bvpo_ipo:{alpha:0.5,preference_weight:1.0,loss_type:ipo}" in result["commands"]["1"]
    for seed in ("1", "2"):
        for entry in result["runs"][seed].values():
            assert 0 <= entry["gold_mean_sampled"] <= 1
            assert entry["gold_mean"] == pytest.approx((entry["gold_think"] + entry["gold_nothink"]) / 2)
    # The base model is shared; its reward score is not quite (an invalid answer scores as the
    # worst answer the judge saw in that run, trained models included).
    base = [{k: v for k, v in result["runs"][seed]["base"].items() if k != "reward_mean"} for seed in ("1", "2")]
    assert base[0] == base[1]
    assert (repo / "metrics/experiment-judged.md").read_text() == out["markdown"]
    assert "Gold reward" in out["markdown"]

    client = mlflow.MlflowClient(tracking_uri(repo))
    parent = client.get_run(out["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = [run.info.run_name for run in children]
    # The reward model is trained once (the second seed restores it from DVC's run cache).
    assert names.count("reward_model") == 1 and names.count("train/bvpo_ipo") == 2
    ipo_run = next(r for r in children if r.info.run_name == "train/bvpo_ipo")
    assert ipo_run.data.params["loss_type"] == "ipo"
    assert next(r for r in children if r.info.run_name == "train/bvpo").data.params["loss_type"] == "sigmoid"


def test_an_experiment_needs_a_dvc_project_with_a_commit(tmp_path):
    from bvpo.experiment import ExperimentError, check_repository

    with pytest.raises(ExperimentError, match="not a DVC project"):
        check_repository(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    git(tmp_path, "init", "-q")
    with pytest.raises(ExperimentError, match="need a git commit"):
        check_repository(tmp_path)
