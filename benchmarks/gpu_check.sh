#!/usr/bin/env bash
# GPU check of the trainer (bf16, 1-process DDP and FSDP2) on a machine with CUDA; see
# benchmarks/gpu_check.py. Unattended, a few minutes; exit 0 = every check passed, 3 = no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
