#!/usr/bin/env bash
# Eighth session, call 5: the cut's sample size growing with k (SAMPLE_PER_K: fewer survivors at
# k = 8192) and shorter compaction programs, on MISA's logits with the sample from sample_logits;
# then stage_probe.py at 128K (MISA-dagger's re-scoring with and without the sample it writes).
# (The switches these variants name were module constants of the working tree during the call,
# never committed: what was kept is in commit ceac89f, the figures in docs/benchmarks.md.)
set -u
source benchmarks/calls/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
V="SAMPLE_PER_K=0.5,SAMPLE_PER_K=1.0,SAMPLE_PER_K=2.0,SAMPLE_PER_K=4.0,COMPACT_CONFIG=256/1/4,COMPACT_CONFIG=256/1/8"
timeout 260 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 131072:8192,131072:2048,8192:2048 \
  --sample --variant-sizes 131072:8192,131072:2048,8192:2048 --variants "$V" > $OUT/topk.log 2>&1
tail -2 $OUT/topk.log | cut -c1-300
python3 benchmarks/topk_summary.py $OUT/topk.json
timeout 100 python3 benchmarks/stage_probe.py --out $OUT/probe.json --keys 131072 --rounds 5 2>&1 | tail -2
