#!/usr/bin/env bash
# (COMPACT_STAGES was reverted before committing; data in docs/data/topk-h200-2026-11-29-session7-pipelined.json)
# Seventh session, call 5: the top-k compaction's loop software-pipelined (tl.range num_stages:
# loads as cp.async into shared memory, several steps in flight per warp), with other step sizes.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 300 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,8192:2048 \
  --variants "COMPACT_STAGES=2,COMPACT_STAGES=3,COMPACT_STAGES=4,COMPACT_STAGES=3+COMPACT_CONFIG=512/1/8,COMPACT_STAGES=3+COMPACT_CONFIG=256/2/16,COMPACT_STAGES=3+COMPACT_CONFIG=128/1/32,COMPACT_STAGES=1" \
  --variant-sizes 131072:2048,131072:8192,8192:2048 2>&1 | grep -v Warning > $OUT/topk.log
python3 benchmarks/topk_summary.py $OUT/topk.json
