"""The Gluon routed-logits kernel (misa/ops/dsa/gluon.py) against the Triton one on the GPU: the
same logits inside every query's range, then both timed in interleaved rounds in the same call,
with dense DSA's logits beside them (the scoring ratio's denominator).

    python benchmarks/gluon_compare.py --out gluon.json [--keys 32768,131072] [--configs 128/64/4/4/32,...]
"""
from __future__ import annotations

import argparse
import json

import torch

from misa.bench import _time_rounds
from misa.ops.dsa import gluon as dsa_gluon
from misa.ops.dsa import triton as dsa_triton
from misa.ops.router.triton import route_heads
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def _inside(inp, s):
    cols = torch.arange(s, device=inp.ks.device)
    return (cols[None, :] >= inp.ks[:, None]) & (cols[None, :] < inp.ke[:, None])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", default="32768,131072")
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--configs", default="256/64/4/64/1/240",
                    help="pairs per consumer/keys per tile/stages/tiles per item/TMA stores/consumer registers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=150)
    args = ap.parse_args()
    dev = torch.device("cuda")
    configs = [("gluon", tuple(int(v) for v in c.split("/"))) for c in args.configs.split(",") if c]
    launch = {"gluon": dsa_gluon.launch_routed_logits}
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for s in (int(v) for v in args.keys.split(",")):
        t = args.queries
        inp = check_inputs(*indexer_workload(s, t, 64, 128, seed=1, device=dev).args)
        heads = route_heads(inp, 8, 1024)
        ref = torch.full((t, s), float("-inf"), device=dev)
        dsa_triton.launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, ref, heads=heads,
                                 config=dsa_triton.ROUTED_CONFIG)
        inside = _inside(inp, s)
        scale = float(ref[inside].abs().max())
        row = {"keys": s, "queries": t, "checks": {}, "ms": {}}
        outs = {}
        for kind, cfg in configs:
            name = kind + " " + "/".join(map(str, cfg))
            out = torch.full((t, s), float("nan"), device=dev)
            launch[kind](inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, out, heads, config=cfg)
            err = float((out[inside] - ref[inside]).abs().max()) / scale
            outside_ok = bool((out[~inside].isnan() | (out[~inside] == float("-inf"))).all())
            row["checks"][name] = {"max_rel_err": err, "nan_inside": int(out[inside].isnan().sum()),
                                   "outside_ok": outside_ok}
            print(s, name, row["checks"][name], flush=True)
            outs[name] = (out, launch[kind], cfg)
        dense = torch.full((t, s), float("-inf"), device=dev)
        timers = {
            "dense64 triton": lambda: dsa_triton.launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks,
                                                               inp.ke, dense),
            "routed8 triton": lambda: dsa_triton.launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks,
                                                               inp.ke, ref, heads=heads,
                                                               config=dsa_triton.ROUTED_CONFIG),
        }
        # the Triton kernels with TMA stores of their interior tiles (store mode 4)
        tma = lambda cfg: cfg[:6] + (4,) + cfg[7:]
        timers["dense64 triton tma"] = lambda: dsa_triton.launch_logits(
            inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, dense, config=tma(dsa_triton.DEFAULT_CONFIG))
        timers["routed8 triton tma"] = lambda: dsa_triton.launch_logits(
            inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, ref, heads=heads,
            config=tma(dsa_triton.ROUTED_CONFIG))
        for name, (out, fn, cfg) in outs.items():
            timers[name] = (lambda o=out, f=fn, c=cfg: f(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, o,
                                                          heads, config=c))
        ms, rounds = _time_rounds(timers, args.rep_ms, args.rounds)
        pairs = float((inp.ke - inp.ks).clamp_min(0).sum())
        for name, v in ms.items():
            nh = 64 if name.startswith("dense") else 8
            row["ms"][name] = {"ms": v, "tflops": 2 * nh * 128 * pairs / v / 1e9, "rounds": rounds[name]}
            print(f"{s:>7} {name:<24} {v:7.3f} ms {row['ms'][name]['tflops']:6.0f} TFLOP/s", flush=True)
        res["rows"].append(row)
        del ref, dense, outs
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
