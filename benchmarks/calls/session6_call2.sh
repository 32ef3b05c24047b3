#!/usr/bin/env bash
# Sixth session, second device call: programs per block of queries (splits) x store modes.
set -u
source benchmarks/calls/env.sh
S=benchmarks/sweep_kernels.py
run() { timeout 150 python3 $S --logits-only "$@" 2>&1 | grep -o "'work.*" | grep -v BEST | cut -c1-150; }
run --out $OUT/routed.json --work routed8 --splits 2,4,8,16,24,33,48,64 --logits-configs 256/64/4/4/1/1/2,256/64/4/4/1/1/3
run --out $OUT/routed0.json --work routed8 --splits 8,16,64 --logits-configs 256/64/4/4/1/1/0,256/64/4/4/1/1/1
run --out $OUT/mid.json --work routed8mid,dsa64mid --splits 0,2,4,8,16,33 --logits-configs 256/64/4/4/1/1/2
run --out $OUT/dsa.json --work dsa64,dense64 --splits 0,2,4 --logits-configs 256/64/4/4/1/1/1,256/64/4/4/1/1/2,256/64/4/3/1/1/2
