"""Process environment: offline, no telemetry, caches inside the project.

Set before prefect, mlflow, dvc or huggingface are imported, since they read it at import.
Values a user already exported win (e.g. HF_HUB_OFFLINE=0 to fetch a hub model once).
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # Library bars ("Loading weights", "Saving the dataset") drown ours; ours stay on.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def configure_environment(project_dir: str | Path = ".") -> None:
    root = Path(project_dir).resolve()
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("HF_HOME", str(root / ".hf"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
