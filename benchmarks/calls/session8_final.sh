#!/usr/bin/env bash
# Eighth session, final device call at the session's last kernel commit: the top-k stage split on
# MISA's logits (with and without the cut's sample), misa bench over the four context lengths,
# then the GPU tests in two processes (benchmarks/gpu_kernels.sh), then the bench's summary.
set -u
source benchmarks/calls/env.sh
timeout 100 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:2048,131072:8192,8192:2048 \
  --sample > $OUT/topk.log 2>&1
python3 benchmarks/topk_summary.py $OUT/topk.json
BENCH_S=230 TEST_S=${TEST_S:-340} bash benchmarks/gpu_kernels.sh
python3 benchmarks/bench_summary.py $OUT/bench.json
