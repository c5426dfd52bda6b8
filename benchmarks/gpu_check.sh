#!/usr/bin/env bash
# GPU checks on a machine with CUDA: the trainer in bf16 with 1-process DDP and FSDP2
# (benchmarks/gpu_check.py), then the qwen3-0.6b recipe end to end on a Qwen3-0.6B-shaped model
# (benchmarks/gpu_recipe.py). Unattended, under 10 minutes; exit 0 = every check passed, 3 = no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
timeout 240 "$PY" benchmarks/gpu_check.py "$@"; first=$?
[ "$first" -eq 3 ] && exit 3
timeout 330 "$PY" benchmarks/gpu_recipe.py; second=$?
[ "$first" -eq 0 ] && [ "$second" -eq 0 ]
