#!/usr/bin/env bash
# The real-size GPU check (one GPU, about 5 minutes, at most 8): SD1.5 shapes at 512 px, 50 DDIM steps,
# LoRA r32, bf16 autocast, micro-batch 1 — K=1, and K=50 with sampler checkpointing — then SDXL-base shapes
# at 1024 px K=1. Random weights from the published configs (nothing downloaded), written once under
# $WORK. Seconds per step and peak GPU memory (torch.cuda.max_memory_allocated) beside the memory model's
# prediction, as JSON + Markdown in $RESULTS (default benchmarks/results; gpu_realsize.json and
# gpu_realsize_sdxl.json), and one summary line per part in $RESULTS/gpu_check.log.
#
# Usage: benchmarks/gpu_check.sh            (needs .venv, or PYTHON=/path/to/python)
#        RESULTS=$OUT WORK=/tmp/nad benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
WORK=${WORK:-${TMPDIR:-/tmp}/nad_gpu_check}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$WORK" "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NAD_RESULTS_DIR="$RESULTS"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device; nothing measured" | tee "$RESULTS/gpu_check.log"
  exit 0
fi
status=0
part() {  # name, seconds allowed, arguments of bench_gpu_realsize.py
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$PYTHON" benchmarks/bench_gpu_realsize.py --workdir "$WORK" "$@" > "$RESULTS/gpu_check_$name.out" 2>&1; then
    echo "$name: ok in $((SECONDS - t0)) s" | tee -a "$RESULTS/gpu_check.log"
  else
    echo "$name: FAILED (exit $?) after $((SECONDS - t0)) s; see gpu_check_$name.out" | tee -a "$RESULTS/gpu_check.log"
    tail -5 "$RESULTS/gpu_check_$name.out"
    status=1
  fi
}
: > "$RESULTS/gpu_check.log"
part sd15 240 --family sd --configs 1,Tc --steps 50 --warmup 1 --repeats 2
part sdxl 220 --family sdxl --configs 1 --steps 50 --warmup 1 --repeats 2
exit $status
