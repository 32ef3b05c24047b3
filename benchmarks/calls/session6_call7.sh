#!/usr/bin/env bash
# Sixth session, seventh device call: router pipeline stages, bench again (spread between calls),
# the bench's GPU test.
set -u
source benchmarks/calls/env.sh
timeout 100 python3 benchmarks/sweep_kernels.py --out $OUT/router.json --work routed8 --logits-only \
  --logits-configs 256/64/4/4/1/1/2/32 \
  --router-configs 128/32/4/tf32/rank,128/32/4/tf32/rank/1,128/32/4/tf32/rank/2,128/32/4/tf32/rank/4,128/32/4/bf16x2/rank/2,128/16/4/tf32/rank/2,128/64/4/tf32/rank/2,64/32/4/tf32/rank/2 \
  2>&1 | grep -E "pool|'config'" | grep -v BEST | cut -c1-150
timeout 230 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -1
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py 2>&1 | tail -2
