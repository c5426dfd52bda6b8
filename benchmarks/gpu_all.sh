#!/usr/bin/env bash
# Issue 22's GPU figures in one unattended call of under 10 minutes, most wanted first, each step
# under its own time limit so that a slow one cannot eat the others' time:
#   1. gpu_scale.py training (bvpo, α = 0.5) on the Qwen3-0.6B shape with ~2k-token traces: packed
#      rows under FlexAttention, the same with compiled layers, padded micro-batches (TFLOP/s, MFU);
#   2. its sampling rates, thinking mode: dynamic cache at batch 64 (the 793 tokens/s baseline,
#      re-measured on the same GPU) against the static cache at 64 and 256;
#   3. trl_compare.py --qwen3-shape: BVPO (packed rows) against TRL's DPOTrainer in both shapes,
#      same GPU, model and pairs;
#   4. gpu_check.py (DDP/FSDP2 step-0 log-ratio, checkpointing and compile gradients), if time is left.
#
#   make gpu-kit                           # on a machine with an index: the wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu_all.sh [budget_s]  # on the GPU machine (carrying .whl/); default 540 s
#   SMOKE=1 bash benchmarks/gpu_all.sh     # every step on a CPU at a tiny size: checks the scripts, times nothing
#
# Logs go to $OUT (default /tmp/gpu_all): one per step, summary.txt with each step's exit status
# and the lines that carry the figures, packages.txt (the machine's pip list). Exit 0 when every
# step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
start=$(date +%s)
OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "gpu_all: $*" | tee -a "$summary"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  target=$(cat .whl/TARGET 2>/dev/null)
  here=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$target" != "$here" ]; then
    say ".whl/ was built for Python ${target:-?}, this is $here: rebuild it with benchmarks/gpu_kit.py build --python-version $here"
    exit 4
  fi
  # --target: beside the image's packages, ahead of them on PYTHONPATH (transformers is newer).
  "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --no-compile --upgrade --target /tmp/site .whl/*.whl \
    || { say "installing .whl/ failed"; exit 4; }
  "$PY" -m compileall -q -j 0 /tmp/site > /dev/null  # once here, not in every stage's process
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$PY" benchmarks/gpu_kit.py check 2>&1 | tee -a "$summary"  # unmet requirements are reported, not fatal
# Metadata is not imports: the packages the steps need, imported once (an error here names the culprit).
"$PY" -c "import datasets, mlflow, math_verify, transformers, accelerate, bvpo.train; from trl import DPOTrainer" \
  2>&1 | tail -n 5 | tee -a "$summary"
# The machine's own packages (without the carried ones): real versions for benchmarks/gpu_image.txt.
env -u PYTHONPATH "$PY" -m pip list --format=freeze > "$OUT/packages.txt" 2>/dev/null

failed=0
left() { echo $(( budget - ($(date +%s) - start) )); }
# step NAME LIMIT_S LEAST_S COMMAND...: runs COMMAND for at most LIMIT_S (less if the budget is
# shorter), skipped when fewer than LEAST_S seconds are left.
step() {
  local name=$1 limit=$2 least=$3 remaining t0 rc
  shift 3
  remaining=$(left)
  if [ "$remaining" -lt "$least" ]; then
    say "$name skipped: ${remaining} s left of ${budget} s, it needs ${least} s"
    return
  fi
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  say "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ', stopped at its limit')"
  grep -E "PASS|FAIL|pairs/s|tokens/s|MFU|TFLOP|x;|ratio|Error|error:" "$OUT/$name.log" | tail -n 40 | tee -a "$summary"
  [ "$rc" -ne 0 ] && failed=1
}

if [ "${SMOKE:-0}" = 1 ]; then
  scale=(--allow-cpu --shape tiny --trace-tokens 150 --answer-tokens 20 --new-tokens 16)
  trl=(--steps 2 --trainers bvpo,trl_micro)  # the CPU rows on the project's (or synthetic) pairs: --qwen3-shape needs a GPU
  check=(--allow-cpu --steps 6)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
  scale=()
  # BVPO's GPU configuration (packed rows) against TRL's two shapes, the micro-batched one first
  # (the whole batch of 16 sequences of ~2k tokens may run out of memory); each trainer capped.
  # Each row's pairs/s is printed as it finishes, so a step cut at its limit still gives the ratio.
  trl=(--qwen3-shape --steps 6 --trainer-timeout 70 --trainers bvpo_bf16_packed,trl_bf16_micro,trl_bf16)
  check=()
fi
# ${a[@]+"${a[@]}"}: an empty array under set -u on bash before 4.4.
# Padded micro-batches (ddp) were measured on an H200 before (docs/scaling.md): last, if time is left.
step scale_train 220 90 "$PY" benchmarks/gpu_scale.py --variants packed,packed_compile,ddp --methods bvpo --steps 6 \
  --no-sampling ${scale[@]+"${scale[@]}"}
step scale_sample 130 60 "$PY" benchmarks/gpu_scale.py --variants "" --sampling-modes think --no-one-by-one \
  ${scale[@]+"${scale[@]}"}
step trl 170 90 "$PY" benchmarks/trl_compare.py --rounds 1 "${trl[@]}"
step check 200 120 "$PY" benchmarks/gpu_check.py ${check[@]+"${check[@]}"}
say "done in $(( $(date +%s) - start )) s of ${budget} s"
exit $failed
