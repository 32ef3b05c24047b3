#!/usr/bin/env bash
# Sixth session, tenth device call: the select writing the winners from its bracket (no last pass
# over the scratch) against the previous commit's kernel (benchmarks/topk_previous.py), bench, tests.
set -u
source benchmarks/calls/env.sh
timeout 150 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,65536:2048,8192:2048 \
  --variants "" 2>&1 | grep -o "'keys'.*'select_ms': [0-9.]*"
timeout 120 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 --context-lens 131072 \
  --methods dsa,misa,misa-dagger 2>&1 | tail -1
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "topk or misa" 2>&1 | tail -3
