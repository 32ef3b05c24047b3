#!/usr/bin/env bash
# Tenth session, call 1: the fused re-scoring + top-k (rerank(fused=True)) against the scoring
# launch and the top-k's launches, several configurations, at 4096 x {65536, 131072} on MISA's
# stage-1 candidates; then the GPU tests of the kernels it touches (re-scoring, top-k, MISA, HISA).
# Ran the code of commit b089860 (rerank_compare.py's --configs of that commit; reverted in d085fc5).
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 200 python3 benchmarks/rerank_compare.py --out $OUT/rerank.json --keys 65536,131072 \
  --configs "128,4,3,128;128,4,3,0;128,4,2,112;128,4,3,112;64,4,3,128;128,8,3,0;128,8,2,0;64,4,2,96" 2>&1 | tail -6
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py -k topk > $OUT/pytest_topk.log 2>&1 &
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gpu_integration.py \
  -k "not topk and (misa or hisa or rerank or gathered)" > $OUT/pytest_rest.log 2>&1
wait
for f in $OUT/pytest_topk.log $OUT/pytest_rest.log; do tail -n 2 "$f"; grep -E "^(FAILED|ERROR)" "$f" | head; done
