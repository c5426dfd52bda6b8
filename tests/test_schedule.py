"""Scheduled rounds against a real Prefect server: `bvpo serve` starts `prefect server start` on
loopback (temporary home and database) and serves the round flow as a deployment; two runs are
triggered through the server's API, like the Prefect UI's "Run" button or a schedule would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micro_params import make_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEPLOYMENT = "bvpo-pipeline/micro-rounds"
CRON = "0 3 1 1 *"  # once a year: no scheduled run fires during the test, the two below are triggered

# Runs in a separate interpreter so that this one's Prefect test harness is not involved.
TRIGGER = """
import json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

deadline = time.time() + 120
while True:  # the served process registers the deployment shortly after the server is up
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(sys.argv[1])
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(1)
flow_run = run_deployment(sys.argv[1], timeout=600)
print(json.dumps({"state": flow_run.state.type.value, "id": str(flow_run.id),
                  "schedules": [s.schedule.cron for s in deployment.schedules],
                  "deployment_id": str(flow_run.deployment_id)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`bvpo serve` over a micro project; yields (project, environment with PREFECT_API_URL)."""
    from bvpo.tracking import tracking_uri

    tmp = tmp_path_factory.mktemp("schedule")
    project = make_project(tmp / "project")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "MLFLOW_TRACKING_URI": tracking_uri(project),
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "bvpo.cli", "--project-dir", str(project), "serve",
                                "--port", str(port), "--cron", CRON, "--name", "micro-rounds"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    yield project, {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, process, port, tmp / "serve.log"
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    log.close()


def trigger(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", TRIGGER, DEPLOYMENT], env=env, capture_output=True, text=True,
                          timeout=700)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_served_rounds_promote_by_the_scores_and_round_2_starts_from_round_1s_champion(served):
    import mlflow
    import yaml

    from bvpo.tracking import tracking_uri
    from micro_params import micro_params

    project, env, process, port, log = served
    first = trigger(env)
    assert first["state"] == "COMPLETED", Path(log).read_text()[-3000:]
    assert first["schedules"] == [CRON]
    # Round 2 must clear a real margin, so its decision depends on the scores.
    (project / "params.yaml").write_text(yaml.safe_dump(micro_params({"promotion": {"margin": 0.05}}),
                                                        sort_keys=False))
    second = trigger(env)
    assert second["state"] == "COMPLETED", Path(log).read_text()[-3000:]

    client = mlflow.MlflowClient(tracking_uri(project))
    experiment = client.get_experiment_by_name("bvpo")
    parents = {r.data.tags["prefect_flow_run_id"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.kind = 'pipeline'")}
    round_1, round_2 = parents[first["id"]], parents[second["id"]]
    assert round_1.data.tags["round"] == "1" and round_1.data.tags["round_outcome"] == "promoted"
    champion_1 = round_1.data.tags["champion_after"]
    assert round_2.data.tags["round"] == "2" and round_2.data.tags["started_from_version"] == champion_1

    # The decision follows from round 2's own evaluation, recomputed here from its artifact.
    eval_2 = json.loads(Path(client.download_artifacts(round_2.info.run_id, "eval.json", str(log.parent))).read_text())
    difference = eval_2["bvpo"]["accuracy_mean"] - eval_2["base"]["accuracy_mean"]
    assert round_2.data.metrics["promotion/difference"] == pytest.approx(difference)
    promoted = difference > 0.05
    assert round_2.data.tags["round_outcome"] == ("promoted" if promoted else "not promoted")
    champion = client.get_model_version_by_alias("bvpo", "champion")
    candidate_2 = [v for v in client.search_model_versions("name = 'bvpo'")
                   if v.tags.get("round") == "2" and v.tags["method"] == "bvpo"]
    assert len(candidate_2) == 1
    assert str(champion.version) == (str(candidate_2[0].version) if promoted else champion_1)

    # Stopping `bvpo serve` stops the Prefect server it started.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"the Prefect server still listens on {port} after `bvpo serve` stopped")


def test_schedule_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "bvpo.cli", "--project-dir", str(tmp_path), "schedule"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "prefect server start" in done.stderr and "bvpo serve" in done.stderr
