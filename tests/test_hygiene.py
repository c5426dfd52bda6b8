"""Process hygiene: stopping a run stops everything it started. A `bvpo run` sent SIGTERM while
its train stage runs (accelerate launch, its workers) leaves no process of its tree behind and
the project free for the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from micro_params import make_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def command_line(process: psutil.Process) -> str:
    """A process's command line; "" for one that already exited (a zombie until reaped)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_stopping_a_run_stops_its_training_processes(tmp_path):
    project = make_project(tmp_path / "project", {
        "train": {"steps": 2000, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1.0e-3,
                  "alpha_every": 10, "alpha_draws": 2, "alpha_draw_size": 2, "checkpoint_every": 0,
                  "methods": {"bvpo": {"alpha": 0.5}}},
        "tracking": {"register_method": "bvpo"}})
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.Popen([sys.executable, "-m", "bvpo.cli", "run", "--no-dvc"], cwd=project, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = psutil.Process(run.pid)
    deadline = time.time() + 300
    trainers: list[psutil.Process] = []
    while time.time() < deadline and not trainers:
        time.sleep(1)
        assert run.poll() is None, "the run ended before training started"
        trainers = [p for p in tree.children(recursive=True) if "bvpo.train" in command_line(p)]
    assert trainers, "training never started"
    time.sleep(3)  # well inside the 2,000 steps
    descendants = tree.children(recursive=True)
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=120)
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [command_line(p)[:200] for p in alive]
    # The lock went with the run: a second one may start (and is refused only for other reasons).
    check = subprocess.run([sys.executable, "-m", "bvpo.cli", "check"], cwd=project, env=env, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    import fcntl

    with open(project / ".bvpo.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a stray process still held it


def test_rebuilding_a_stage_reproduces_its_outputs_hash_for_hash(tmp_path):
    """Wall times and memory are run facts (MLflow, data/cache/run_facts), not part of a DVC
    output: a forced rebuild of warmup and of train gives the same dvc.lock hashes, so a fresh
    clone's `make run` on the same kind of machine can reproduce the committed dvc.lock. (The
    warmup and train summaries carried `seconds` before, and every rebuild changed the hash.)"""
    import json

    import yaml

    project = make_project(tmp_path / "project", {"train": {
        "steps": 2, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "lr": 1.0e-3, "alpha_every": 2,
        "alpha_draws": 2, "alpha_draw_size": 2, "methods": {"bvpo": {"alpha": 0.5}}},
        "tracking": {"register_method": "bvpo"}})
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    def out_hashes() -> dict[str, str]:
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        return {out["path"]: out["md5"] for stage in ("warmup", "train") for out in lock[stage]["outs"]}

    dvc("repro", "train")
    first = out_hashes()
    assert json.loads((project / "data/cache/run_facts/train-bvpo.json").read_text())["seconds_this_run"] > 0
    assert "seconds" not in json.loads((project / "data/base_model/warmup_summary.json").read_text())
    dvc("repro", "--force", "--single-item", "warmup")
    dvc("repro", "--force", "--single-item", "train")
    assert out_hashes() == first
