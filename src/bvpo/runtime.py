"""Process environment: no telemetry, offline unless the run names a hub model, caches inside
the project.

Set before prefect, mlflow, dvc or huggingface are imported, since they read it at import.
Values a user already exported win. A run on the embedded model (or on local model folders)
is offline with its Hugging Face cache in the project; a run that names a hub id
(`model.path: Qwen/Qwen3-0.6B`) keeps the user's own HF_HOME and network settings, so the
model is downloaded once into the cache the user already has.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

from .errors import BvpoError

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # Library bars ("Loading weights", "Saving the dataset") drown ours; ours stay on.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def hub_models(project_dir: Path, params_file: str = "params.yaml") -> list[str]:
    """The hub ids (not local folders) that the project's params name as models."""
    import yaml

    try:
        raw = yaml.safe_load((project_dir / params_file).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # load_params reports a broken file with its reason
    named = []
    for section, key in (("model", "path"), ("pairs", "reward_model"), ("evaluate", "win_rate_reward_model")):
        values = raw.get(section) if isinstance(raw, dict) else None
        named.append(values.get(key) if isinstance(values, dict) else None)
    return [m for m in named if isinstance(m, str) and not m.startswith((".", "/", "~"))
            and not (project_dir / m).exists()]


def configure_environment(project_dir: str | Path = ".", params_file: str = "params.yaml") -> None:
    root = Path(project_dir).resolve()
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    if not hub_models(root, params_file):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HOME", str(root / ".hf"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class ProjectBusy(BvpoError, RuntimeError):
    """Another pipeline or experiment run holds the project."""


LOCK_FILE = ".bvpo.lock"


@contextlib.contextmanager
def project_lock(project_dir: str | Path, what: str):
    """Hold the project for one pipeline or experiment run. Two runs at once would write the
    same data/ outputs, checkpoints and dvc.lock; the second is refused, naming the first. The
    lock is an advisory `flock`, so the kernel drops it when its holder dies (a killed run
    never leaves the project locked)."""
    import fcntl
    import json
    import time

    path = Path(project_dir).resolve() / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ProjectBusy(f"{path.parent} is busy: another run holds {path} ({holder}). Wait for it to "
                          "finish, or stop it; a second run at once would overwrite its outputs") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "run": what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def files_digest(folder: Path, limit_bytes: int = 1 << 30) -> str:
    """Content hash of a folder's files (name, size and mtime only past `limit_bytes`)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        if total <= limit_bytes:
            h.update(p.read_bytes())
        else:
            h.update(f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def launch_command(module: str, module_args: list[str], num_processes: int, config_file: str | None = None,
                   mixed_precision: str = "fp32", threads_per_process: int | None = None,
                   ) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of `python -m <module>` on `num_processes` processes. On a CPU-only
    machine several processes need --multi_gpu plus ACCELERATE_USE_CPU (gloo); `--cpu
    --num_processes N` silently runs one. accelerate pins each process to ONE OpenMP thread
    unless told otherwise, so on a CPU the cores are shared out explicitly."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    on_cpu = not torch.cuda.is_available()
    if config_file:
        cmd += ["--config_file", config_file, "--num_processes", str(num_processes)]
    elif num_processes > 1:
        # One machine: the processes meet over loopback. (torch's TCPStore still listens on every
        # interface; it has no bind address to give.)
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(29500 + os.getpid() % 1000)]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += ["--mixed_precision", "no" if mixed_precision == "fp32" else mixed_precision]
    if on_cpu:
        threads = threads_per_process or max(1, (os.cpu_count() or 1) // num_processes)
        cmd += ["--num_cpu_threads_per_process", str(threads)]
        # --multi_gpu only spawns the processes; without this each would work alone.
        env["ACCELERATE_USE_CPU"] = "true"
    return cmd + ["-m", module, *module_args], env


def stop_process_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process and all its descendants, then SIGKILL what is left after `grace_s`.
    Descendants are listed first: a launcher's workers often run in sessions of their own, out of
    reach of a signal to the launcher's process group."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
