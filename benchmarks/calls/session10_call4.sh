#!/usr/bin/env bash
# Tenth session, call 4: the gathered re-scoring at its new default (96 registers, int32 offsets)
# against one and two programs per query; misa bench over the four context lengths; the GPU tests.
# Ran commit d085fc5.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 100 python3 benchmarks/rerank_compare.py --out $OUT/rerank.json --keys 131072 --rounds 5 \
  --gather-configs "128,4,3,0,0;128,4,3,96,1;128,4,3,96,1,2;128,4,3,96,1,3" 2>&1 | tail -2
BENCH_S=200 TEST_S=300 bash benchmarks/gpu_kernels.sh
python3 benchmarks/bench_summary.py $OUT/bench.json
