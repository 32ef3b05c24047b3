#!/usr/bin/env bash
# (benchmarks/fused_compare.py and the fused kernels it times are in commit 21495b9, reverted after.)
# Seventh session, call 3: where the fused scoring pass's time goes (tile compaction by scan, by an
# atomic per kept entry, or counting only); the top-k compaction reserving scratch segments against
# an atomic per step (COMPACT_RESERVE=0), stage by stage; misa bench at 128K.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 150 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,8192:2048 \
  --variants COMPACT_RESERVE=0 --variant-sizes 131072:2048,131072:8192,8192:2048 2>&1 | grep -v Warning | tail -12
timeout 150 python3 benchmarks/fused_compare.py --out $OUT/fused.json --tile-modes 1 2 2>&1 | grep -v Warning | tail -6
timeout 200 python3 -m misa.cli bench --context-lens 131072 --json $OUT/bench.json --rep-ms 60 2>&1 | tail -3
python3 benchmarks/bench_summary.py $OUT/bench.json
