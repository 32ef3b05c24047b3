#!/usr/bin/env bash
# Ninth session, call 3: the warp-specialized Gluon routed-logits kernel (one TMA loader warp, two
# consumer warpgroups sharing each key tile) beside the double-buffered one and the Triton kernel.
# Ran on an uncommitted state: d3b83c2's warp-specialized kernel before its store modes. The Gluon
# kernels and benchmarks/gluon_compare.py were removed after call 6 (docs/benchmarks.md, ninth session).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_gluon_kernel.py 2>&1 | tail -15
timeout 300 python3 benchmarks/gluon_compare.py --out $OUT/gluon.json --keys 32768,131072 \
  --configs 128/64/4/4/64 --ws-configs 256/64/4/32/240,256/64/6/32/240,256/64/4/64/240,256/64/8/16/240,128/64/4/32/240 2>&1 | tail -40
