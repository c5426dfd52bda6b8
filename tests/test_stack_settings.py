"""Team-mode settings without servers: which tracking/orchestration servers a project uses, the
`stack` params checks, the DVC remote a round pushes to, and `up` failing cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bvpo import stack
from bvpo.config import ConfigError, StackConfig, load_params


@pytest.fixture
def no_servers(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PGPASSFILE"):
        monkeypatch.delenv(key, raising=False)


def local_stack(root: Path, pid: int) -> None:
    """A .stack/stack.json as `bvpo stack up` writes it, its MLflow server `pid`."""
    (root / ".stack").mkdir(parents=True)
    (root / ".stack" / "stack.json").write_text(json.dumps({
        "tracking_uri": "http://127.0.0.1:5999", "prefect_api_url": "http://127.0.0.1:4299/api", "work_pool": "bvpo",
        "mlflow": {"pid": pid}, "prefect": {"pid": pid}, "postgres": {"passfile": str(root / "pgpass")}}))


def wait_for_command_line(pid: int, word: str) -> None:
    """Popen returns once exec has begun; Linux fills /proc/<pid>/cmdline a moment later (an
    empty one was read on a loaded CI machine), which `stack._alive` rightly reads as not ours."""
    deadline = time.monotonic() + 30
    while word.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, f"process {pid} never showed {word!r} in its command line"
        time.sleep(0.01)


def test_servers_come_from_the_environment_then_params_then_the_local_stack(tmp_path, no_servers, monkeypatch):
    assert stack.endpoints(tmp_path)["tracking_uri"] is None  # embedded: mlruns/ and a temporary Prefect
    # A running process whose command line says mlflow stands for the local stack's server.
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mlflow", "prefect"])
    try:
        wait_for_command_line(server.pid, "mlflow")
        local_stack(tmp_path, server.pid)
        found = stack.endpoints(tmp_path)
        assert (found["tracking_uri"], found["tracking_uri_from"], found["work_pool"]) == \
            ("http://127.0.0.1:5999", "local stack", "bvpo")
        team = StackConfig(tracking_uri="http://mlflow.team:5000", prefect_api_url="http://prefect.team/api",
                           work_pool="gpu")
        found = stack.endpoints(tmp_path, team)
        assert (found["tracking_uri"], found["prefect_api_url"], found["work_pool"]) == \
            ("http://mlflow.team:5000", "http://prefect.team/api", "gpu")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://exported:5000")
        assert stack.endpoints(tmp_path, team)["tracking_uri_from"] == "environment"
        # The local pool goes with the local Prefect server, also once its URL is exported (as
        # `bvpo` itself exports it before `schedule` asks), and not with another server.
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4299/api")
        assert stack.endpoints(tmp_path)["work_pool"] == "bvpo"
        monkeypatch.setenv("PREFECT_API_URL", "http://prefect.elsewhere/api")
        assert stack.endpoints(tmp_path)["work_pool"] is None
        monkeypatch.delenv("PREFECT_API_URL")
    finally:
        server.kill()
        server.wait()
    # A stack whose server is gone (or whose pid another program reuses) is not used.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert stack.endpoints(tmp_path)["tracking_uri"] is None
    (tmp_path / ".stack" / "stack.json").unlink()
    local_stack(tmp_path / "other", os.getpid())  # this process: alive, but not an MLflow server
    assert stack.endpoints(tmp_path / "other")["tracking_uri"] is None


def test_export_environment_sets_what_a_stage_subprocess_inherits(tmp_path, no_servers):
    (tmp_path / "params.yaml").write_text("stack:\n  tracking_uri: http://mlflow.team:5000\n")
    found = stack.export_environment(tmp_path, "params.yaml")
    try:
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.team:5000" and found["prefect_api_url"] is None
        assert "PREFECT_API_URL" not in os.environ
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.mark.parametrize("field,value,match", [
    ("tracking_uri", "mlflow.team:5000", "stack.tracking_uri: expected a URL"),
    ("prefect_api_url", "http://admin:secret@prefect.team/api", "stack.prefect_api_url: expected a URL without a "
     "password"),
    ("dvc_remote", "ssh://me:hunter2@host/path", "stack.dvc_remote: expected a URL without a password"),
])
def test_stack_params_refuse_bad_urls_and_passwords(tmp_path, field, value, match):
    (tmp_path / "params.yaml").write_text(f"stack:\n  {field}: {value}\n")
    with pytest.raises(ConfigError, match=match) as err:
        load_params(tmp_path / "params.yaml")
    assert "secret" not in str(err.value) and "hunter2" not in str(err.value)


def dvc_project(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    return path


def test_the_round_pushes_to_the_configured_or_default_remote(tmp_path):
    from bvpo.flow import dvc_remote_name

    def dvc(*args):
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                              check=True).stdout

    project = dvc_project(tmp_path / "p")
    assert dvc_remote_name(project, None) is None  # no remote, no stack.dvc_remote: nothing is pushed
    dvc("remote", "add", "team", str(tmp_path / "team"))
    assert dvc_remote_name(project, None) is None  # a remote that is not the default is not guessed
    assert dvc_remote_name(project, "team") == "team"
    dvc("remote", "default", "team")
    assert dvc_remote_name(project, None) == "team"
    # A path becomes the committed default remote `bvpo`, once: the next round changes nothing.
    assert dvc_remote_name(project, str(tmp_path / "shared")) == "bvpo"
    config = (project / ".dvc" / "config").read_text()
    assert "remote = bvpo" in config and config.count("['remote \"bvpo\"']") == 1
    before = (project / ".dvc" / "config").stat().st_mtime_ns
    assert dvc_remote_name(project, str(tmp_path / "shared")) == "bvpo"
    assert (project / ".dvc" / "config").stat().st_mtime_ns == before


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres-user path check applies when running as root")
def test_up_as_root_refuses_a_data_dir_the_postgres_user_cannot_reach(tmp_path, no_servers):
    """pytest's tmp_path is private (0700): PostgreSQL, run as the `postgres` user, could not
    enter it. `up` says which directory and what to do, and leaves nothing running or written."""
    with pytest.raises(stack.StackError, match=r"cannot enter .* pass `--data-dir`"):
        stack.up(tmp_path / "project", tmp_path / "data", stack.Ports(postgres=1, mlflow=2, prefect=3))
    assert not (tmp_path / "data").exists() and stack.status(tmp_path / "project") == []


@pytest.fixture
def running_stack(tmp_path):
    """A project whose stack.json names a live "mlflow" and "prefect" process (stand-ins: sleeping
    Pythons whose command lines say so), as `bvpo stack up` leaves it."""
    servers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", part])
               for part in ("mlflow", "prefect")]
    for server, part in zip(servers, ("mlflow", "prefect")):
        wait_for_command_line(server.pid, part)
    (tmp_path / ".stack").mkdir()
    (tmp_path / ".stack" / "stack.json").write_text(json.dumps({
        "data_dir": str(tmp_path / "data"), "tracking_uri": "http://127.0.0.1:5000",
        "prefect_api_url": "http://127.0.0.1:4200/api", "work_pool": "bvpo",
        "postgres": {"port": 5433, "managed": False, "data": str(tmp_path / "data" / "postgres")},
        "mlflow": {"pid": servers[0].pid, "url": "http://127.0.0.1:5000"},
        "prefect": {"pid": servers[1].pid, "url": "http://127.0.0.1:4200"}, "workers": []}))
    yield tmp_path, servers
    for server in servers:
        server.kill()
        server.wait()


@pytest.mark.parametrize("change, match", [
    ({"data_dir": "elsewhere"}, "already runs with its data in"),
    ({"ports": stack.Ports(mlflow=5001)}, "mlflow server already runs on http://127.0.0.1:5000"),
    ({"ports": stack.Ports(postgres=6543)}, "PostgreSQL already runs on port 5433"),
])
def test_up_again_with_other_settings_is_refused_and_stops_nothing(running_stack, change, match):
    root, servers = running_stack
    data = root / change["data_dir"] if "data_dir" in change else root / "data"
    with pytest.raises(stack.StackError, match=match):
        stack.up(root, data, change.get("ports", stack.Ports()))
    assert all(server.poll() is None for server in servers), "a refused `up` stopped the running stack"


def test_a_database_url_with_a_password_is_refused(tmp_path):
    with pytest.raises(stack.StackError, match="must not hold a password") as err:
        stack.up(tmp_path, tmp_path / "data", database_url="postgresql://bvpo:hunter2@db:5432")
    assert "hunter2" not in str(err.value) and not (tmp_path / ".stack").exists()
