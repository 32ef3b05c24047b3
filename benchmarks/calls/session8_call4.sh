#!/usr/bin/env bash
# Eighth session, call 4: stage_probe.py (dense top-k with or without the cut's sample; the
# re-scoring with or without key scales and its sample), then misa bench over the four context
# lengths with MISA-dagger's re-scoring writing the top-k's sample and dense DSA keeping its own
# cut, then the GPU tests (benchmarks/gpu_kernels.sh's test step).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
timeout 120 python3 benchmarks/stage_probe.py --out $OUT/probe.json 2>&1 | tail -3
BENCH_S=200 TEST_S=${TEST_S:-280} bash benchmarks/gpu_kernels.sh
python3 benchmarks/bench_summary.py $OUT/bench.json
