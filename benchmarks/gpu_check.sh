#!/usr/bin/env bash
# The real-size GPU check (one GPU). Parts, chosen with PARTS (default "sd15 sdxl", about 5 minutes, at most 8):
#   sd15          SD1.5 shapes at 512 px, 50 DDIM steps, LoRA r32, bf16 autocast, micro-batch 1: DRaFT+ K=1,
#                 and K=50 with sampler checkpointing                                  -> gpu_realsize.json
#   sdxl          SDXL-base shapes at 1024 px, K=1                                     -> gpu_realsize_sdxl.json
#   sd35m_draftp  SD3.5-Medium (full MMDiT, T5-XXL all 24 blocks) at 512 px, 40 flow steps, guidance 4.5:
#                 DRaFT+ K=1 and K=40 with sampler checkpointing                       -> gpu_realsize_sd3.json
#   sd35m_grpo    SD3.5-Medium GRPO step (Flow-GRPO pickscore_sd3 settings): a group of 3 on 10 SDE steps,
#                 9 trained steps with the KL to the reference                         -> gpu_realsize_sd3_grpo.json
# The two SD3.5-M parts (at most 9 minutes; the first writes ~15 GB of pipeline) are a second command:
#   PARTS="sd35m_draftp sd35m_grpo" benchmarks/gpu_check.sh
# Random weights from the published configs (nothing downloaded), written once under $WORK. Seconds per
# step and peak GPU memory (torch.cuda.max_memory_allocated) beside the memory model's prediction, as
# JSON + Markdown in $RESULTS (default benchmarks/results), and one summary line per part in
# $RESULTS/gpu_check.log.
#
# Usage: benchmarks/gpu_check.sh            (needs .venv, or PYTHON=/path/to/python)
#        RESULTS=$OUT WORK=/tmp/nad PARTS="sd15" benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
WORK=${WORK:-${TMPDIR:-/tmp}/nad_gpu_check}
RESULTS=${RESULTS:-benchmarks/results}
PARTS=${PARTS:-sd15 sdxl}
for p in $PARTS; do
  case $p in sd15|sdxl|sd35m_draftp|sd35m_grpo) ;;
    *) echo "gpu_check: PARTS: unknown part '$p' (expected sd15, sdxl, sd35m_draftp, sd35m_grpo)" >&2; exit 2;;
  esac
done
mkdir -p "$WORK" "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NAD_RESULTS_DIR="$RESULTS"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device; nothing measured" | tee "$RESULTS/gpu_check.log"
  exit 0
fi
status=0
part() {  # name, seconds allowed, arguments of bench_gpu_realsize.py
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0;; esac
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
part sd35m_draftp 360 --family sd3 --configs 1,Tc --steps 40 --warmup 1 --repeats 2
part sd35m_grpo 180 --family sd3 --algorithm grpo --steps 10 --micro-batch 3 --warmup 1 --repeats 2
exit $status
