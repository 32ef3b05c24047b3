#!/usr/bin/env bash
# Tenth session, call 3: the gathered re-scoring kernel's launch configurations (register cap for a
# fifth program per SM, int32 key offsets) timed against each other at 4096 x 131072 on MISA's
# stage-1 candidates (call 2 found the default latency-bound: 4 programs per SM, L2 at 52%).
# Ran the gather kernel as in d085fc5 but with DEFAULT_CONFIG still (128, 4, 3) and OFFSETS32 off by
# default (config field 5 turned it on).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 300 python3 benchmarks/rerank_compare.py --out $OUT/rerank.json --keys 131072 --rounds 5 \
  --gather-configs "128,4,3,0,0;128,4,3,0,1;128,4,3,96,0;128,4,3,96,1;128,4,2,96,1;128,4,3,104,1;64,4,2,0,1;64,4,3,0,1;128,4,3,80,1" 2>&1 | tail -4
