#!/usr/bin/env bash
# Seventh session, final device call: misa bench at the session's last commit, then the GPU
# tests in two processes (benchmarks/gpu_kernels.sh), then the bench's compact summary.
set -u
BENCH_S=230 TEST_S=${TEST_S:-300} bash benchmarks/gpu_kernels.sh
python3 benchmarks/bench_summary.py $OUT/bench.json
