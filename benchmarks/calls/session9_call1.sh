#!/usr/bin/env bash
# Ninth session, call 1: the Gluon routed-logits kernel (misa/ops/dsa/gluon.py, not yet wired into
# the selections) - its GPU tests, then its tile configs against the Triton kernel and dense DSA.
# Ran on an uncommitted state of misa/ops/dsa/gluon.py: d3b83c2's double-buffered kernel without its
# key-scale prefetch. The Gluon kernels and benchmarks/gluon_compare.py were removed after call 6.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_gluon_kernel.py 2>&1 | tail -15
timeout 300 python3 benchmarks/gluon_compare.py --out $OUT/gluon.json --keys 32768,131072 \
  --configs 128/64/4/4/32,128/64/4/3/32,128/64/4/6/32,128/64/4/4/16,128/64/4/4/64,128/128/8/4/16,128/128/8/4/32,64/64/4/4/32 2>&1 | tail -40
