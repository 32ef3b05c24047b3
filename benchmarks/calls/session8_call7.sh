#!/usr/bin/env bash
# Eighth session, call 7: end-to-end selections with 1/2/4/8 query chunks pipelined over two
# streams (every method, dense DSA included, interleaved in one call), then the pipeline's GPU
# test against one stream. (benchmarks/pipeline_compare.py and the pipeline itself are in commit
# ceac89f; both were reverted after this call: every chunked setting was slower.)
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
timeout 200 python3 benchmarks/pipeline_compare.py --out $OUT/pipeline.json 2>&1 | tail -6
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k pipelined 2>&1 | tail -3
