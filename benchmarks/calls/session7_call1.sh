#!/usr/bin/env bash
# (benchmarks/fused_compare.py and the fused kernels it times are in commit 21495b9, reverted after.)
# Seventh session, call 1: the fused selection (scoring pass writes only the logits above a sampled
# cut) against logits-then-top-k at 4096 x 128K, stage by stage; its GPU tests; misa bench at 128K.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 150 python3 benchmarks/fused_compare.py --out $OUT/fused.json 2>&1 | grep -v Warning | tail -8
timeout 120 python3 -m pytest -q -p no:cacheprovider -x tests/test_fused_select.py 2>&1 | tail -4
timeout 200 python3 -m misa.cli bench --context-lens 131072 --json $OUT/bench.json --rep-ms 60 2>&1 | tail -3
python3 benchmarks/bench_summary.py $OUT/bench.json
