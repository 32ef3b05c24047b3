#!/usr/bin/env bash
# Tenth session, call 7: misa bench at 131072 keys again (the spread between calls), then the GPU
# tests the final kernels have not run yet (paged decode and the integrations select through the
# top-k; the top-k's own tests at the new register cap), two processes, as far as the time allows.
# Ran commit 5aa4395's kernels.
set -u
source benchmarks/calls/env.sh
timeout 60 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 --context-lens 131072 2>&1 | tail -2
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout 225 python3 -m pytest -q -p no:cacheprovider -rs tests/test_paged_kernel.py tests/test_gpu_integration.py \
  tests/test_bench.py > $OUT/pytest_paged.log 2>&1 &
timeout 225 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k "topk_kernel and not variants" \
  > $OUT/pytest_topk.log 2>&1
wait
for f in $OUT/pytest_paged.log $OUT/pytest_topk.log; do tail -n 2 "$f"; grep -E "^(FAILED|ERROR)" "$f" | head; done
