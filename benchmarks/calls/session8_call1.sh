#!/usr/bin/env bash
# Eighth session, call 1: the top-k with packed search counts (one reduction per pass), the
# compaction's relaxed atomic and BLOCK-aligned (vectorised) steps, each switched off alone and
# all together (= the seventh session's kernel), in interleaved rounds at MISA's and
# MISA-dagger's sizes; then misa bench at 131072 keys.
# (The switches these variants name were module constants of the working tree during the call,
# never committed: what was kept is in commit ceac89f, the figures in docs/benchmarks.md.)
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
OLD=PACK_COUNTS=0+COMPACT_RELAXED=0+COMPACT_ALIGNED=0+HOLD_MAX_WIDTH=1048576
timeout 330 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,8192:2048 \
  --variant-sizes 131072:2048,131072:8192,8192:2048 \
  --variants "$OLD,PACK_COUNTS=0,COMPACT_RELAXED=0,COMPACT_ALIGNED=0,HOLD_MAX_WIDTH=1048576,COMPACT_CONFIG=512/1/8,COMPACT_CONFIG=1024/1/4,COMPACT_CONFIG=256/1/32,CUT_WARPS=2,CUT_WARPS=8,DEFAULT_CONFIG=1024/8/2048" \
  > $OUT/topk.log 2>&1
tail -3 $OUT/topk.log
python3 benchmarks/topk_summary.py $OUT/topk.json
timeout 150 python3 -m misa.cli bench --context-lens 131072 --methods dsa,misa,misa-dagger,hisa --json $OUT/bench.json \
  --rep-ms 60 2>&1 | tail -14
