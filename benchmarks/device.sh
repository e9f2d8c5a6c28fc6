#!/usr/bin/env bash
# GPU checks in one script (< 8 minutes on an H100/H200-class GPU): the CUDA tests, then the GPU
# benchmark cells, each result checked before it is timed:
#   - ViT-B/16, K=6, r=16, float32 and bfloat16;
#   - a 7B model's q/v attention, K=18, r=16, float32 and bfloat16;
#   - Llama-3-8B, all 7 linears of its 32 blocks (224 layers), K=20, r=16, bfloat16.
# Every registered aggregator and variant runs; the dense references (minutes each) do not.
# Writes results.{json,md} under $OUT_DIR (default benchmarks/results/gpu, to commit with the
# README's numbers) and a summary to $OUT_DIR/device.log. On a machine without CUDA it says so
# and exits 0 without running anything.
#
#   bash benchmarks/device.sh           # PYTHON=... OUT_DIR=... REPEATS=... CELL_TIMEOUT=... to override
#   bash benchmarks/device.sh --cpu     # check the script itself on a CPU: the same cells on the
#                                       # first two layers only, one timed call each, written
#                                       # under runs/device-cpu (ignored by git) unless OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if [ "${1:-}" = "--cpu" ]; then
    OUT_DIR="${OUT_DIR:-runs/device-cpu}"  # a check of the script, not results to keep
else
    OUT_DIR="${OUT_DIR:-benchmarks/results/gpu}"
fi
REPEATS="${REPEATS:-11}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device.log"

if [ "${1:-}" = "--cpu" ]; then
    DEVICE=cpu
    EXTRA=(--max-layers 2 --warmup 0)
    REPEATS=1
    CELL_TIMEOUT="${CELL_TIMEOUT:-1200}"
    echo "device.sh --cpu: checking the script's cells on the CPU (first two layers only)" | tee "$LOG"
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "device.sh: no CUDA device (torch.cuda.is_available() is False): skipping the CUDA tests and GPU cells" | tee "$LOG"
        exit 0
    fi
    DEVICE=cuda
    EXTRA=(--warmup 2)
    CELL_TIMEOUT="${CELL_TIMEOUT:-200}"
    "$PYTHON" -c 'import torch; print("device.sh:", torch.cuda.get_device_name(), "torch", torch.__version__)' | tee "$LOG"
fi
status=0
if [ "$DEVICE" = cuda ]; then
    # 1. CUDA tests (the conformance suite's cuda cases and tests/test_cuda.py): about a minute.
    timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_conformance.py -k "cuda" 2>&1 | tee -a "$LOG" || status=1
fi
# 2. The cells: shapes, K, r, dtypes.
for cell in "vit_b16 6 16 float32 bfloat16" "llm7b_attn 18 16 float32 bfloat16" "llama3_8b 20 16 bfloat16"; do
    set -- $cell
    shapes=$1 K=$2 r=$3
    shift 3
    if ! timeout "$CELL_TIMEOUT" "$PYTHON" -m benchmarks --device "$DEVICE" --shapes "$shapes" \
        --clients "$K" --ranks "$r" --dtype "$@" --repeats "$REPEATS" "${EXTRA[@]}" --library-only \
        --no-progress --no-plot --out "$OUT_DIR/${shapes}_K${K}_r${r}" 2>&1 | tee -a "$LOG"; then
        status=1
        echo "device.sh: cell $shapes K=$K r=$r failed or ran past ${CELL_TIMEOUT} s" | tee -a "$LOG"
    fi
done
echo "device.sh: done (status $status); results under $OUT_DIR" | tee -a "$LOG"
exit $status
