#!/usr/bin/env bash
# Sixth session, first device call: store modes and programs per query block for the logits kernels,
# pooling configs, the cut's slack at k = 8192, then the store-mode GPU test.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
S=benchmarks/sweep_kernels.py
timeout 200 python3 $S --out $OUT/routed.json --work routed8 --logits-only --splits 0,33 \
  --logits-configs 256/64/4/4/1/1/0,256/64/4/4/1/1/1,256/64/4/4/1/1/2,256/64/4/4/1/1/3,256/64/4/3/1/1/1,128/64/4/4/1/1/1,256/128/8/4/1/1/1 \
  2>&1 | grep -o "'config.*" | cut -c1-160
timeout 150 python3 $S --out $OUT/dsa.json --work dsa64 --logits-only --splits 0,33 \
  --logits-configs 256/64/4/4/1/1/0,256/64/4/4/1/1/1,256/64/4/4/1/1/2 2>&1 | grep -o "'config.*" | cut -c1-160
timeout 90 python3 $S --out $OUT/pool.json --work routed8 --logits-only --router-configs 128/32/4/tf32 \
  --pool-configs 64/4,128/4,128/8,256/8,512/8 --logits-configs 256/64/4/4/1/1 2>&1 | grep -E "pool|config" | cut -c1-160
timeout 120 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:8192 --variant-sizes 131072:8192 \
  --variants CUT_SLACK=8.0,CUT_SLACK=2.0,DEFAULT_CONFIG=1024/4/4096 2>&1 | tail -8
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k store_modes 2>&1 | tail -3
