#!/usr/bin/env bash
# Sixth session, eighth device call: MISA-dagger's second stage split (gathered scoring against its
# top-k, stage by stage) and the cut's sample size on 8192-column rows.
set -u
source benchmarks/calls/env.sh
timeout 100 python3 benchmarks/topk_compare.py --out $OUT/topk.json --sizes 8192:2048 --variant-sizes 8192:2048 \
  --variants DEFAULT_CONFIG=1024/4/512,DEFAULT_CONFIG=1024/4/1024,DEFAULT_CONFIG=1024/4/2048+BRACKET_MIN=1024 2>&1 \
  | grep -o "'DEFAULT_CONFIG.*'ms': [0-9.]*\|'BRACKET_MIN': [0-9]*.*'ms': [0-9.]*\|'keys'.*'select_ms': [0-9.]*"
timeout 150 python3 - <<'PY'
import json, os, torch, triton.testing
from misa.ops.dsa.triton import launch_logits
from misa.ops.misa.triton import gather_logits, rerank
from misa.ops.router.triton import route_heads
from misa.ops.topk import triton as tk
from misa.synthetic import indexer_workload
from misa.validate import check_inputs
b = lambda f: float(triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median"))
inp = check_inputs(*indexer_workload(131072, 4096, 64, 128, seed=131072, device="cuda").args)
heads = route_heads(inp, 8, 1024)
x = torch.full((4096, 131072), float("-inf"), device="cuda")
launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, x, heads=heads)
cand = tk.topk(x, inp.ks, inp.ke, 8192)
del x
res = {}
res["rerank"] = b(lambda: rerank(inp, cand, 2048))
res["gather"] = b(lambda: gather_logits(inp, cand))
for cfg in [(64, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 3)]:
    res[f"gather{cfg}"] = b(lambda: gather_logits(inp, cand, config=cfg))
scores = gather_logits(inp, cand)
zeros = torch.zeros(4096, dtype=torch.int32, device="cuda")
width = torch.full_like(zeros, 8192)
res["topk"] = b(lambda: tk.topk(scores, zeros, width, 2048, cmap=cand, finite_only=True))
call = tk.TopkLaunches(scores, zeros, width, 2048, cmap=cand, finite_only=True)
if True:
    res["cut"] = b(call.cut)
    call.cut(); res["compact"] = b(lambda: (call.count.zero_(), call.compact()))
    call.count.zero_(); call.compact(); res["select"] = b(call.select)
    res["survivors"] = float(call.count.float().mean())
print({k: round(v, 4) for k, v in res.items()})
json.dump(res, open(os.environ["OUT"] + "/rerank.json", "w"))
PY
