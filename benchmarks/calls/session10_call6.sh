#!/usr/bin/env bash
# Tenth session, call 6 (final): the select's register cap, 96 (the new default) against 80, at the
# three top-k shapes the selections run (interleaved rounds), then misa bench over the four
# context lengths at the session's final kernels.
# Ran commit 5aa4395.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 110 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sample \
  --sizes 131072:2048,8192:2048,131072:8192 --variant-sizes 131072:2048,8192:2048,131072:8192 --rounds 3 \
  --variants "SELECT_MAXNREG=80" > /dev/null 2>&1
python3 benchmarks/topk_summary.py $OUT/topk.json | tail -14
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 230 python3 -m misa.cli bench --json $OUT/bench.json --rep-ms 60 2>&1 | tail -3
python3 benchmarks/bench_summary.py $OUT/bench.json
