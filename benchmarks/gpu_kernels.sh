#!/usr/bin/env bash
# One device call: GPU tests of the kernels, the tile sweep, then `misa bench`. Results under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider -rs --durations=12 tests/test_kernels.py tests/test_gpu_integration.py tests/test_bench.py > $OUT/pytest_kernels.log 2>&1
echo "pytest rc=$?"; tail -25 $OUT/pytest_kernels.log
if [ "${SWEEP_S:-0}" != 0 ]; then
  timeout $((SWEEP_S + 60)) python3 benchmarks/sweep_kernels.py --out $OUT/sweep.json --budget-s "$SWEEP_S" > $OUT/sweep.log 2>&1
  echo "sweep rc=$?"; grep -E "BEST|Error" $OUT/sweep.log | head -20
fi
timeout "${BENCH_S:-200}" python3 -m misa.cli bench --json $OUT/bench.json ${BENCH_ARGS:-} 2>&1 | tail -30
