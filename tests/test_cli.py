"""The console script as a person uses it: help, clear errors, the MLflow UI."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from micro_params import write_micro_params

BVPO = [sys.executable, "-m", "bvpo.cli"]


def bvpo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*BVPO, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["run"], ["stage"], ["ui"], ["schedule"]])
def test_help_for_every_command(command):
    result = bvpo(*command, "--help")
    assert result.returncode == 0
    assert "usage: bvpo" in result.stdout


def test_bad_param_is_one_clear_line_and_exit_2(tmp_path):
    write_micro_params(tmp_path / "params.yaml", {"train": {"beta": -1.0}})
    result = bvpo("stage", "prepare", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "bvpo: error: train.beta: expected a number > 0, got -1.0"
    assert not (tmp_path / "data").exists()


def test_missing_input_names_the_stage_to_run(tmp_path):
    write_micro_params(tmp_path / "params.yaml")
    result = bvpo("stage", "pairs", cwd=tmp_path)
    assert result.returncode == 2
    assert "no samples (run the sample stage first)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_second_run_on_a_busy_project_is_refused_naming_the_first(tmp_path):
    from bvpo.runtime import project_lock

    write_micro_params(tmp_path / "params.yaml")
    with project_lock(tmp_path, "pipeline flow run first-run"):
        result = bvpo("run", "--no-dvc", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{tmp_path} is busy" in result.stderr and "first-run" in result.stderr
    assert not (tmp_path / "data").exists()
    with project_lock(tmp_path, "after the first one ended"):  # released: free again
        pass


def test_malformed_prompts_file_fails_prepare_without_output(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": ""}\n')
    write_micro_params(tmp_path / "params.yaml", {"data": {"source": "prompts.jsonl"}})
    result = bvpo("stage", "prepare", cwd=tmp_path)
    assert result.returncode == 2
    assert "prompts.jsonl, row 2: field 'prompt' must be non-empty text" in result.stderr
    leftovers = list((tmp_path / "data").glob("*")) + list((tmp_path / "data").glob(".*"))
    assert leftovers == []


def test_model_without_thinking_template_is_refused_at_warmup(tmp_path, tokenizer, tiny_model):
    from bvpo.modeling import save_model

    save_model(tiny_model, tokenizer, tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    write_micro_params(tmp_path / "params.yaml", {"model": {"path": "./plain"}})
    result = bvpo("stage", "warmup", cwd=tmp_path)
    assert result.returncode == 2
    assert "neither honours enable_thinking nor opens a think block" in result.stderr
    assert not (tmp_path / "data" / "base_model").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_project_store_and_stops_every_server_process(tmp_path):
    import psutil

    from bvpo.tracking import configure

    configure(tmp_path, "bvpo")  # a store with one experiment, as a pipeline run leaves it
    port = free_port()
    server = subprocess.Popen([*BVPO, "--project-dir", str(tmp_path), "ui", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    descendants: list = []
    try:
        deadline = time.time() + 90
        body = None
        while time.time() < deadline and body is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=bvpo"
                body = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-2000:]
                time.sleep(1)
        assert body is not None
        experiment = json.loads(body)["experiment"]
        assert experiment["name"] == "bvpo"
        # Tagged so that MLflow 3's UI opens the experiment on its runs, not the GenAI overview.
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        descendants = psutil.Process(server.pid).children(recursive=True)
        assert descendants, "bvpo ui should have started the MLflow server"
        # Stopped the way a service manager or `kill` stops it: SIGTERM to `bvpo ui` alone.
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        for process in [psutil.Process(server.pid), *descendants] if server.poll() is None else descendants:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
