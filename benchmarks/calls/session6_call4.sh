#!/usr/bin/env bash
# Sixth session, fourth device call: router precision/tiles, the compaction's eviction hint, bench.
set -u
source benchmarks/calls/env.sh
timeout 100 python3 benchmarks/sweep_kernels.py --out $OUT/router.json --work routed8 --logits-only \
  --logits-configs 256/64/4/4/1/1/2/32 --pool-configs 256/8,256/4,1024/8 \
  --router-configs 128/32/4/tf32,128/32/4/bf16x2,128/64/4/bf16x2,128/32/8/bf16x2,256/32/8/bf16x2,256/64/8/bf16x2,128/128/8/bf16x2,64/32/4/bf16x2 \
  2>&1 | grep -E "pool|'config'" | grep -v BEST | cut -c1-150
timeout 100 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192 \
  --variant-sizes 131072:2048,131072:8192 --variants COMPACT_EVICT=evict_first 2>&1 \
  | grep -o "'COMPACT_EVICT': '[a-z_]*'.*'ms': [0-9.]*\|'keys'.*'select_ms': [0-9.]*"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "precision or store_modes" 2>&1 | tail -3
timeout 200 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -14
