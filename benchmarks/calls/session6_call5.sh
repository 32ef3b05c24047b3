#!/usr/bin/env bash
# Sixth session, fifth device call: the router's head selection (ACTIVE rounds against one rank pass).
set -u
source benchmarks/calls/env.sh
timeout 150 python3 benchmarks/sweep_kernels.py --out $OUT/router.json --work routed8 --logits-only \
  --logits-configs 256/64/4/4/1/1/2/32 \
  --router-configs 128/32/4/tf32,128/32/4/tf32/rank,128/32/4/bf16x2/rank,256/32/8/tf32/rank,256/64/8/tf32/rank,128/64/4/tf32/rank,64/32/4/tf32/rank,128/32/8/tf32/rank \
  2>&1 | grep -E "pool|'config'" | grep -v BEST | cut -c1-150
timeout 100 python3 - <<'PY'
import torch, triton.testing
from misa.ops.router.triton import route_heads, pool_keys
from misa.synthetic import indexer_workload
from misa.validate import check_inputs
inp = check_inputs(*indexer_workload(131072, 4096, 64, 128, seed=1, device="cuda").args)
b = lambda f: triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")
print("pool", b(lambda: pool_keys(inp.k, inp.k_scale, 1024)))
for sel in ("iter", "rank"):
    for active in (1, 8, 16):
        print(sel, active, b(lambda: route_heads(inp, active, 1024, config=(128, 32, 4, "tf32", sel))))
PY
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "router" 2>&1 | tail -3
