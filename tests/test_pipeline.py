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


# ----------------------------------------------------------------------------- the MLflow UI, in a browser
SCREENSHOTS = ROOT / "test-artifacts" / "mlflow-ui"


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def browse(url: str, screenshot: Path) -> str:
    """The page's visible text after its scripts ran, as headless Chromium renders it; and a
    screenshot of it."""
    import re

    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
            "--virtual-time-budget=20000", "--no-first-run", "--disable-extensions"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).replace("&nbsp;", " ")


@pytest.fixture(scope="module")
def ui(project, pipeline_result):
    """`bvpo ui` over the micro pipeline's store, on a free loopback port."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), "ui", "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None, server.stdout.read()[-2000:]
            time.sleep(1)
    yield base
    server.terminate()
    server.wait(timeout=30)


def test_mlflow_ui_shows_runs_metrics_and_the_champion_in_a_browser(project, pipeline_result, ui):
    if chromium() is None:
        pytest.skip("no Chromium on this machine (`.ci/run` installs Debian's `chromium`): the browser check "
                    "of the MLflow UI did not run")
    from bvpo.tracking import find_experiment_id, ui_url

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    experiment_id = find_experiment_id(project, "bvpo")
    parent = pipeline_result["mlflow_parent_run_id"]
    import mlflow

    from bvpo.tracking import tracking_uri

    parent_name = mlflow.MlflowClient(tracking_uri(project)).get_run(parent).info.run_name

    runs = browse(ui_url(ui, experiment_id), SCREENSHOTS / "experiment.png")
    # The runs table, not the GenAI overview ("Traces 0", latency, token usage).
    assert "Run Name" in runs and parent_name in runs, runs[:2000]
    assert "Token Usage" not in runs

    run = browse(ui_url(ui, experiment_id, parent), SCREENSHOTS / "pipeline-run.png")
    assert "Child runs" in run, run[:2000]
    children = run[run.find("Child runs"):][:1000]
    # The page lists the latest ten children ("Load more" for the rest): every method's training run.
    for name in ("train/bvpo", "train/bvpo_auto", "train/dpo_trace", "train/dpo_empty", "train/nll_control",
                 "evaluate", "register"):
        assert name in children, children
    for metric in ("bvpo/accuracy_think", "dpo_trace/accuracy_nothink", "base/accuracy_mean"):
        assert metric in run

    model = browse(f"{ui}/#/models/bvpo?workflowType=machine_learning", SCREENSHOTS / "registered-model.png")
    assert "Registered Models" in model and "method : bvpo" in model and "@ champion" in model, model[:2000]
    for shot in ("experiment", "pipeline-run", "registered-model"):
        assert (SCREENSHOTS / f"{shot}.png").stat().st_size > 10_000
