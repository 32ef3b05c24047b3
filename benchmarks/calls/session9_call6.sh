#!/usr/bin/env bash
# Ninth session, call 6: TMA stores of the Triton logits kernel's interior tiles (store mode 4)
# against its streaming PTX stores, dense and routed, beside the persistent Gluon kernel.
# Ran at commit 465eb47 (store mode 4 reverted after it; docs/benchmarks.md, ninth session).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "store_modes or output_window" 2>&1 | tail -5
timeout 300 python3 benchmarks/gluon_compare.py --out $OUT/gluon.json --keys 32768,131072 \
  --configs 256/64/4/64/0/240 2>&1 | tail -40
