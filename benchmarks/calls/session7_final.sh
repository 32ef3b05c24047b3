#!/usr/bin/env bash
# Seventh session, final device call: misa bench at the session's last commit, then the GPU tests in two
# processes (their time is mostly Triton compiles).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 230 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k topk > $OUT/pytest_topk.log 2>&1 &
timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_paged_kernel.py \
  tests/test_gpu_integration.py tests/test_bench.py -k "not topk" > $OUT/pytest_rest.log 2>&1
wait
for f in $OUT/pytest_topk.log $OUT/pytest_rest.log; do tail -n 2 "$f"; grep -E "^(FAILED|ERROR)" "$f" | head; done
