#!/usr/bin/env bash
# (the recut it times is not in any commit: measured slower, reverted before committing; data in docs/data/topk-h200-2026-11-29-session7-recut.json)
# Seventh session, call 4: a tighter top-k cut with a parallel second chance (RECUT) for the rows
# it misses, swept at 128K (k = 2048 and 8192, routed logits) and 8192 (randn); top-k GPU tests.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
R=RECUT=8.0/64.0
timeout 240 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,8192:2048 \
  --variants "$R,$R+CUT_SIGMAS=2.0+CUT_SLACK=8.0,$R+CUT_SIGMAS=1.5+CUT_SLACK=4.0,$R+CUT_SIGMAS=1.0+CUT_SLACK=2.0,$R+CUT_SIGMAS=0.5+CUT_SLACK=0.0" \
  --variant-sizes 131072:2048,131072:8192,8192:2048 2>&1 | grep -v Warning > $OUT/topk.log
python3 benchmarks/topk_summary.py $OUT/topk.json
timeout 250 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py -k "topk" 2>&1 | tail -3
