#!/usr/bin/env bash
# The GPU items of BENCHMARKS.md in one go (loader, training loop, extraction at 480x640, bf16 +
# channels_last, 16 loader workers), for a machine with one CUDA GPU. About 10 minutes on a 16-core
# host: most of it renders the default synthetic city at 480x640 once (into $VPR_BENCH_CACHE).
#
#     bash bench/gpu.sh [OUT_DIR]        # logs: OUT_DIR/*.txt (default: bench-gpu-logs/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-bench-gpu-logs}}
mkdir -p "$OUT"
W=${WORKERS:-16}
SIZE="--height 480 --width 640"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt" || echo "== $name: exit $?" | tee -a "$OUT/$name.txt"
}
run build      600 $PY bench/_common.py 480 640 1
run loader     240 $PY bench/loader.py --device cuda $SIZE --workers $W --rounds 2
run extraction 240 $PY bench/extraction.py --device cuda $SIZE --workers $W --batch-size 48 --heads avg netvlad --rounds 2
run train_loop 420 $PY bench/train_loop.py --device cuda $SIZE --workers $W --epochs 2 --queries-per-epoch 300 --refresh-every 1000 --negative-sample 1000 --bound-steps 20
run train_loop_compiled 300 $PY bench/train_loop.py --device cuda $SIZE --workers $W --epochs 2 --queries-per-epoch 300 --refresh-every 1000 --negative-sample 1000 --bound-steps 20 --heads netvlad --compile
