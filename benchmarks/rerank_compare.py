"""MISA-dagger's second stage at 4096 queries: the gathered re-scoring kernel in several launch
configurations (BN, warps, stages, register cap, int32 key offsets[, programs per query]), each checked against
the default's scores and timed in interleaved rounds in one call, beside the whole re-scoring + top-k.
Candidates: MISA's stage-1 top-``k1`` of its routed logits.

    python benchmarks/rerank_compare.py --out rerank.json [--keys 131072] \
        [--gather-configs "128,4,3,0,0;128,4,3,0,1"] [--ncu-once]
"""
from __future__ import annotations

import argparse
import json

import torch

from misa.bench import _time_rounds
from misa.ops.dsa.triton import launch_logits
from misa.ops.rescore.triton import GatherConfig, gather_logits, rerank
from misa.ops.router.triton import route_heads
from misa.ops.topk.triton import topk
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def _config(text: str):
    bn, warps, stages, cap, offsets32, *splits = (int(v) for v in text.split(","))
    return GatherConfig(bn, warps, stages, cap or None, bool(offsets32)), (splits[0] if splits else None)


def _candidates(s: int, k1: int):
    dev = torch.device("cuda")
    inp = check_inputs(*indexer_workload(s, 4096, 64, 128, seed=1, device=dev).args)
    heads = route_heads(inp, 8, 1024)
    routed = torch.full((4096, s), float("-inf"), device=dev)
    launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, routed, heads=heads)
    return inp, topk(routed, inp.ks, inp.ke, k1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", default="131072")
    ap.add_argument("--stage1-k", type=int, default=8192)
    ap.add_argument("--gather-configs", default="128,4,3,0,0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--ncu-once", action="store_true", help="run each config once and exit (for ncu)")
    args = ap.parse_args()
    configs = [_config(c) for c in args.gather_configs.split(";")]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for s in (int(v) for v in args.keys.split(",")):
        inp, cand = _candidates(s, args.stage1_k)
        if args.ncu_once:
            for cfg, splits in configs:
                try:
                    gather_logits(inp, cand, config=cfg, sample_every=4, splits=splits)
                except Exception as e:      # noqa: BLE001
                    print("failed", cfg, type(e).__name__)
            torch.cuda.synchronize()
            return
        # the reference scores: no register cap, int64 key offsets
        want = gather_logits(inp, cand, config=GatherConfig(maxnreg=None, offsets32=False), sample_every=4)[0]
        fin = torch.isfinite(want)
        scale = float(want[fin].abs().max())
        timers = {"rerank (scores + top-k)": lambda: rerank(inp, cand, 2048)}
        err = {}
        for cfg, splits in configs:
            name = f"gather {cfg}" + (f" splits={splits}" if splits else "")
            try:
                got = gather_logits(inp, cand, config=cfg, sample_every=4, splits=splits)[0]
            except Exception as e:      # noqa: BLE001 - a config that does not compile is a result
                err[name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            same_holes = bool(torch.equal(torch.isfinite(got), fin))
            err[name] = float((got[fin] - want[fin]).abs().max()) / scale if same_holes else float("nan")
            timers[name] = lambda cfg=cfg, splits=splits: gather_logits(inp, cand, config=cfg, sample_every=4,
                                                                        splits=splits)
        ms, rounds = _time_rounds(timers, args.rep_ms * args.rounds, args.rounds)
        row = {"keys": s, "stage1_k": args.stage1_k, "ms": ms, "rounds": rounds, "max_rel_err": err}
        print(json.dumps({"keys": s, "ms": ms, "max_rel_err": err}), flush=True)
        res["rows"].append(row)
        del inp, cand
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
