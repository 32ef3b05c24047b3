#!/usr/bin/env bash
# Eighth session, final device call at the session's last kernel commit: misa bench over the four
# context lengths, then the GPU tests in two processes (benchmarks/gpu_kernels.sh), then the
# bench's summary.
set -u
BENCH_S=200 TEST_S=${TEST_S:-340} bash benchmarks/gpu_kernels.sh
python3 benchmarks/bench_summary.py $OUT/bench.json
