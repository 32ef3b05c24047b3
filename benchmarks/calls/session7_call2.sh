#!/usr/bin/env bash
# (benchmarks/fused_compare.py and the fused kernels it times are in commit 21495b9, reverted after.)
# Seventh session, call 2: the fused scoring pass without a per-tile atomic (each program reserves
# a scratch segment per query once); programs per block and tile shapes swept; its GPU tests.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 300 python3 benchmarks/fused_compare.py --out $OUT/fused.json --splits 2 8 16 64 \
  --routed-configs 128/64/4/4/16 256/64/8/3/32 2>&1 | grep -v Warning | tail -20
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_fused_select.py 2>&1 | tail -4
