#!/usr/bin/env bash
# GPU check: the GPU paths of this project at smoke size, plus the scale benchmark, in one report.
#
# On a machine with a CUDA GPU it runs, timing each step:
#   1. train   a UMLS run with train.mixed_precision=bf16 and a few epochs (Accelerate puts it on
#              the GPU; the step fails if results.json says it ran elsewhere);
#   2. eval    that run's evaluation: results.json test metrics under the clean protocol and the
#              official min-of-S protocol, and the inference time per query. bench_eval.py is not
#              run: it has no GPU option (it times CPU ranking against PyKEEN);
#   3. sweep   a 2-cell ablation whose trials each ask for `gpus: 0.5` (both fit on one GPU), with
#              `diffcom sweep launch` on a local Ray, then `diffcom sweep status`;
#   4. ddp     with 2 or more GPUs, `accelerate launch --multi_gpu --num_processes 2` training
#              (skipped, and said so, with one GPU);
#   5. scale   benchmarks/bench_scale.py --quick at 15k and 41k entities (that benchmark trains on
#              the CPU, so these are CPU figures from the GPU machine).
# Everything goes to ${OUT:-gpu-check}/gpu_check.md: the machine (GPUs, torch and CUDA versions,
# date, git revision), then each step's command, exit status, wall time and key figures; full logs
# are under ${OUT}/logs/. A failed step is recorded and the next one runs; the script exits 1 at the
# end when any step failed, and 2 at once (starting nothing) when no GPU is visible.
#
# Run it from the repository root, whenever a GPU machine is at hand, with a venv holding a CUDA
# build of torch (README: install the CUDA torch first, then `pip install -e '.[dev]'` without
# constraints.txt):
#     OUT=gpu-check bash benchmarks/gpu_check.sh
# VENV (default .venv) names the venv; STEP_TIMEOUT (seconds, default 600) caps each step.
# Nothing is downloaded: the offline variables below are exported. Fused stage 2 on a GPU (lone
# against packed members, fp32 and bf16, two sizes) is benchmarks/gpu_fused.sh, which needs no venv.

set -euo pipefail

OUT="${OUT:-gpu-check}"
VENV="${VENV:-.venv}"
STEP_TIMEOUT="${STEP_TIMEOUT:-600}"
PYTHON="$VENV/bin/python"
REPORT="$OUT/gpu_check.md"
LOGS="$OUT/logs"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYSTOW_HOME="${PYSTOW_HOME:-/tmp/pystow}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Caches (features, generated graphs) stay out of $OUT, whose files are the report.
export DIFFCOM_CACHE_DIR="${DIFFCOM_CACHE_DIR:-${TMPDIR:-/tmp}/gpu-check-cache}"

if [[ ! -f core/config.py || ! -d benchmarks ]]; then
    echo "gpu_check.sh: run it from the repository root (no core/config.py here: $PWD)" >&2
    exit 2
fi
if [[ ! -x "$PYTHON" ]]; then
    echo "gpu_check.sh: no Python at $PYTHON; create the venv or set VENV" >&2
    exit 2
fi
mkdir -p "$OUT" "$LOGS"

# ------------------------------------------------------------------------------ no GPU: stop here
cuda="$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>&1 | tail -n 1 || true)"
if [[ "$cuda" != "True" ]]; then
    message="gpu_check.sh: no GPU visible (torch.cuda.is_available() printed: ${cuda:-nothing}); nothing was run. Run this on a machine with a CUDA GPU and a CUDA build of torch in $VENV."
    {
        echo "# GPU check"
        echo
        echo "$message"
    } >"$REPORT"
    echo "$message" >&2
    exit 2
fi

# ------------------------------------------------------------------------------ report helpers
failed=()
now_ms() { date +%s%3N; }

# step NAME COMMAND...: run COMMAND under the step timeout with its output in logs/NAME.log, and
# record the command, exit status and wall time. Never stops the script.
step() {
    local name="$1"
    shift
    local log="$LOGS/$name.log"
    local start end status=0
    {
        echo
        echo "## $name"
        echo
        echo '```'
        printf '%q ' "$@"
        echo
        echo '```'
    } >>"$REPORT"
    echo "gpu_check.sh: $name ..." >&2
    start="$(now_ms)"
    timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1 || status=$?
    end="$(now_ms)"
    LAST_STATUS=$status
    {
        echo
        echo "- exit status: $status$([[ $status -eq 124 ]] && echo " (timed out after ${STEP_TIMEOUT}s)")"
        echo "- wall time: $(((end - start) / 1000)).$(printf '%03d' $(((end - start) % 1000))) s"
        echo "- log: logs/$name.log"
    } >>"$REPORT"
    if [[ $status -ne 0 ]]; then
        failed+=("$name")
        figures "last lines of the log" tail -n 25 "$log"
    fi
    echo "gpu_check.sh: $name: exit $status" >&2
}

# figures TITLE COMMAND...: COMMAND's output as a fenced block under TITLE.
figures() {
    local title="$1"
    shift
    {
        echo
        echo "$title:"
        echo
        echo '```'
        "$@" 2>&1 || echo "(exit $?)"
        echo '```'
    } >>"$REPORT"
}

# fail NAME REASON: mark a step that exited 0 as failed after checking its figures.
fail() {
    [[ " ${failed[*]} " == *" $1 "* ]] || failed+=("$1")
    echo "- **failed check**: $2" >>"$REPORT"
}

# The figures of one run directory; exits 1 when the run did not use a GPU.
run_figures() {
    "$PYTHON" - "$1" <<'PY'
import json
import sys
from pathlib import Path

results = json.loads((Path(sys.argv[1]) / "results.json").read_text())
environment = results.get("environment", {})
print("environment:", json.dumps(environment))
print("timings:", json.dumps(results.get("timings", {})))
for name, metrics in results["test"].items():
    if isinstance(metrics, dict) and "mrr" in metrics:
        print(f"test {name}:", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
print("test inference ms/query:", results["test"].get("inference_ms_per_query"))
sys.exit(0 if "cuda" in str(environment.get("device", "")) else 1)
PY
}

# ------------------------------------------------------------------------------ the machine
{
    echo "# GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- git revision: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- host: $(uname -n), $(nproc) CPUs"
    echo "- step timeout: ${STEP_TIMEOUT}s"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || echo "(nvidia-smi failed)"
    echo '```'
    echo
    echo '```'
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version()); print("bf16 supported:", torch.cuda.is_bf16_supported())' 2>&1
    echo '```'
} >"$REPORT"

gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"

# Small but real: UMLS with its MiniLM text features, the default model widths, few epochs.
TRAIN_SETTINGS=(
    --set features.image_encoder=none
    --set train.stage1_epochs=3
    --set train.stage2_epochs=2
    --set train.patience=0
    --set eval.official_samples=2
)

# ------------------------------------------------------------------------------ 1. train (bf16)
step 1-train-bf16 "$VENV/bin/python" -m diffcom train --quiet --dataset umls --out "$OUT/run-bf16" \
    --set train.mixed_precision=bf16 "${TRAIN_SETTINGS[@]}"
train_status=$LAST_STATUS

# ------------------------------------------------------------------------------ 2. evaluation
{
    echo
    echo "## 2-eval"
    echo
    echo "The bf16 run's evaluation (results.json). benchmarks/bench_eval.py has no GPU option, so it"
    echo "is not run here."
} >>"$REPORT"
if [[ $train_status -eq 0 && -f "$OUT/run-bf16/results.json" ]]; then
    figures "figures" run_figures "$OUT/run-bf16"
    run_figures "$OUT/run-bf16" >/dev/null 2>&1 || fail 2-eval "results.json does not say the run used a GPU"
else
    fail 2-eval "step 1 wrote no results.json"
fi

# ------------------------------------------------------------------------------ 3. sweep, gpus 0.5
STUDY="$OUT/gpu-smoke.yaml"
cat >"$STUDY" <<EOF
# diffcom sweep launch $STUDY --name gpu-smoke --storage $OUT/experiments
# Two cells at smoke size, each trial asking for half a GPU, so both run at once on one GPU.
name: gpu-smoke
kind: ablation
overrides:
  data.dataset: nations
  features.image_encoder: none
  model.hidden_dim: 32
  model.num_heads: 2
  structure.max_nodes: 8
  diffusion.steps: 5
  diffusion.denoiser_width: 32
  train.stage1_epochs: 2
  train.stage2_epochs: 1
  train.patience: 0
  train.batch_size: 64
  eval.official_samples: 2
seeds: [0]
resources: {cpus: 1, gpus: 0.5, workers: 1}
metric: valid.clean.mrr
mode: max
variants:
  full: {}
  no-mgat:
    structure.encoder: none
EOF
step 3-sweep-gpus-0.5 "$VENV/bin/python" -m diffcom sweep launch "$STUDY" --name gpu-smoke \
    --storage "$OUT/experiments"
step 3-sweep-status "$VENV/bin/python" -m diffcom sweep status gpu-smoke --storage "$OUT/experiments"
[[ $LAST_STATUS -ne 0 ]] || figures "sweep status" cat "$LOGS/3-sweep-status.log"
trial_results=()
while IFS= read -r -d '' found; do
    trial_results+=("$(dirname "$found")")
done < <(find "$OUT/experiments/gpu-smoke/runs" -name results.json -print0 2>/dev/null)
for trial in "${trial_results[@]}"; do
    figures "trial ${trial#"$OUT/experiments/gpu-smoke/runs/"}" run_figures "$trial"
    run_figures "$trial" >/dev/null 2>&1 || fail 3-sweep-gpus-0.5 "trial $trial did not use a GPU"
done
if [[ ${#trial_results[@]} -ne 2 ]]; then
    fail 3-sweep-gpus-0.5 "expected 2 finished trials, found ${#trial_results[@]}"
fi

# ------------------------------------------------------------------------------ 4. two processes
if [[ "$gpus" -ge 2 ]]; then
    step 4-accelerate-2-gpus "$VENV/bin/accelerate" launch --multi_gpu --num_processes 2 \
        -m diffcom train --quiet --dataset umls --out "$OUT/run-ddp" "${TRAIN_SETTINGS[@]}"
    if [[ $LAST_STATUS -eq 0 ]]; then
        figures "figures" run_figures "$OUT/run-ddp"
        "$PYTHON" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["environment"]["processes"] != 2)' \
            "$OUT/run-ddp/results.json" || fail 4-accelerate-2-gpus "results.json does not say 2 processes"
    fi
else
    printf '\n## 4-accelerate-2-gpus\n\nskipped: %s GPU(s) visible, 2 needed.\n' "$gpus" >>"$REPORT"
fi

# ------------------------------------------------------------------------------ 5. scale benchmark
step 5-bench-scale "$VENV/bin/python" benchmarks/bench_scale.py --quick --sizes 15k,41k
figures "bench_scale output" grep -v '^RESULT ' "$LOGS/5-bench-scale.log"

# ------------------------------------------------------------------------------ verdict
echo >>"$REPORT"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "**FAILED steps:** ${failed[*]}" >>"$REPORT"
    echo "gpu_check.sh: failed steps: ${failed[*]}; see $REPORT" >&2
    exit 1
fi
echo "**All steps passed.**" >>"$REPORT"
echo "gpu_check.sh: all steps passed; see $REPORT" >&2
