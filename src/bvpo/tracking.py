"""MLflow, and only here. Every other module calls these functions, never mlflow itself.

Store: `sqlite:///<project>/mlruns/mlflow.db` with artifacts under `<project>/mlruns/artifacts`
(absolute, because relative sqlite URIs resolve against whatever the cwd is). A pipeline run
is a parent run; each stage and each trained method is a child run. Stages learn their parent
from `BVPO_PARENT_RUN_ID`, so a stage run by `dvc repro` inside the Prefect flow nests under
the flow's parent run, and a stage run by a bare `dvc repro` gets a run of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from .errors import BvpoError

PARENT_ENV = "BVPO_PARENT_RUN_ID"
FLOW_RUN_ENV = "BVPO_PREFECT_FLOW_RUN_ID"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri(project_dir: str | Path) -> str:
    return f"sqlite:///{(Path(project_dir).resolve() / 'mlruns' / 'mlflow.db')}"


def active_uri(project_dir: str | Path) -> str:
    """The store this process logs to: an exported MLFLOW_TRACKING_URI (a team's server), else the
    project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(project_dir)


def artifact_root(project_dir: str | Path) -> Path:
    return Path(project_dir).resolve() / "mlruns" / "artifacts"


def ui_url(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link that opens the experiment (or one run) on its training runs. MLflow 3.17's UI
    ignores `mlflow.experimentKind` and picks its GenAI or "Model training" view from the
    `workflowType` URL parameter (else from the browser's last choice, GenAI by default)."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/{path}?workflowType=machine_learning"


def find_experiment_id(project_dir: str | Path, experiment: str) -> str | None:
    """The id of `experiment` in the project's store, or None (no store, no such experiment)."""
    if "MLFLOW_TRACKING_URI" not in os.environ and not (Path(project_dir) / "mlruns" / "mlflow.db").is_file():
        return None
    found = _client(project_dir).get_experiment_by_name(experiment)
    return found.experiment_id if found is not None else None


def configure(project_dir: str | Path, experiment: str) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = active_uri(project_dir)
    embedded = uri == tracking_uri(project_dir)
    if embedded:
        (Path(project_dir) / "mlruns").mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        # A tracking server keeps artifacts where it was told to (served to every client).
        experiment_id = mlflow.create_experiment(
            experiment, artifact_location=artifact_root(project_dir).as_uri() if embedded else None
        )
    if (found is None or found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND):
        # MLflow 3's UI picks an experiment's landing page from this tag; without it the
        # experiment opens on the GenAI "Overview" (traces, latency) instead of the runs.
        mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def provenance_tags(project_dir: str | Path) -> dict[str, str]:
    """Git SHA, dvc.lock hash and Prefect flow-run id: what it takes to find this run again."""
    tags = {}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True,
                             text=True, check=True).stdout.strip()
        tags["git_sha"] = sha
    except (OSError, subprocess.CalledProcessError):
        pass
    lock = Path(project_dir) / "dvc.lock"
    if lock.is_file():
        tags["dvc_lock_md5"] = hashlib.md5(lock.read_bytes()).hexdigest()
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


@contextlib.contextmanager
def pipeline_run(project_dir: str | Path, experiment: str, params: dict, run_name: str,
                 kind: str = "pipeline", tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline round (or experiment); yields its id and exports it to
    child processes."""
    import mlflow

    configure(project_dir, experiment)
    all_tags = {**provenance_tags(project_dir), "kind": kind, **(tags or {})}
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        mlflow.log_params(flat)
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


@contextlib.contextmanager
def stage_run(project_dir: str | Path, experiment: str, name: str, params: dict | None = None,
              tags: dict | None = None) -> Iterator[str]:
    """A child run of the current pipeline run (or a standalone run when there is none)."""
    import mlflow

    configure(project_dir, experiment)
    parent = os.environ.get(PARENT_ENV)
    all_tags = {**provenance_tags(project_dir), "stage": name, **(tags or {})}
    with mlflow.start_run(run_name=name, parent_run_id=parent, tags=all_tags, nested=parent is not None) as run:
        if params:
            flat: dict[str, Any] = {}
            _flatten("", params, flat)
            mlflow.log_params(flat)
        yield run.info.run_id


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)


def log_history(history: list[dict[str, float]], step_key: str = "step") -> None:
    """Per-step metrics in batches (one SQL round-trip per 1000 values, not one per value)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    run_id = mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row[step_key]))
        for row in history for key, value in row.items() if key != step_key and value is not None
    ]
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_dict(obj: dict, artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(obj, artifact_file)


def log_and_register_model(model_dir: str | Path, registered_model: str, tags: dict[str, str]) -> str:
    """Log a saved HF model with the transformers flavour and register a new version carrying
    all of `tags` from its creation (one registry write: a version is never seen half-tagged).
    The champion alias is moved separately, by `set_champion`, after the version exists."""
    import logging

    import mlflow
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Offline, the flavour warns that it cannot fetch a hub model card or licence: expected.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    import accelerate
    import torch
    import transformers

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        # Explicit requirements: inference would otherwise import torchvision to guess them.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"transformers=={transformers.__version__}",
                          f"accelerate=={accelerate.__version__}"],
    )
    version = mlflow.register_model(info.model_uri, registered_model, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


# ----------------------------------------------------------------------------- the registry, for rounds
CHAMPION_ALIAS = "champion"
# A version whose promotion `bvpo champion set` undid: a rerun of its round never promotes it again.
REPLACED_TAG = "champion_replaced_by"


class RegistryError(BvpoError, LookupError):
    """A registered model or version the project asks for is not in its MLflow store."""


def _client(project_dir: str | Path):
    import mlflow

    return mlflow.MlflowClient(active_uri(project_dir))


def champion_version(project_dir: str | Path, registered_model: str) -> str | None:
    """The version `@champion` points at, or None (no store, no model, no alias yet)."""
    from mlflow.exceptions import MlflowException

    if "MLFLOW_TRACKING_URI" not in os.environ and not (Path(project_dir) / "mlruns" / "mlflow.db").is_file():
        return None
    try:
        return str(_client(project_dir).get_model_version_by_alias(registered_model, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def set_champion(project_dir: str | Path, registered_model: str, version: str) -> None:
    """Point `@champion` at `version` (idempotent: setting it again changes nothing)."""
    from mlflow.exceptions import MlflowException

    client = _client(project_dir)
    try:
        client.get_model_version(registered_model, version)
    except MlflowException:
        raise RegistryError(f"registered model {registered_model!r} has no version {version}") from None
    client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)


def set_champion_by_hand(project_dir: str | Path, registered_model: str, version: str | None, reason: str) -> str | None:
    """`bvpo champion set`: point `@champion` at `version` (None: remove it, so rounds start from
    the base model again) and record the event as tags: on the new champion who set it from what
    and why; on the one it replaces `champion_replaced_by`, so a rerun of that one's round never
    promotes it again. Tags first, alias last: repeating the command finishes a killed one.
    Returns the champion it replaced (None: the base model)."""
    import datetime

    client = _client(project_dir)
    previous = champion_version(project_dir, registered_model)
    if version is not None:
        set_version_tags(project_dir, registered_model, version, {
            "champion_set_reason": reason, "champion_set_from": previous or "base",
            "champion_set_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    if previous is not None and previous != version:
        set_version_tags(project_dir, registered_model, previous, {REPLACED_TAG: version or "base"})
    if version is None:
        if previous is not None:
            client.delete_registered_model_alias(registered_model, CHAMPION_ALIAS)
    else:
        set_champion(project_dir, registered_model, version)
    return previous


def model_versions(project_dir: str | Path, registered_model: str) -> list[dict[str, str]]:
    """Every version of `registered_model` as its tags plus `version` (empty when there is none)."""
    if "MLFLOW_TRACKING_URI" not in os.environ and not (Path(project_dir) / "mlruns" / "mlflow.db").is_file():
        return []
    found = _client(project_dir).search_model_versions(f"name = '{registered_model}'")
    return [{**v.tags, "version": str(v.version)} for v in found]


def set_version_tags(project_dir: str | Path, registered_model: str, version: str, tags: dict[str, str]) -> None:
    from mlflow.exceptions import MlflowException

    client = _client(project_dir)
    try:
        client.get_model_version(registered_model, version)
    except MlflowException:
        raise RegistryError(f"registered model {registered_model!r} has no version {version}") from None
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, str(value))


def download_model_version(project_dir: str | Path, registered_model: str, version: str,
                           out_dir: str | Path) -> None:
    """A registered version as a plain Hugging Face model directory (weights, config, tokenizer
    and chat template), which is how every stage loads a model."""
    import shutil
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = active_uri(project_dir)
    try:
        _client(project_dir).get_model_version(registered_model, version)
    except MlflowException:
        raise RegistryError(f"registered model {registered_model!r} has no version {version} in {uri} "
                            f"(data/champion.json names it; set its version to null to start from the base "
                            f"model)") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model}/{version}",
                                                         dst_path=tmp, tracking_uri=uri))
        # The transformers flavour keeps weights under model/ and the tokenizer under components/.
        for part in (local / "model", local / "components" / "tokenizer"):
            if not part.is_dir():
                raise RegistryError(f"{registered_model} v{version}: no {part.relative_to(local)}/ in its "
                                    "artifacts (not logged by bvpo's transformers flavour)")
            for item in part.iterdir():
                shutil.move(str(item), out_dir / item.name)
