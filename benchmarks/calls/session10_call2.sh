#!/usr/bin/env bash
# Tenth session, call 2: the gathered re-scoring kernel's launch configurations (register cap, keys
# as the MMA's B operand so q stays in registers) timed against each other at 4096 x 131072 on
# MISA's stage-1 candidates, then ncu of the default and the swapped-operand kernel.
# Ran 8e812ac's kernels plus an uncommitted flag in _gather_logits_kernel, KEYS_AS_B
# (acc = dot(q [H, D], trans(k)) [H, BN], head sum over axis 0) and rerank_compare.py's config
# field 5 selecting it; the config run first failed to compile, so only the ncu part reported.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 200 python3 benchmarks/rerank_compare.py --out $OUT/rerank.json --keys 131072 \
  --gather-configs "128,4,3,0,0;128,4,3,96,0;128,4,2,96,0;128,4,3,0,1;128,4,2,0,1;128,4,3,80,1;256,8,3,0,1;256,4,3,0,1;64,4,3,0,1;128,4,4,0,1" 2>&1 | tail -4
timeout 150 ncu --clock-control none -k regex:'gather_logits' --launch-skip 0 --launch-count 2 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section SchedulerStats \
  python3 benchmarks/rerank_compare.py --out /dev/null --ncu-once --gather-configs "128,4,3,0,0;128,4,3,0,1" > $OUT/ncu.txt 2>&1
grep -E "^  [_a-z]+|Duration|Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Ipc|No Eligible|L2 Hit|L1/TEX Hit|Block Limit|stalled|Est. Speedup" $OUT/ncu.txt | head -80
