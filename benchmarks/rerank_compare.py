"""MISA-dagger's second stage: the fused re-scoring + top-k launch (``rerank(fused=True)``) in
several configurations against the scoring launch followed by the top-k's own launches, on the
stage-1 candidates of MISA's routed logits at 4096 queries (interleaved rounds, one call). Every
fused variant's selection is checked against the unfused one first.

    python benchmarks/rerank_compare.py --out rerank.json [--keys 131072] [--configs "128,4,3,128;..."]
"""
from __future__ import annotations

import argparse
import json

import torch

from misa.bench import _time_rounds
from misa.ops.dsa.triton import launch_logits
from misa.ops.misa.triton import RERANK_CONFIG, rerank
from misa.ops.router.triton import route_heads
from misa.ops.topk.triton import topk
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def _config(text: str):
    bn, warps, stages, cap = (int(v) for v in text.split(","))
    return bn, warps, stages, cap or None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", default="131072")
    ap.add_argument("--stage1-k", type=int, default=8192)
    ap.add_argument("--configs", default=";".join(",".join(str(v) for v in RERANK_CONFIG)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=60)
    args = ap.parse_args()
    dev = torch.device("cuda")
    configs = [_config(c) for c in args.configs.split(";")]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for s in (int(v) for v in args.keys.split(",")):
        t, k = 4096, 2048
        inp = check_inputs(*indexer_workload(s, t, 64, 128, seed=1, device=dev).args)
        heads = route_heads(inp, 8, 1024)
        routed = torch.full((t, s), float("-inf"), device=dev)
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, routed, heads=heads)
        cand = topk(routed, inp.ks, inp.ke, args.stage1_k)
        del routed
        want = torch.sort(rerank(inp, cand, k, fused=False), dim=1).values
        timers = {"unfused": lambda: rerank(inp, cand, k, fused=False)}
        same = {}
        for cfg in configs:
            name = "fused " + ",".join(str(v) for v in cfg)
            got = torch.sort(rerank(inp, cand, k, fused=True, config=cfg), dim=1).values
            same[name] = float((got == want).all(dim=1).float().mean())
            timers[name] = lambda cfg=cfg: rerank(inp, cand, k, fused=True, config=cfg)
        ms, rounds = _time_rounds(timers, args.rep_ms * args.rounds, args.rounds)
        row = {"keys": s, "stage1_k": args.stage1_k, "ms": ms, "rounds": rounds, "rows_equal": same}
        print(json.dumps({"keys": s, "ms": ms, "rows_equal": same}), flush=True)
        res["rows"].append(row)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
