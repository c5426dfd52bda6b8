"""Team mode against a real `bvpo stack`: PostgreSQL (Debian's), an MLflow tracking server and a
Prefect server on it, process workers. Two clones of one micro project share the stack: a
scheduled round is picked up by a worker, the second clone sees the champion and its lineage and
`dvc pull`s the round from the DVC remote, two rounds started at once on two workers run one
after the other, and `bvpo stack down` leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from micro_params import make_project

pytestmark = pytest.mark.slow

try:
    from bvpo.stack import _pg_bin

    _pg_bin("initdb")
    HAVE_POSTGRES = True
except Exception:  # noqa: BLE001 - any reason the server cannot be found skips with the reason below
    HAVE_POSTGRES = False
if not HAVE_POSTGRES:
    pytest.skip("PostgreSQL server programs not installed (`apt-get install postgresql`; .ci/run does)",
                allow_module_level=True)

BVPO = [sys.executable, "-m", "bvpo.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PGPASSFILE")}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the worker polls its pool every 2 s, not 10
    return env


def bvpo(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*BVPO, "--project-dir", str(project), *args], cwd=project, env=clean_env(),
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"bvpo {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def api(url: str, path: str, body: dict | None = None, method: str | None = None):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def flow_runs(prefect: str, deployment_id: str) -> list[dict]:
    return api(prefect, "/flow_runs/filter", {"flow_runs": {}, "deployments": {"id": {"any_": [deployment_id]}}})


def wait_completed(prefect: str, deployment_id: str, count: int, timeout_s: float, log_dir: Path) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        runs = flow_runs(prefect, deployment_id)
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        if failed:
            logs = "\n".join(p.read_text()[-3000:] for p in sorted(log_dir.glob("worker-*.log")))
            raise AssertionError(f"flow run {failed[0]['name']} {failed[0]['state_type']}:\n{logs}")
        if len(done) >= count:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} completed runs of {deployment_id} within {timeout_s} s: "
                                 f"{[(r['name'], r['state_type']) for r in runs]}")
        time.sleep(2)


def deployment_id(prefect: str, name: str) -> str:
    return api(prefect, f"/deployments/name/bvpo-pipeline/{name}")["id"]


@pytest.fixture(scope="module")
def stack():
    # As root, PostgreSQL runs as the `postgres` user, who must be able to enter the data directory:
    # pytest's own tmp_path is private (0700), so the stack lives in a directory of its own.
    base = Path(tempfile.mkdtemp(prefix="bvpo-stack-"))
    os.chmod(base, 0o755)
    project_a = make_project(base / "A", {"stack": {"dvc_remote": str(base / "remote")}})
    ports = {"postgres": free_port(), "mlflow": free_port(), "prefect": free_port()}
    up = ["stack", "up", "--data-dir", str(base / "data"), "--postgres-port", str(ports["postgres"]),
          "--mlflow-port", str(ports["mlflow"]), "--prefect-port", str(ports["prefect"])]
    try:
        started = time.monotonic()
        output = bvpo(project_a, *up).stdout
        info = {"base": base, "a": project_a, "ports": ports, "up": up, "up_output": output,
                "up_seconds": time.monotonic() - started,
                "mlflow": f"http://127.0.0.1:{ports['mlflow']}", "prefect": f"http://127.0.0.1:{ports['prefect']}/api"}
        yield info
    finally:
        subprocess.run([*BVPO, "--project-dir", str(project_a), "stack", "down"], cwd=project_a, env=clean_env(),
                       capture_output=True, timeout=300)
        shutil.rmtree(base, ignore_errors=True)


def registry(info) -> "object":
    import mlflow

    return mlflow.MlflowClient(info["mlflow"])


def test_stack_up_runs_every_part_on_postgresql(stack):
    import psycopg

    status = bvpo(stack["a"], "stack", "status").stdout
    for part in ("postgresql", "mlflow", "prefect", "worker"):
        assert any(line.startswith(part) and "running" in line for line in status.splitlines()), status
    assert f"logs to {stack['mlflow']} (local stack)" in status and f"{stack['prefect']} (local stack)" in status
    assert stack["mlflow"] in stack["up_output"] and "work pool 'bvpo'" in stack["up_output"]
    passfile = stack["base"] / "data" / "pgpass"
    assert oct(passfile.stat().st_mode & 0o777) == "0o600"
    # Both servers keep their state in PostgreSQL, not in a SQLite file.
    with psycopg.connect(host="127.0.0.1", port=stack["ports"]["postgres"], user="bvpo", dbname="postgres",
                         passfile=str(passfile)) as connection:
        for database, table in (("mlflow", "registered_models"), ("prefect", "flow_run")):
            found = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            assert found is not None
    for database, table in (("mlflow", "registered_models"), ("prefect", "flow_run")):
        with psycopg.connect(host="127.0.0.1", port=stack["ports"]["postgres"], user="bvpo", dbname=database,
                             passfile=str(passfile)) as connection:
            assert connection.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] == table
    # Loopback only, and a password for TCP: without the password file the server refuses.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=stack["ports"]["postgres"], user="bvpo", dbname="mlflow",
                        passfile="/nonexistent", connect_timeout=5)
    # `up` again is a no-op that keeps the same servers.
    pids = json.loads((stack["a"] / ".stack" / "stack.json").read_text())
    bvpo(stack["a"], *stack["up"])
    again = json.loads((stack["a"] / ".stack" / "stack.json").read_text())
    assert (again["mlflow"]["pid"], again["prefect"]["pid"], again["workers"]) == \
        (pids["mlflow"]["pid"], pids["prefect"]["pid"], pids["workers"])


@pytest.fixture(scope="module")
def scheduled_round(stack):
    """`bvpo schedule --cron` in clone A deploys to the stack's work pool; the worker runs the
    round the schedule makes (the next minute), then the deployment is removed."""
    out = bvpo(stack["a"], "schedule", "--cron", "* * * * *", "--name", "every-minute").stdout
    assert "on work pool 'bvpo'" in out
    deployment = deployment_id(stack["prefect"], "every-minute")
    started = time.monotonic()
    while not any(r["state_type"] in ("RUNNING", "COMPLETED") for r in flow_runs(stack["prefect"], deployment)):
        assert time.monotonic() - started < 180, "no worker picked up a scheduled run within 180 s"
        time.sleep(1)
    # One round is enough: pausing the schedule drops the runs it made for the next minutes.
    api(stack["prefect"], f"/deployments/{deployment}", {"paused": True}, method="PATCH")
    runs = wait_completed(stack["prefect"], deployment, 1, 420, stack["a"] / ".stack" / "logs")
    return {"run": runs[0], "seconds": time.monotonic() - started, "deployment": deployment}


def test_a_scheduled_round_runs_on_a_worker_and_registers_on_the_server(stack, scheduled_round):
    run = scheduled_round["run"]
    assert run["auto_scheduled"] and run["work_pool_name"] == "bvpo"
    client = registry(stack)
    champion = client.get_model_version_by_alias("bvpo", "champion")
    assert champion.tags["round"] == "1" and champion.tags["prefect_flow_run_id"] == run["id"]
    assert champion.tags["base_identity"]
    # Artifacts are served by the tracking server from its own store, not written into the clone.
    assert not (stack["a"] / "mlruns").exists()
    assert any((stack["base"] / "data" / "artifacts").rglob("model.safetensors"))
    parent = client.get_run(champion.tags["pipeline_run_id"])
    assert parent.data.tags["dvc_remote"] == "bvpo" and parent.info.status == "FINISHED"
    assert any((stack["base"] / "remote").rglob("*")), "dvc push wrote nothing to the remote"


@pytest.fixture(scope="module")
def clone_b(stack, scheduled_round):
    """A teammate's clone: git clone of A after the round (dvc.lock and the remote committed), its
    params pointing at the shared servers."""
    a = stack["a"]
    subprocess.run(["git", "add", "-A"], cwd=a, check=True)
    subprocess.run(["git", "commit", "-qm", "round 1"], cwd=a, check=True)
    b = stack["base"] / "B"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    params = yaml.safe_load((b / "params.yaml").read_text())
    params["stack"].update(tracking_uri=stack["mlflow"], prefect_api_url=stack["prefect"], work_pool="bvpo")
    (b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return b


def test_a_second_clone_sees_the_champion_and_pulls_the_round(stack, scheduled_round, clone_b):
    shown = bvpo(clone_b, "champion", "show").stdout
    champion = registry(stack).get_model_version_by_alias("bvpo", "champion")
    assert f"version {champion.version}" in shown and f"base_identity: {champion.tags['base_identity']}" in shown
    pull = subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=clone_b, env=clean_env(),
                          capture_output=True, text=True)
    assert pull.returncode == 0, pull.stderr
    assert (clone_b / "data" / "models" / "bvpo" / "model.safetensors").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone_b, env=clean_env(),
                            capture_output=True, text=True)
    # Every stage's outputs match the committed dvc.lock: round 1 is rebuilt without running anything.
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout


@pytest.fixture(scope="module")
def two_rounds_at_once(stack, scheduled_round, clone_b):
    """A second worker; a deployment in each clone; both started at the same moment."""
    bvpo(stack["a"], *stack["up"], "--workers", "2")
    ids = {}
    for name, project in (("clone-a", stack["a"]), ("clone-b", clone_b)):
        bvpo(project, "schedule", "--interval", "86400", "--name", name)
        ids[name] = deployment_id(stack["prefect"], name)
    for deployment in ids.values():
        api(stack["prefect"], f"/deployments/{deployment}/create_flow_run", {})
    for deployment in ids.values():
        wait_completed(stack["prefect"], deployment, 1, 600, stack["a"] / ".stack" / "logs")
    return ids


def test_two_rounds_on_two_clones_never_run_at_once(stack, two_rounds_at_once):
    client = registry(stack)
    experiment = client.get_experiment_by_name("bvpo")
    parents = sorted(client.search_runs([experiment.experiment_id], "tags.kind = 'pipeline'"),
                     key=lambda r: r.info.start_time)
    for earlier, later in zip(parents, parents[1:]):
        assert earlier.info.end_time <= later.info.start_time, "two rounds ran at once"
    ids = {r["id"] for deployment in two_rounds_at_once.values() for r in flow_runs(stack["prefect"], deployment)}
    both = [r for r in parents if r.data.tags.get("prefect_flow_run_id") in ids]
    assert len(both) == 2
    # Serialised, not merely interleaved: the later round saw the earlier one's promotion (margin -1
    # promotes every candidate) and started from it.
    first_round = both[0].data.tags["round"]
    promoted = client.search_model_versions(f"name = 'bvpo' and tags.round = '{first_round}' and tags.method = 'bvpo'")
    assert both[1].data.tags["started_from_version"] == promoted[0].version
    assert int(both[1].data.tags["round"]) == int(first_round) + 1


def test_stack_down_leaves_no_process_behind(stack, two_rounds_at_once):
    state = json.loads((stack["a"] / ".stack" / "stack.json").read_text())
    pids = [state["mlflow"]["pid"], state["prefect"]["pid"], *state["workers"]]
    out = bvpo(stack["a"], "stack", "down").stdout
    assert "postgresql" in out and "mlflow server" in out and "prefect server" in out and "worker" in out
    marker = str(stack["base"])
    left = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["pid"] in pids or marker in cmdline or any(
                f"--port {p}" in cmdline or f"-p {p}" in cmdline for p in stack["ports"].values()):
            left.append(f"{process.info['pid']}: {cmdline}")
    assert not left, left
    for port in stack["ports"].values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    status = bvpo(stack["a"], "stack", "status").stdout
    assert "running" not in status
