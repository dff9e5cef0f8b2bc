#!/usr/bin/env bash
# Fused stage 2 on a GPU: benchmarks/bench_fused.py at two sizes, fp32 and bf16, in one report.
#
# Run from the repository root on a machine with a CUDA GPU:
#     OUT=gpu-fused PYTHON=python3 bash benchmarks/gpu_fused.sh
# It needs torch (a CUDA build), torch-geometric, transformers, accelerate, pandas, scipy, pyyaml,
# safetensors, tqdm, pillow and psutil, and none of the project's sweep, report or dataset-wheel
# dependencies (Ray, Optuna, plotly, PyKEEN, the encoder wheels): both graphs are synthetic and the
# text encoder is off, so it also runs under a GPU image's own Python without the project's venv.
#
#   small-*   synthetic:small (200 entities, 3,000 training triples), the default denoiser (width
#             1024), 16 members, 5 stage-1 and 3 stage-2 epochs; fp32 with the three sides
#             (lone, fused, plain: every member its own stage 1), then bf16 (lone, fused);
#   fb15k-*   the fb15k-237-img preset's 14,541 entities with random frozen features, width 1024,
#             16 members, one stage-2 epoch over 4,096 queries; fp32 and bf16 (lone, fused).
# The fp32 steps also count the operators and device reads of a fused training batch
# (--count-ops: one more, profiled epoch after the timed sides).
# Each step's JSON and log land in $OUT; STEP_TIMEOUT (seconds, default 240) caps each step.

set -uo pipefail
OUT="${OUT:-gpu-fused}"
PYTHON="${PYTHON:-.venv/bin/python}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export DIFFCOM_CACHE_DIR="${DIFFCOM_CACHE_DIR:-${TMPDIR:-/tmp}/gpu-fused-cache}"
mkdir -p "$OUT"
LOG="$OUT/gpu_fused.log"

{
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    git rev-parse HEAD 2>/dev/null || echo "revision unknown"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} >"$LOG" 2>&1

step() {
    local name="$1"
    shift
    echo "== $name: $*" >>"$LOG"
    local started=$SECONDS
    timeout "$STEP_TIMEOUT" "$PYTHON" benchmarks/bench_fused.py "$@" --out "$OUT/$name.json" \
        >>"$LOG" 2>&1
    echo "== $name: exit $?, $((SECONDS - started)) s" >>"$LOG"
}

SMALL=(--dataset synthetic:small --text-encoder none --width 1024 --members 16
    --stage1-epochs 5 --stage2-epochs 3)
SCALE=(--scale fb15k-237 --width 1024 --members 16 --stage1-epochs 1 --stage2-epochs 1
    --queries 4096)
step small-fp32 "${SMALL[@]}" --plain --count-ops
step fb15k-fp32 "${SCALE[@]}" --count-ops
step small-bf16 "${SMALL[@]}" --precision bf16
step fb15k-bf16 "${SCALE[@]}" --precision bf16
grep -h '^ratio\|^== ' "$LOG"
