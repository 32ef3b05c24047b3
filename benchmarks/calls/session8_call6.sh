#!/usr/bin/env bash
# Eighth session, call 6: the compaction with the next step(s) loaded before each step's (relaxed)
# atomic (COMPACT_PREFETCH 0/1/2), its register cap, and step sizes; then misa bench at 128K keys.
# (The switches these variants name were module constants of the working tree during the call,
# never committed: what was kept is in commit ceac89f, the figures in docs/benchmarks.md.)
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
V="COMPACT_PREFETCH=0,COMPACT_PREFETCH=2,COMPACT_MAXNREG=0,COMPACT_PREFETCH=2+COMPACT_MAXNREG=0"
V="$V,COMPACT_CONFIG=128/1/32,COMPACT_PREFETCH=2+COMPACT_CONFIG=128/1/32,COMPACT_CONFIG=256/1/8"
V="$V,COMPACT_PREFETCH=0+COMPACT_MAXNREG=0"
timeout 260 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:8192,131072:2048,8192:2048 \
  --sample --variant-sizes 131072:8192,131072:2048,8192:2048 --variants "$V" > $OUT/topk.log 2>&1
tail -2 $OUT/topk.log | cut -c1-300
python3 benchmarks/topk_summary.py $OUT/topk.json
timeout 120 python3 -m misa.cli bench --context-lens 131072 --methods dsa,misa,misa-dagger,hisa --json $OUT/bench.json \
  --rep-ms 60 2>&1 | tail -2
python3 benchmarks/bench_summary.py $OUT/bench.json
