#!/usr/bin/env bash
# Sixth session, ninth device call: the select holding short scratches in registers (HOLD), MISA-dagger
# end to end with it, and the top-k GPU tests.
set -u
source benchmarks/calls/env.sh
timeout 150 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 8192:2048,131072:2048,131072:8192 \
  --variant-sizes 8192:2048,131072:2048 --variants HOLD=0,HOLD=2048 2>&1 \
  | grep -o "'HOLD': [0-9]*.*'ms': [0-9.]*\|'keys'.*'select_ms': [0-9.]*"
timeout 150 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 --context-lens 131072 2>&1 | tail -1
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "topk or misa or hisa" 2>&1 | tail -3
