#!/usr/bin/env bash
# Eighth session, call 3: the top-k with its cut's sample computed beside the logits
# (sample_logits) against the scattered-load cut, on MISA's logits; then misa bench over the
# four context lengths with the new defaults (packed search counts, select register cap, relaxed
# compaction atomic, the sample in every kernel selection).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
timeout 200 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,65536:2048,8192:2048 \
  --sample --variant-sizes 131072:8192 --variants "CUT_WARPS=8,CUT_SIGMAS=2.5,CUT_SIGMAS=2.0+CUT_SLACK=8.0" \
  > $OUT/topk.log 2>&1
tail -2 $OUT/topk.log | cut -c1-300
python3 benchmarks/topk_summary.py $OUT/topk.json
timeout 300 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -3
python3 benchmarks/bench_summary.py $OUT/bench.json
