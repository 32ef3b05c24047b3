#!/usr/bin/env bash
# Ninth session, call 5: the persistent warp-specialized Gluon routed-logits kernel (one program
# per SM walking (query block, key split) items), TMA or register stores, against Triton's.
# Ran at commit 4d8b4d4; the Gluon kernel and benchmarks/gluon_compare.py were removed after call 6
# (docs/benchmarks.md, ninth session).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_gluon_kernel.py 2>&1 | tail -15
timeout 300 python3 benchmarks/gluon_compare.py --out $OUT/gluon.json --keys 32768,131072 \
  --configs 256/64/4/64/1/240,256/64/4/64/0/240,256/64/4/32/1/240,256/64/6/128/1/240,256/64/4/16/1/240 2>&1 | tail -40
