#!/usr/bin/env bash
# Sixth session, third device call: bench with the new defaults, ncu of the scoring kernels,
# tiles per program for routed scoring, the compaction's eviction hint.
set -u
source benchmarks/calls/env.sh
timeout 170 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -14
S=benchmarks/sweep_kernels.py
run() { timeout 120 python3 $S --logits-only "$@" 2>&1 | grep -o "'work.*" | grep -v BEST | cut -c1-150; }
run --out $OUT/tiles.json --work routed8,routed8mid --logits-configs 256/64/4/4/1/1/2/16,256/64/4/4/1/1/2/24,256/64/4/4/1/1/2/48
timeout 100 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192 \
  --variant-sizes 131072:2048,131072:8192 --variants COMPACT_EVICT=evict_first 2>&1 | grep -o "'COMPACT_EVICT': '[a-z_]*'.*'ms': [0-9.]*\|'keys'.*'select_ms': [0-9.]*"
timeout 150 ncu --clock-control none -k regex:'route|mqa_logits|pool_keys' --launch-skip 5 --launch-count 5 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section SchedulerStats --section LaunchStats \
  python3 benchmarks/profile_scoring.py > $OUT/ncu.txt 2>&1
grep -E "^  [a-z_]+|Duration|Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Ipc|No Eligible|L2 Hit|Shared Memory|Block Limit" $OUT/ncu.txt | head -90
