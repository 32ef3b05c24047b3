#!/usr/bin/env bash
# Eighth session, call 9 (after the final call, with the device time left): fewer small launches
# around the samples (cached whole-row ranges for the cut's sample and the re-scoring's top-k; the
# sample's logits launch split over more programs; commit 7f3db92, reverted after this call: no
# gain, and HISA slower), misa bench at 128K keys, and the GPU tests of the sample paths.
set -u
source benchmarks/calls/env.sh
timeout 110 python3 -m misa.cli bench --context-lens 131072 --methods dsa,misa,misa-dagger,hisa --json $OUT/bench.json \
  --rep-ms 60 2>&1 | tail -1
python3 benchmarks/bench_summary.py $OUT/bench.json
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "sample or gathered or misa_kernels" 2>&1 | tail -2
