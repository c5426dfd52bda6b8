"""The whole pipeline on a micro config: real Prefect flow (test harness), real MLflow store
(SQLite in a temp dir), real `dvc repro` in a temp git repo, real transformers models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from micro_params import ROOT, make_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def pipeline_result(project, prefect_harness, monkeypatch_module):
    from bvpo.flow import bvpo_pipeline
    from bvpo.tracking import tracking_uri

    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", tracking_uri(project))
    return bvpo_pipeline(project_dir=str(project))


def test_eval_json_has_every_model_in_both_modes(project, pipeline_result):
    from datasets import load_from_disk

    from bvpo.evaluation import selection_split

    results = json.loads((project / "metrics/eval.json").read_text())
    assert set(results) == {"base", "bvpo", "bvpo_auto", "dpo_think", "dpo_nothink", "nll_control"}
    held_out = load_from_disk(str(project / "data/prompts"))["test"]["prompt"]
    selection, report = selection_split(held_out, 0.5)
    assert selection and report and len(selection) + len(report) == 12
    n = len(report)
    for entry in results.values():
        for key in ("accuracy_think", "accuracy_nothink"):
            assert 0.0 <= entry[key] <= 1.0
        assert entry["n_prompts"] == n
    assert pipeline_result["eval"] == results
    per_prompt = json.loads((project / "data/eval_prompts.json").read_text())
    # The selection half decides promotions; eval.json is computed from the other half alone.
    assert per_prompt["prompts"] == [held_out[i] for i in selection]
    assert per_prompt["report"]["prompts"] == [held_out[i] for i in report]
    for name, entry in results.items():
        for key in ("accuracy_think", "accuracy_nothink"):
            assert sum(per_prompt["report"]["scores"][name][key]) / n == pytest.approx(entry[key])
            assert len(per_prompt["scores"][name][key]) == len(selection)
        lengths = per_prompt["report"]["scores"][name]["length_think"]
        assert entry["mean_length_think"] == pytest.approx(sum(lengths) / n)
    assert (project / "metrics/eval.png").read_bytes()[:4] == b"\x89PNG"


def test_the_arithmetic_task_trains_no_reward_model(project, pipeline_result):
    assert json.loads((project / "metrics/reward_model.json").read_text()) == {"trained": 0}
    assert [p.name for p in (project / "data/reward_model").iterdir()] == ["README.md"]
    assert "gold_mean" not in pipeline_result["eval"]["bvpo"]


def test_trained_models_differ_from_base_and_each_other(project, pipeline_result):
    from safetensors.torch import load_file

    weights = {name: load_file(project / "data" / sub / "model.safetensors")
               for name, sub in [("base", "base_model"), ("bvpo", "models/bvpo"),
                                 ("dpo_think", "models/dpo_think"), ("dpo_nothink", "models/dpo_nothink")]}
    key = "model.layers.0.mlp.up_proj.weight"
    assert (project / "metrics/train/gradients.png").read_bytes()[:4] == b"\x89PNG"
    assert not weights["bvpo"][key].equal(weights["base"][key])
    assert not weights["bvpo"][key].equal(weights["dpo_think"][key])
    assert not weights["dpo_think"][key].equal(weights["dpo_nothink"][key])
    control = load_file(project / "data/models/nll_control/model.safetensors")
    assert not control[key].equal(weights["bvpo"][key])  # same data and α, no DPO term


def test_diagnostics_cover_both_modes(project, pipeline_result):
    diagnostics = json.loads((project / "metrics/diagnostics.json").read_text())
    # analyze.n_prompts = 16 of the 24 training prompts, every one of their k = 3 samples per mode
    assert diagnostics["think"]["n_samples"] == diagnostics["nothink"]["n_samples"] == 16 * 3
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
    assert {"prepare", "warmup", "sample", "pairs", "train/bvpo", "train/bvpo_auto", "train/dpo_think",
            "train/dpo_nothink", "train/nll_control", "evaluate", "analyze", "register"} <= names
    train_run = next(r for r in children if r.info.run_name == "train/bvpo")
    # `auto` precision as it resolved on this machine, for the warmup and for training alike.
    from bvpo.modeling import resolve_precision

    resolved = resolve_precision("auto", torch.device("cpu"))
    warmup_run = next(r for r in children if r.info.run_name == "warmup")
    assert train_run.data.tags["mixed_precision"] == warmup_run.data.tags["mixed_precision"] == resolved
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    for key in ("think/dpo", "nothink/dpo", "think/margin", "nothink/accuracy", "think/chosen_reward"):
        assert key in train_run.data.metrics
    auto_run = next(r for r in children if r.info.run_name == "train/bvpo_auto")
    alphas = client.get_metric_history(auto_run.info.run_id, "alpha_star")
    assert [m.step for m in alphas] == [0, 2] and all(0 <= m.value <= 1 for m in alphas)
    for key in ("alpha", "grad/var_think", "grad/var_nothink", "grad/bias_gap_sq", "grad/var_mixed",
                "grad/step_cos_think_nothink"):
        assert key in auto_run.data.metrics
    versions = client.search_model_versions("name = 'bvpo'")
    assert {v.tags["method"] for v in versions} == {"bvpo", "bvpo_auto", "dpo_think", "dpo_nothink", "nll_control"}
    for version in versions:  # lineage: round, what it started from, the run, the commit, the lock
        assert version.tags["round"] == "1" and version.tags["started_from_version"] == "base"
        assert version.tags["pipeline_run_id"] == parent.info.run_id
        assert version.tags["git_sha"] == parent.data.tags["git_sha"]
        assert len(version.tags["dvc_lock_md5"]) == 32 and len(version.tags["fingerprint"]) == 64
    champion = client.get_model_version_by_alias("bvpo", "champion")
    assert champion.tags["method"] == "bvpo" and champion.tags["promotion_decision"] == "promoted"
    assert pipeline_result["round"] == 1 and pipeline_result["champion"] == str(champion.version)
    assert parent.data.tags["round"] == "1" and parent.data.tags["round_outcome"] == "promoted"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"eval.json", "eval.png", "diagnostics.json", "curves.png", "gradients.png", "results.md",
            "round_inputs.json", "dvc.lock", "champion.json", "champion_history.png"} <= artifacts


def test_dvc_repro_after_the_flow_is_a_no_op(project, pipeline_result):
    status = dvc(project, "status")
    assert status.returncode == 0
    assert "up to date" in status.stdout, status.stdout
    repro = dvc(project, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "Running stage" not in repro.stdout, repro.stdout


def test_changing_a_train_param_reruns_only_downstream_stages(project, pipeline_result):
    import yaml

    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["n_prompts"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        dry = dvc(project, "repro", "--dry")
    finally:  # the module's later tests see the project as the pipeline left it
        (project / "params.yaml").write_text(original)
    assert dry.returncode == 0, dry.stderr
    ran = {line.split("'")[1] for line in dry.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate"}


# ----------------------------------------------------------------------------- rounds
@pytest.fixture(scope="module")
def round_2(project, pipeline_result):
    """A second run: new prompts in the inbox, and a margin no candidate can clear."""
    import yaml

    from bvpo.flow import bvpo_pipeline
    from micro_params import micro_params

    held_out = json.loads((project / "data/eval_prompts.json").read_text())["prompts"]
    # A benchmark file in MATH-500's shape (`problem`, `answer`) holding the held-out prompts.
    from datasets import load_from_disk

    test = load_from_disk(str(project / "data/prompts"))["test"]
    (project / "data/bench.jsonl").write_text("".join(json.dumps({"problem": p, "answer": a, "level": 1}) + "\n"
                                                      for p, a in zip(test["prompt"], test["answer"])))
    (project / "params.yaml").write_text(yaml.safe_dump(micro_params({
        "promotion": {"margin": 0.99},
        "evaluate": {"max_new_tokens": 40, "benchmarks": {"heldout_copy": "data/bench.jsonl"}}}), sort_keys=False))
    test_prompt = held_out[0]
    inbox = [{"prompt": "Compute 11+22.", "answer": "33"}, {"prompt": "Compute 50-8.", "answer": 42},
             {"prompt": "Compute 70+9-5.", "answer": "74"}, {"prompt": test_prompt, "answer": "0"}]
    (project / "data/incoming/batch1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inbox))
    round_1 = json.loads((project / "metrics/eval.json").read_text())
    return round_1, bvpo_pipeline(project_dir=str(project))


def test_round_2_starts_from_the_champion_and_keeps_it_when_the_candidate_loses(project, pipeline_result, round_2):
    import mlflow

    from bvpo.tracking import tracking_uri

    round_1_eval, result = round_2
    champion = pipeline_result["champion"]
    assert result["round"] == 2 and result["started_from_version"] == champion
    assert json.loads((project / "data/champion.json").read_text())["version"] == champion
    # The round's starting model is the champion: greedy decoding gives its round-1 scores again.
    for mode in ("think", "nothink"):
        assert result["eval"]["base"][f"accuracy_{mode}"] == round_1_eval["bvpo"][f"accuracy_{mode}"]
    decision = result["decision"]
    assert decision["candidate_score"] == pytest.approx(result["eval"]["bvpo"]["accuracy_mean"])
    assert decision["champion_score"] == pytest.approx(result["eval"]["base"]["accuracy_mean"])
    assert decision["difference"] == pytest.approx(decision["candidate_score"] - decision["champion_score"])
    assert decision["promoted"] is False and result["champion"] == champion  # cannot beat it by 99 points
    for model in ("base", "bvpo"):  # the benchmark holds the same prompts: the same greedy scores
        entry = result["eval"][model]
        for key in ("accuracy_think", "accuracy_nothink", "accuracy_mean"):
            assert entry[f"heldout_copy/{key}"] == entry[key] == entry[f"benchmarks/{key}"]
    client = mlflow.MlflowClient(tracking_uri(project))
    new = [client.get_model_version("bvpo", v) for v in result["new_versions"]]
    assert len(new) == 5 and all(v.tags["round"] == "2" and v.tags["started_from_version"] == champion for v in new)
    candidate = client.get_model_version("bvpo", result["versions"]["bvpo"])
    assert candidate.tags["promotion_decision"] == "not promoted"
    parent = client.get_run(result["mlflow_parent_run_id"])
    assert parent.data.tags["round_outcome"] == "not promoted" and parent.data.tags["champion_after"] == champion
    assert parent.data.metrics["promotion/difference"] == pytest.approx(decision["difference"])


def test_inbox_prompts_join_training_and_test_prompts_are_dropped(project, round_2):
    import mlflow

    from bvpo.tracking import tracking_uri

    _, result = round_2
    client = mlflow.MlflowClient(tracking_uri(project))
    sample = client.search_runs([result["mlflow_experiment_id"]],
                                f"tags.mlflow.parentRunId = '{result['mlflow_parent_run_id']}' "
                                "and tags.stage = 'sample'")[0]
    assert sample.data.metrics["inbox_prompts"] == 3 and sample.data.metrics["inbox_dropped_test_prompts"] == 1
    assert sample.data.metrics["n_prompts"] == 24 + 3
    diagnostics = json.loads((project / "metrics/diagnostics.json").read_text())
    assert diagnostics["think"]["n_samples"] == 16 * 3  # 16 of the 24 + 3 inbox prompts (analyze.n_prompts)


def test_a_run_with_unchanged_inputs_registers_nothing(project, round_2):
    import mlflow

    from bvpo.flow import bvpo_pipeline
    from bvpo.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(project))
    before = {v.version for v in client.search_model_versions("name = 'bvpo'")}
    champion = client.get_model_version_by_alias("bvpo", "champion").version
    assert str(champion) == round_2[1]["champion"]
    result = bvpo_pipeline(project_dir=str(project))
    assert result["decision"] is None and result["new_versions"] == [] and result["round"] is None
    assert {v.version for v in client.search_model_versions("name = 'bvpo'")} == before
    assert client.get_model_version_by_alias("bvpo", "champion").version == champion
    assert client.get_run(result["mlflow_parent_run_id"]).data.tags["round_outcome"] == "no new inputs"


def test_a_round_killed_mid_way_leaves_the_champion_and_the_next_run_finishes_it(project, round_2):
    import os
    import signal

    import mlflow

    from bvpo.flow import bvpo_pipeline
    from bvpo.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(project))
    before = {v.version for v in client.search_model_versions("name = 'bvpo'")}
    champion = client.get_model_version_by_alias("bvpo", "champion").version
    (project / "data/incoming/batch2.jsonl").write_text('{"prompt": "Compute 12+13.", "answer": "25"}\n')
    run = subprocess.Popen([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), "run"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if "--single-item train" in line:  # the train task has started
            os.killpg(run.pid, signal.SIGKILL)
            break
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert {v.version for v in client.search_model_versions("name = 'bvpo'")} == before
    assert client.get_model_version_by_alias("bvpo", "champion").version == champion

    result = bvpo_pipeline(project_dir=str(project))  # the lock died with the process
    assert result["round"] == 3 and len(result["new_versions"]) == 5
    assert result["started_from_version"] == str(champion)


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
    for name in ("train/bvpo", "train/bvpo_auto", "train/dpo_think", "train/dpo_nothink", "train/nll_control",
                 "evaluate", "register"):
        assert name in children, children
    for metric in ("bvpo/accuracy_think", "dpo_think/accuracy_nothink", "base/accuracy_mean"):
        assert metric in run

    model = browse(f"{ui}/#/models/bvpo?workflowType=machine_learning", SCREENSHOTS / "registered-model.png")
    assert "Registered Models" in model and "method : bvpo" in model and "@ champion" in model, model[:2000]
    for shot in ("experiment", "pipeline-run", "registered-model"):
        assert (SCREENSHOTS / f"{shot}.png").stat().st_size > 10_000
