#!/usr/bin/env bash
# Eighth session, call 2: register caps (.maxnreg) on the select, the compaction and the cut; the
# select's fast and general paths as two launches; packed counts as one int64 or two int32
# reductions; against the seventh session's kernel (OLD), interleaved rounds at 3 sizes.
# (The switches these variants name were module constants of the working tree during the call,
# never committed: what was kept is in commit ceac89f, the figures in docs/benchmarks.md.)
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
OLD=PACK_COUNTS=0+COMPACT_RELAXED=0+HOLD_MAX_WIDTH=1048576
V="$OLD,SELECT_MAXNREG=96,SELECT_MAXNREG=80,SELECT_MAXNREG=64,SPLIT_PATHS=1,SPLIT_PATHS=1+SELECT_MAXNREG=80"
V="$V,SPLIT_PATHS=1+SELECT_MAXNREG=64,PACK_COUNTS=0+SELECT_MAXNREG=80,PACK_COUNTS=2,PACK_COUNTS=2+SELECT_MAXNREG=80"
V="$V,COMPACT_CONFIG=512/2/8+COMPACT_MAXNREG=32,COMPACT_CONFIG=256/2/8+COMPACT_MAXNREG=32,CUT_MAXNREG=40"
V="$V,HOLD_MAX_WIDTH=1048576+SELECT_MAXNREG=80"
timeout 400 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,8192:2048 \
  --variant-sizes 131072:2048,131072:8192,8192:2048 --variants "$V" > $OUT/topk.log 2>&1
tail -3 $OUT/topk.log | cut -c1-300
python3 benchmarks/topk_summary.py $OUT/topk.json
