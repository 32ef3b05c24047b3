#!/usr/bin/env bash
# (the one-launch kernel was never committed: measured slower and reverted; data in docs/data/topk-h200-2026-11-29-session7-one-launch.json)
# Seventh session, call 7: top-k of short rows (at most 8192 columns: MISA-dagger's and HISA's
# second stage, HISA's block choice) in one launch (_row_topk_kernel) against the three-launch
# path (ROW_TOPK_MAX=0), warps swept; misa bench at 128K; the top-k and MISA/HISA GPU tests.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 150 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 8192:2048 \
  --variants "ROW_TOPK_MAX=0,ROW_TOPK_WARPS=4,ROW_TOPK_WARPS=16,ROW_TOPK_MAX=0" \
  --variant-sizes 8192:2048 2>&1 | grep -v Warning > $OUT/topk.log
python3 benchmarks/topk_summary.py $OUT/topk.json
timeout 200 python3 -m misa.cli bench --context-lens 131072 --json $OUT/bench.json --rep-ms 60 2>&1 | tail -2
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py -k "topk or misa or hisa" 2>&1 | tail -3
