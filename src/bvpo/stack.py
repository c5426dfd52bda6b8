"""Team mode: a PostgreSQL, an MLflow tracking server and a Prefect server on it, and a worker.

`bvpo stack up` starts on loopback, for one machine: PostgreSQL (Debian's `postgresql`, data under
`.stack/` or `--data-dir`), `mlflow server` on it with the artifacts served by the server, `prefect
server start` on it, and a Prefect process worker on the `bvpo` work pool. `bvpo stack down`
stops what `up` started (the data stays); `bvpo stack status` says what runs where.

Which servers a command uses, first match wins:
1. `MLFLOW_TRACKING_URI` / `PREFECT_API_URL` exported by the user;
2. params.yaml's `stack.tracking_uri` / `stack.prefect_api_url` (a team's shared servers);
3. this project's local stack while it is up (`.stack/stack.json`);
4. the embedded default: SQLite under mlruns/ and a temporary Prefect server per run.

Passwords never appear in a URL, a command line or params.yaml: PostgreSQL clients (MLflow's
psycopg, Prefect's asyncpg) read them from the password file that `PGPASSFILE` names (the local
stack's `.stack/pgpass`, mode 0600) or from `PGPASSWORD`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import BvpoError
from .runtime import stop_process_tree

STACK_DIR = ".stack"
STATE_FILE = "stack.json"
DB_USER = "bvpo"
DATABASES = ("mlflow", "prefect")
WORK_POOL = "bvpo"


class StackError(BvpoError, RuntimeError):
    """The stack cannot be started, reached or stopped; the message says which part and why."""


@dataclass
class Ports:
    postgres: int = 5433
    """Not 5432, so the stack never collides with a system PostgreSQL."""
    mlflow: int = 5000
    prefect: int = 4200


def state_path(root: Path) -> Path:
    return root / STACK_DIR / STATE_FILE


def read_state(root: Path) -> dict | None:
    path = state_path(root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_state(root: Path, state: dict) -> None:
    path = state_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- which servers to use
def endpoints(root: Path, stack_params=None) -> dict[str, str | None]:
    """The tracking URI, Prefect API URL, work pool and where each came from (see the module doc).
    `stack_params`: params.yaml's `stack` section (a `StackConfig`), or None."""
    state = read_state(root) or {}
    # A part counts while its process runs and `up` recorded where it listens.
    local = {key: state.get(key) for key, part in (("tracking_uri", "mlflow"), ("prefect_api_url", "prefect"))
             if state.get(key) and _alive(state.get(part, {}).get("pid"), part)}
    found: dict[str, str | None] = {}
    for key, env, attr in (("tracking_uri", "MLFLOW_TRACKING_URI", "tracking_uri"),
                           ("prefect_api_url", "PREFECT_API_URL", "prefect_api_url")):
        if os.environ.get(env):
            found[key], found[f"{key}_from"] = os.environ[env], "environment"
        elif stack_params is not None and getattr(stack_params, attr):
            found[key], found[f"{key}_from"] = getattr(stack_params, attr), "params.yaml stack"
        elif key in local:
            found[key], found[f"{key}_from"] = local[key], "local stack"
        else:
            found[key], found[f"{key}_from"] = None, "embedded"
    pool = stack_params.work_pool if stack_params is not None and stack_params.work_pool else None
    # The local pool lives on the local Prefect server only: used when that is the server in use
    # (however it was named: `export_environment` exports the local stack's URL).
    on_local = "prefect_api_url" in local and found["prefect_api_url"] == local["prefect_api_url"]
    local_pool = state.get("work_pool") if on_local else None
    found["work_pool"] = pool or local_pool
    return found


def export_environment(root: Path, params_file: str | Path = "params.yaml") -> dict[str, str | None]:
    """Point this process and its children (stages, dvc, accelerate) at the servers `endpoints`
    picks. Values already exported win. A broken params file is left to `load_params` to report."""
    from .config import ConfigError, load_params

    path = Path(params_file) if Path(params_file).is_absolute() else root / params_file
    try:
        stack_params = load_params(path).stack if path.is_file() else None
    except (ConfigError, OSError):
        stack_params = None
    found = endpoints(root, stack_params)
    if found["tracking_uri"]:
        os.environ.setdefault("MLFLOW_TRACKING_URI", found["tracking_uri"])
    if found["prefect_api_url"]:
        os.environ.setdefault("PREFECT_API_URL", found["prefect_api_url"])
    state = read_state(root)
    if state is not None and found["tracking_uri_from"] == "local stack":
        os.environ.setdefault("PGPASSFILE", state["postgres"]["passfile"])
    return found


# ----------------------------------------------------------------------------- processes
def _alive(pid: int | None, expect: str | None = None) -> bool:
    """`pid` runs (not a zombie) and its command line mentions `expect` (a pid reused by another
    program is not ours). `expect=None` for a process just started, which may not have exec'd yet."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z" and (expect is None or expect in cmdline)


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> int:
    """A server in a session (process group) of its own, detached from this command: it outlives
    `bvpo stack up` until `bvpo stack down` stops the whole group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=cwd, start_new_session=True)
    return process.pid


def _stop(pid: int | None, expect: str | None) -> bool:
    """Stop a part and every process under it (servers fork workers; a Prefect worker starts
    each flow run in a session of its own); False when it was not running."""
    if not _alive(pid, expect):
        return False
    stop_process_tree(pid, grace_s=30)
    return True


def wait_http(url: str, what: str, pid: int, log: Path | None = None, timeout_s: float = 180.0) -> None:
    """Until `url` answers; StackError if the process `pid` exits first (with its log's tail) or
    `timeout_s` passes. `bvpo serve` waits for its Prefect server the same way."""
    where = f" (log {log})" if log is not None else ""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            pass
        if not _alive(pid):
            tail = log.read_text(errors="replace").splitlines()[-15:] if log is not None and log.is_file() else []
            raise StackError(f"the {what} exited while starting{where}; is its port free?\n" + "\n".join(tail))
        if time.monotonic() > deadline:
            raise StackError(f"the {what} did not answer on {url} within {timeout_s:.0f} s{where}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else the newest of Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0)
    for folder in reversed(versions):
        if (folder / name).is_file():
            return str(folder / name)
    raise StackError(f"PostgreSQL's `{name}` was not found: install the server (Debian: `apt-get install "
                     "postgresql`), or point `stack.database_url` at a PostgreSQL you run")


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, its programs run as the `postgres` system user
    (which Debian's package creates)."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("PostgreSQL refuses to run as root and there is no `postgres` user to run it as: "
                         "run `bvpo stack up` as a normal user, or install Debian's `postgresql`") from None
    return ["runuser", "-u", "postgres", "--"]


def _postgres_reachable(path: Path) -> None:
    """As root, the `postgres` user must be able to walk down to the data directory."""
    if os.geteuid() != 0:
        return
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & 0o001:
            raise StackError(f"PostgreSQL runs as the `postgres` user here (not as root), and it cannot enter "
                             f"{folder} (mode {oct(folder.stat().st_mode & 0o777)}) on the way to {path}: pass "
                             "`--data-dir` under a directory every user can enter (e.g. /var/tmp/bvpo-stack), or "
                             "run as a normal user")


def _write_secret(path: Path, text: str) -> None:
    """A file only its owner can read, from the moment it exists."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _pg_run(cmd: list[str], what: str) -> None:
    result = subprocess.run(_as_postgres_user() + cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise StackError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")


def _start_postgres(data: Path, port: int, passfile: Path) -> bool:
    """Initialise the cluster if need be and start it; True when this call started it."""
    pgdata = data / "postgres"
    _postgres_reachable(data)
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o755)
    owner = ["chown", "-R", "postgres:postgres"] if os.geteuid() == 0 else None
    if not (pgdata / "PG_VERSION").is_file():
        password = secrets.token_urlsafe(24)
        pgdata.mkdir(mode=0o700, exist_ok=True)
        pwfile = data / ".initdb-password"
        _write_secret(pwfile, password + "\n")
        try:
            if owner:
                subprocess.run(owner + [str(pgdata), str(pwfile)], check=True)
            # Sockets only inside the data directory, passwords (scram) for TCP, loopback only.
            _pg_run([_pg_bin("initdb"), "-D", str(pgdata), "-U", DB_USER, "--pwfile", str(pwfile),
                     "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C"],
                    "initdb")
        except BaseException:
            shutil.rmtree(pgdata, ignore_errors=True)  # a half-made cluster would never start
            raise
        finally:
            pwfile.unlink(missing_ok=True)
        _write_secret(passfile, f"127.0.0.1:*:*:{DB_USER}:{password}\n")
    if not passfile.is_file():
        raise StackError(f"{pgdata} exists but its password file {passfile} is gone: remove {pgdata} to start "
                         "with a new database")
    if subprocess.run(_as_postgres_user() + [_pg_bin("pg_ctl"), "-D", str(pgdata), "status"],
                      capture_output=True).returncode == 0:
        return False
    _pg_run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "server.log"), "-w", "-t", "60", "-o",
             f"-c listen_addresses=127.0.0.1 -p {port} -k {pgdata}", "start"],
            f"starting PostgreSQL on 127.0.0.1:{port} (log {pgdata / 'server.log'})")
    return True


def _create_databases(port: int, passfile: Path) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres", passfile=str(passfile),
                         autocommit=True) as connection:
        for name in DATABASES:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                connection.execute(f'CREATE DATABASE "{name}"')


def _stop_postgres(data: Path) -> bool:
    pgdata = data / "postgres"
    if not (pgdata / "PG_VERSION").is_file():
        return False
    ctl = [_pg_bin("pg_ctl"), "-D", str(pgdata)]
    if subprocess.run(_as_postgres_user() + ctl + ["status"], capture_output=True).returncode != 0:
        return False
    _pg_run(ctl + ["-m", "fast", "-w", "-t", "60", "stop"], "stopping PostgreSQL")
    return True


# ----------------------------------------------------------------------------- up / down / status
def up(root: Path, data_dir: Path | None = None, ports: Ports | None = None, artifacts: str | None = None,
       database_url: str | None = None, workers: int = 1) -> dict:
    """Start (or find running) every part of the stack; returns the state written to .stack/stack.json.
    On any failure everything is stopped again and the error names the part and its log.
    `database_url`: a PostgreSQL server to use instead of starting one (its databases `mlflow` and
    `prefect` must exist); `artifacts`: where MLflow keeps artifacts (a path or s3://, gs://...)."""
    root = root.resolve()
    ports = ports or Ports()
    data = (data_dir or root / STACK_DIR).resolve()
    _refuse_conflicts(root, data, ports, database_url)
    started: list[tuple[str, int | None]] = []
    try:
        return _up(root, data, ports, artifacts, database_url, workers, started)
    except BaseException:
        # A stack half up is worse than none, but a stack that ran before this call stays up.
        for part, pid in reversed(started):
            if part == "postgres":
                _stop_postgres(data)
            else:
                _stop(pid, None)  # started by this call: ours, even before it exec'd
        raise


def _refuse_conflicts(root: Path, data: Path, ports: Ports, database_url: str | None) -> None:
    """`up` again must describe the stack that runs: same data directory, same ports."""
    import urllib.parse

    if database_url is not None and urllib.parse.urlsplit(database_url).password is not None:
        raise StackError("--database-url must not hold a password (it would show in `ps` and in .stack/stack.json): "
                         "export PGPASSWORD or point PGPASSFILE at a password file")
    state = read_state(root) or {}
    running = {part: state.get(part, {}) for part in ("mlflow", "prefect") if _alive(state.get(part, {}).get("pid"), part)}
    if not running:
        if database_url is None:
            _postgres_reachable(data)
        return
    if state.get("data_dir") != str(data):
        raise StackError(f"a stack for this project already runs with its data in {state['data_dir']}: use the same "
                         "--data-dir, or `bvpo stack down` first")
    wanted = {"mlflow": f"http://127.0.0.1:{ports.mlflow}", "prefect": f"http://127.0.0.1:{ports.prefect}"}
    for part, info in running.items():
        if info.get("url") and info["url"] != wanted[part]:
            raise StackError(f"this project's {part} server already runs on {info['url']}, not {wanted[part]}: use "
                             "the same ports, or `bvpo stack down` first")
    pg = state.get("postgres", {})
    if database_url is None and not pg.get("managed") and pg.get("port") not in (None, ports.postgres):
        raise StackError(f"this project's PostgreSQL already runs on port {pg['port']}, not {ports.postgres}: use the "
                         "same --postgres-port, or `bvpo stack down` first")


def _up(root: Path, data: Path, ports: Ports, artifacts: str | None, database_url: str | None,
        workers: int, started: list) -> dict:
    state = read_state(root) or {}
    logs = root / STACK_DIR / "logs"
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "HF_HOME", "HF_HUB_OFFLINE"):
        env.pop(key, None)  # servers and the worker serve every clone, not this project's settings
    if database_url is None:
        passfile = data / "pgpass"
        postgres = {"data": str(data / "postgres"), "port": ports.postgres, "passfile": str(passfile), "managed": False}
        # Recorded before it starts: whatever stops this call half-way can still stop PostgreSQL.
        state.update({"data_dir": str(data), "postgres": postgres, "work_pool": WORK_POOL})
        _write_state(root, state)
        if _start_postgres(data, ports.postgres, passfile):
            started.append(("postgres", None))
        _create_databases(ports.postgres, passfile)
        env["PGPASSFILE"] = str(passfile)
        base = f"postgresql://{DB_USER}@127.0.0.1:{ports.postgres}"
    else:
        base = database_url.rstrip("/")
        postgres = {"url": base, "passfile": os.environ.get("PGPASSFILE", ""), "managed": True}
    state.update({"data_dir": str(data), "postgres": postgres, "work_pool": WORK_POOL})
    _write_state(root, state)

    artifacts = artifacts or str(data / "artifacts")
    mlflow_url = f"http://127.0.0.1:{ports.mlflow}"
    mlflow_pid = state.get("mlflow", {}).get("pid")
    if not _alive(mlflow_pid, "mlflow"):
        mlflow_pid = _start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{base}/mlflow",
                             "--artifacts-destination", artifacts, "--serve-artifacts", "--host", "127.0.0.1",
                             "--port", str(ports.mlflow), "--workers", "1"], logs / "mlflow.log", env, root)
        started.append(("mlflow", mlflow_pid))
        state["mlflow"] = {"pid": mlflow_pid}
        _write_state(root, state)
        wait_http(f"{mlflow_url}/health", "MLflow server", mlflow_pid, logs / "mlflow.log")
    state.update(mlflow={"pid": mlflow_pid, "url": mlflow_url, "artifacts": artifacts}, tracking_uri=mlflow_url)
    _write_state(root, state)

    prefect_url = f"http://127.0.0.1:{ports.prefect}/api"
    prefect_pid = state.get("prefect", {}).get("pid")
    server_env = {**env, "PREFECT_HOME": str(data / "prefect"),
                  "PREFECT_SERVER_DATABASE_CONNECTION_URL": base.replace("postgresql://", "postgresql+asyncpg://", 1)
                  + "/prefect"}
    if not _alive(prefect_pid, "prefect"):
        prefect_pid = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                              str(ports.prefect), "--analytics-off"], logs / "prefect.log", server_env, root)
        started.append(("prefect", prefect_pid))
        state["prefect"] = {"pid": prefect_pid}
        _write_state(root, state)
        wait_http(f"{prefect_url}/health", "Prefect server", prefect_pid, logs / "prefect.log")
    state.update(prefect={"pid": prefect_pid, "url": prefect_url.removesuffix("/api")}, prefect_api_url=prefect_url)
    _write_state(root, state)

    # No MLFLOW_TRACKING_URI: each flow run resolves its own clone's tracking server (its params,
    # or this stack when the clone is this project), as `bvpo run` there would.
    _ensure_work_pool(prefect_url)  # before any worker: `bvpo schedule` may deploy the moment `up` returns
    worker_env = {**env, "PREFECT_API_URL": prefect_url}
    pids = [p for p in state.get("workers", []) if _alive(p, "worker")]
    for i in range(len(pids), workers):
        pids.append(_start([sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type",
                            "process", "--name", f"bvpo-{os.uname().nodename}-{ports.prefect}-{i}"],
                           logs / f"worker-{i}.log", worker_env, root))
        started.append(("worker", pids[-1]))
    state["workers"] = pids
    _write_state(root, state)
    return state


def _ensure_work_pool(api_url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
        except ObjectAlreadyExists:
            pass


def down(root: Path) -> list[str]:
    """Stop every part of the stack this project started; returns what was stopped."""
    root = root.resolve()
    state = read_state(root)
    if state is None:
        return []
    stopped = []
    for pid in state.get("workers", []):
        if _stop(pid, "worker"):  # a round running now ends, and stops its stages, with its worker
            stopped.append(f"worker {pid}")
    for name in ("prefect", "mlflow"):
        if _stop(state.get(name, {}).get("pid"), name):
            stopped.append(f"{name} server {state[name]['pid']}")
    if not state.get("postgres", {}).get("managed") and _stop_postgres(Path(state["data_dir"])):
        stopped.append("postgresql")
    state.update(workers=[], mlflow={**state.get("mlflow", {}), "pid": None},
                 prefect={**state.get("prefect", {}), "pid": None})
    _write_state(root, state)
    return stopped


def status(root: Path) -> list[tuple[str, bool, str]]:
    """(part, running, where) for each part of the local stack."""
    state = read_state(root.resolve())
    if state is None:
        return []
    rows = []
    pg = state.get("postgres", {})
    if pg.get("managed"):
        rows.append(("postgresql", True, f"{pg['url']} (not started by bvpo)"))
    else:
        running = subprocess.run(_as_postgres_user() + [_pg_bin("pg_ctl"), "-D", pg["data"], "status"],
                                 capture_output=True).returncode == 0
        rows.append(("postgresql", running, f"127.0.0.1:{pg['port']} (data {pg['data']})"))
    mlflow = state.get("mlflow", {})
    rows.append(("mlflow", _alive(mlflow.get("pid"), "mlflow"),
                 f"{mlflow.get('url', '')} (artifacts {mlflow.get('artifacts', '')})"))
    rows.append(("prefect", _alive(state.get("prefect", {}).get("pid"), "prefect"), state.get("prefect", {}).get("url", "")))
    workers = [p for p in state.get("workers", []) if _alive(p, "worker")]
    rows.append(("worker", bool(workers), f"{len(workers)} on work pool {state.get('work_pool')}"))
    return rows
