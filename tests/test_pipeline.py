"""The whole pipeline on a micro config: real Prefect flow (test harness), real MLflow store
(SQLite in a temp dir), real `dvc repro` in a temp git repo, real transformers models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from micro_params import ROOT, write_micro_params

pytestmark = pytest.mark.timeout(600)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone-like project: code, dvc.yaml and micro params in a new git + DVC repo."""
    repo = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    write_micro_params(repo / "params.yaml")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "ci@example.invalid")
    git(repo, "config", "user.name", "ci")
    assert dvc(repo, "init", "-q").returncode == 0
    assert dvc(repo, "config", "core.analytics", "false").returncode == 0
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "micro project")
    return repo


@pytest.fixture(scope="module")
def pipeline_result(project, prefect_harness, monkeypatch_module):
    from bvpo.flow import bvpo_pipeline
    from bvpo.tracking import tracking_uri

    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    return bvpo_pipeline(project_dir=str(project))


def test_eval_json_has_every_model_in_both_modes(project, pipeline_result):
    results = json.loads((project / "metrics/eval.json").read_text())
    assert set(results) == {"base", "bvpo", "bvpo_auto", "dpo_trace", "dpo_empty", "nll_control"}
    for entry in results.values():
        for key in ("accuracy_think", "accuracy_nothink"):
            assert 0.0 <= entry[key] <= 1.0
        assert entry["n_prompts"] == 12
    assert pipeline_result["eval"] == results
    assert (project / "metrics/eval.png").read_bytes()[:4] == b"\x89PNG"


def test_trained_models_differ_from_base_and_each_other(project, pipeline_result):
    from safetensors.torch import load_file

    weights = {name: load_file(project / "data" / sub / "model.safetensors")
               for name, sub in [("base", "base_model"), ("bvpo", "models/bvpo"),
                                 ("dpo_trace", "models/dpo_trace"), ("dpo_empty", "models/dpo_empty")]}
    key = "model.layers.0.mlp.up_proj.weight"
    assert (project / "metrics/train/gradients.png").read_bytes()[:4] == b"\x89PNG"
    assert not weights["bvpo"][key].equal(weights["base"][key])
    assert not weights["bvpo"][key].equal(weights["dpo_trace"][key])
    assert not weights["dpo_trace"][key].equal(weights["dpo_empty"][key])
    control = load_file(project / "data/models/nll_control/model.safetensors")
    assert not control[key].equal(weights["bvpo"][key])  # same data and α, no DPO term


def test_diagnostics_cover_both_modes(project, pipeline_result):
    diagnostics = json.loads((project / "metrics/diagnostics.json").read_text())
    assert diagnostics["think"]["n_samples"] == 24 * 3
    assert diagnostics["think"]["mean_length"] > diagnostics["nothink"]["mean_length"]
    assert 0 < diagnostics["think"]["trace_token_fraction"] < 1
    assert diagnostics["ratios"]["mean_length"] > 1


def test_mlflow_holds_parent_children_and_registered_models(project, pipeline_result):
    import mlflow

    from bvpo.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(project))
    parent = client.get_run(pipeline_result["mlflow_parent_run_id"])
    assert parent.data.tags["kind"] == "pipeline"
    assert len(parent.data.tags["git_sha"]) == 40
    assert parent.data.metrics["bvpo/accuracy_think"] == pipeline_result["eval"]["bvpo"]["accuracy_think"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {run.info.run_name for run in children}
    assert {"prepare", "warmup", "sample", "pairs", "train/bvpo", "train/bvpo_auto", "train/dpo_trace",
            "train/dpo_empty", "train/nll_control", "evaluate", "analyze", "register"} <= names
    train_run = next(r for r in children if r.info.run_name == "train/bvpo")
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    for key in ("trace/dpo", "empty/dpo", "trace/margin", "empty/accuracy", "trace/chosen_reward"):
        assert key in train_run.data.metrics
    auto_run = next(r for r in children if r.info.run_name == "train/bvpo_auto")
    alphas = client.get_metric_history(auto_run.info.run_id, "alpha_star")
    assert [m.step for m in alphas] == [0, 2] and all(0 <= m.value <= 1 for m in alphas)
    for key in ("alpha", "grad/var_trace", "grad/var_empty", "grad/bias_gap_sq", "grad/var_mixed",
                "grad/step_cos_trace_empty"):
        assert key in auto_run.data.metrics
    versions = client.search_model_versions("name = 'bvpo'")
    assert {v.tags["method"] for v in versions} == {"bvpo", "bvpo_auto", "dpo_trace", "dpo_empty", "nll_control"}
    champion = client.get_model_version_by_alias("bvpo", "champion")
    assert champion.tags["method"] == "bvpo"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"eval.json", "eval.png", "diagnostics.json", "curves.png", "gradients.png", "results.md"} <= artifacts


def test_dvc_repro_after_the_flow_is_a_no_op(project, pipeline_result):
    status = dvc(project, "status")
    assert status.returncode == 0
    assert "up to date" in status.stdout, status.stdout
    repro = dvc(project, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "Running stage" not in repro.stdout, repro.stdout


def test_changing_a_train_param_reruns_only_downstream_stages(project, pipeline_result):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["n_prompts"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = dvc(project, "repro", "--dry")
    assert dry.returncode == 0, dry.stderr
    ran = {line.split("'")[1] for line in dry.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate"}
