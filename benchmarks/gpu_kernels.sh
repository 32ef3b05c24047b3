#!/usr/bin/env bash
# One device call that verifies and times the kernels; results under $OUT (at most 8 files come
# back). Timings run first, alone on the GPU; then the GPU tests in two processes at once (their
# time is mostly Triton compiles, which are CPU-bound: one process took over 240 s on an H200).
#   TEST_S  per-process test limit (default 280)    BENCH_S / BENCH_ARGS  `misa bench` (150, --rep-ms 60)
#   SWEEP_S tile sweep budget (0 = none)            DECODE_S  decode_compare.py (0 = none)
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout "${BENCH_S:-150}" python3 -m misa.cli bench --json $OUT/bench.json ${BENCH_ARGS:---rep-ms 60} 2>&1 | tail -22
if [ "${SWEEP_S:-0}" != 0 ]; then
  timeout $((SWEEP_S + 60)) python3 benchmarks/sweep_kernels.py --out $OUT/sweep.json --budget-s "$SWEEP_S" 2>&1 \
    | grep -E "BEST|Error" | head -20
fi
if [ "${DECODE_S:-0}" != 0 ]; then
  timeout "$DECODE_S" python3 benchmarks/decode_compare.py --out $OUT/decode.json --contexts 131072 2>&1 | tail -8
fi
timeout "${TEST_S:-280}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k topk \
  > $OUT/pytest_topk.log 2>&1 &
timeout "${TEST_S:-280}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_paged_kernel.py \
  tests/test_gpu_integration.py tests/test_bench.py -k "not topk" > $OUT/pytest_rest.log 2>&1
wait
for f in $OUT/pytest_topk.log $OUT/pytest_rest.log; do tail -n 2 "$f"; grep -E "^(FAILED|ERROR)" "$f" | head; done
