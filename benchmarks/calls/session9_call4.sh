#!/usr/bin/env bash
# Ninth session, call 4: the warp-specialized Gluon kernel's stores - plain st.global (0), the same
# stores predicated off (1: a diagnostic of what the stores cost), through shared memory by TMA (2).
# Ran at commit d3b83c2. The Gluon kernels and benchmarks/gluon_compare.py were removed after call 6
# (docs/benchmarks.md, ninth session).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_gluon_kernel.py 2>&1 | tail -15
timeout 300 python3 benchmarks/gluon_compare.py --out $OUT/gluon.json --keys 32768,131072 --configs "" \
  --ws-configs 256/64/4/64/240/0,256/64/4/64/240/1,256/64/4/64/240/2,256/64/4/32/240/2,256/64/6/64/240/2 2>&1 | tail -40
