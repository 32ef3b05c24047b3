#!/usr/bin/env bash
# Tenth session, call 5: the select's bracket pass writing the keys above the bracket straight to
# the output (the final pass then reads only the bracket) against the previous kernel
# (benchmarks/topk_previous.py = misa/ops/topk/triton.py of d085fc5), stage by stage, with register
# caps as variants at k = 8192; then the GPU tests of the top-k and the selections.
# Ran commit 8484db6 (select capped at 80), beside benchmarks/topk_previous.py = d085fc5's kernel.
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
PYTHONPATH=$PYTHONPATH:benchmarks timeout 150 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sample \
  --sizes 131072:8192,131072:2048,8192:2048 --variant-sizes 131072:8192 --rounds 3 \
  --variants "SELECT_MAXNREG=96,SELECT_MAXNREG=112" 2>&1 | tail -4
python3 benchmarks/topk_summary.py $OUT/topk.json 2>&1 | tail -30
timeout 330 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k topk > $OUT/pytest_topk.log 2>&1 &
timeout 330 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu_integration.py \
  -k "not topk and (misa or hisa or gathered or select)" > $OUT/pytest_rest.log 2>&1
wait
for f in $OUT/pytest_topk.log $OUT/pytest_rest.log; do tail -n 2 "$f"; grep -E "^(FAILED|ERROR)" "$f" | head; done
