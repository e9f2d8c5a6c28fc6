#!/usr/bin/env bash
# GPU checks in one script (< 8 minutes on an H100/H200-class GPU): the CUDA tests, then the GPU
# benchmark cells ViT-B/16 K=6 r=16 and 7B attention K=18 r=16, in float32 and bfloat16, each
# result checked before it is timed. Writes results.{json,md} under $OUT_DIR (default
# benchmarks/results/gpu) and a summary to $OUT_DIR/device.log. On a machine without CUDA it says
# so and exits 0 without running anything on a GPU.
#
#   bash benchmarks/device.sh                 # PYTHON=... OUT_DIR=... REPEATS=... to override
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-benchmarks/results/gpu}"
REPEATS="${REPEATS:-11}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device.log"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device.sh: no CUDA device (torch.cuda.is_available() is False): skipping the CUDA tests and GPU cells" | tee "$LOG"
    exit 0
fi

"$PYTHON" -c 'import torch; print("device.sh:", torch.cuda.get_device_name(), "torch", torch.__version__)' | tee "$LOG"
status=0
# 1. CUDA tests (the conformance suite's cuda cases and tests/test_cuda.py): about a minute.
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_conformance.py -k "cuda" 2>&1 | tee -a "$LOG" || status=1
# 2. GPU cells, library aggregators only (the dense references take minutes each): about 4 minutes.
AGGS="fedit ffa_lora flora flexlora lora_fair lora_fair_sq"
for cell in "vit_b16 6" "llm7b_attn 18"; do
    set -- $cell
    timeout 150 "$PYTHON" -m benchmarks --device cuda --shapes "$1" --clients "$2" --ranks 16 \
        --dtype float32 bfloat16 --repeats "$REPEATS" --warmup 2 --aggregators $AGGS \
        --no-progress --no-plot --out "$OUT_DIR/${1}_K${2}_r16" 2>&1 | tee -a "$LOG" || status=1
done
echo "device.sh: done (status $status); results under $OUT_DIR" | tee -a "$LOG"
exit $status
