"""Probes behind two choices of the selections, timed in interleaved rounds on
the GPU against each other in the same call:

1. dense DSA's top-k with its cut's sample computed by sample_logits (64 heads on every step-th
   key) against the top-k's own scattered-load cut (``ops.dsa.triton.SAMPLE_MAX_HEADS``);
2. MISA-dagger's gathered re-scoring with and without the per-key scales (how much of its time the
   scale's extra sector per candidate costs: an upper bound for moving that gather elsewhere),
   and with and without the sample it writes for the top-k after it.

    python benchmarks/stage_probe.py --out probe.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from misa.bench import _time_rounds
from misa.ops.dsa.triton import launch_logits, sample_logits
from misa.ops.rescore.triton import gather_logits
from misa.ops.router.triton import route_heads
from misa.ops.topk.triton import sample_step, topk
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", default="65536,131072")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for s in (int(v) for v in args.keys.split(",")):
        t, k = 4096, 2048
        inp = check_inputs(*indexer_workload(s, t, 64, 128, seed=1, device=dev).args)
        buf = torch.full((t, s), float("-inf"), device=dev)
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf)
        step = sample_step(s)
        dense_sample = lambda: (sample_logits(inp.q, inp.weights, inp.k, inp.k_scale, 0, s, step), step)
        heads = route_heads(inp, 8, 1024)
        routed = torch.full((t, s), float("-inf"), device=dev)
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, routed, heads=heads)
        cand = topk(routed, inp.ks, inp.ke, 8192)
        unscaled = dataclasses.replace(inp, k_scale=None)
        zeros = torch.zeros(t, dtype=torch.int32, device=dev)
        width = torch.full_like(zeros, cand.shape[1])
        c_step = sample_step(cand.shape[1])

        def rerank_own_cut():
            return topk(gather_logits(inp, cand), zeros, width, k, cmap=cand, finite_only=True)

        def rerank_with_sample():
            scores, values = gather_logits(inp, cand, sample_every=c_step)
            return topk(scores, zeros, width, k, cmap=cand, finite_only=True, sample=(values, c_step))
        timers = {
            "dsa_topk_own_cut": lambda: topk(buf, inp.ks, inp.ke, k),
            "dsa_topk_with_sample": lambda: topk(buf, inp.ks, inp.ke, k, sample=dense_sample()),
            "dense_sample_launch": dense_sample,
            "gather": lambda: gather_logits(inp, cand),
            "gather_with_sample": lambda: gather_logits(inp, cand, sample_every=4),
            "gather_no_scale": lambda: gather_logits(unscaled, cand),
            "rerank_own_cut": rerank_own_cut,
            "rerank_with_sample": rerank_with_sample,
        }
        row = {"keys": s, "ms": _time_rounds(timers, 60 * args.rounds, args.rounds)[0]}
        print(row, flush=True)
        res["rows"].append(row)
        del buf, routed, cand
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
