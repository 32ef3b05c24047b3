"""Tile-shape sweep for the Triton kernels (a developer tool; its picks are the defaults in
misa/ops/*/triton.py). Each variant is checked against the default variant's output before it is
timed; failures to compile (too much shared memory, ...) are recorded, not fatal.

    python benchmarks/sweep_kernels.py --out sweep.json [--budget-s 240]
    python benchmarks/sweep_kernels.py --out sweep.json --work routed8 --logits-only \
        --logits-configs 256/64/4/3/2/32,256/64/4/4/0
    python benchmarks/sweep_kernels.py --out router.json --work routed8 --logits-only --router gap \
        --router-configs 128/32/4/tf32x3,128/32/8/tf32x3,64/32/4/tf32x3,128/16/8/tf32x3
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton.testing

from misa.ops.dsa.triton import DEFAULT_CONFIG, ROUTED_CONFIG, LogitsConfig, launch_logits
from misa.ops.rescore.triton import GatherConfig, gather_logits
from misa.ops.router.triton import PoolConfig, RouteConfig
from misa.ops.topk.triton import TopkConfig, topk
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def bench(fn):
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--work", default="dense64,routed8", help="which workloads: dense64, routed8")
    ap.add_argument("--logits-configs", default="",
                    help="logits configs to time instead of the grid (pairs/BN/warps/stages[/store[/tiles-per-program]])")
    ap.add_argument("--logits-only", action="store_true", help="skip the router, top-k and gather sweeps")
    ap.add_argument("--router-configs", default="",
                    help="router configs to time instead of the grid (pairs/blocks-per-step/warps/precision[/stages])")
    ap.add_argument("--router", default="abs-sum", choices=("abs-sum", "gap"),
                    help="the routing statistic whose configs are timed (the logits use its heads)")
    ap.add_argument("--splits", default="0",
                    help="programs per block of queries to time each logits config with (0: the kernel's own choice)")
    ap.add_argument("--pool-configs", default="",
                    help="pooling configs to time (keys-per-step/warps), beside the default")
    args = ap.parse_args()
    t_start = time.time()
    dev = torch.device("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "logits": [], "topk": [], "gather": []}

    def left():
        return args.budget_s - (time.time() - t_start)

    work = {
        "dense64_8192x65536": (8192, 65536, None),
        "routed8_4096x131072": (4096, 131072, 8),
        "dsa64_4096x131072": (4096, 131072, None),
        "routed8mid_4096x32768": (4096, 32768, 8),
        "dsa64mid_4096x32768": (4096, 32768, None),
    }
    chosen = args.work.split(",")
    for name, (t, s, h) in work.items():
        if name.split("_")[0] not in chosen:
            continue
        w = indexer_workload(s, t, 64, 128, seed=1, device=dev)
        inp = check_inputs(*w.args)
        heads = None
        if h:
            from misa.ops.router.triton import route_heads
            heads = route_heads(inp, h, 1024, router=args.router)
            results.setdefault("router", [])
            router_grid = [RouteConfig(*c) for c in itertools.product((128, 256), (32, 64), (4, 8),
                                                                      ("tf32x3", "tf32", "ieee"))]
            if args.router_configs:
                router_grid = [RouteConfig(*(int(v) for v in c.split("/")[:3]), c.split("/")[3],
                                           *(int(v) for v in c.split("/")[4:])) for c in args.router_configs.split(",")]
            if args.router_configs or not args.logits_only:
                from misa.ops.router.triton import pool_keys
                results["pool_keys_ms"] = bench(lambda: pool_keys(inp.k, inp.k_scale, 1024))
                print({"pool_keys_ms": results["pool_keys_ms"]}, flush=True)
                kbar = pool_keys(inp.k, inp.k_scale, 1024)
                for pc in [PoolConfig(*(int(v) for v in c.split("/"))) for c in args.pool_configs.split(",") if c]:
                    rec = {"pool_config": pc}
                    try:
                        rec["max_abs_diff"] = float((pool_keys(inp.k, inp.k_scale, 1024, config=pc) - kbar).abs().max())
                        rec["ms"] = bench(lambda: pool_keys(inp.k, inp.k_scale, 1024, config=pc))
                    except Exception as e:  # noqa: BLE001
                        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    results.setdefault("pool", []).append(rec)
                    print(rec, flush=True)
            for cfg in router_grid if (args.router_configs or not args.logits_only) else []:
                if left() < 0:
                    break
                rec = {"config": cfg}
                try:
                    fn = lambda: route_heads(inp, h, 1024, config=cfg, router=args.router)
                    rec["agree"] = float((fn() == heads).all(1).float().mean())
                    rec["ms"] = bench(fn)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                results["router"].append(rec)
                print(rec, flush=True)
        nh = h or 64
        pairs = float((inp.ke - inp.ks).sum())
        buf = torch.full((t, s), float("-inf"), device=dev)
        ref = torch.full((t, s), float("-inf"), device=dev)
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, ref, heads=heads)
        fin = torch.isfinite(ref)
        scale = ref[fin].abs().max()
        grid = [LogitsConfig(*c) for c in itertools.product((128, 256), (64, 128), (4, 8), (3,))]
        if h:
            grid += [LogitsConfig(*c) for c in itertools.product((64, 512), (64, 128), (4, 8), (3,))]
        if args.logits_configs:
            grid = [LogitsConfig(*(int(v) for v in c.split("/"))) for c in args.logits_configs.split(",")]
        runs = [(cfg, int(sp)) for cfg in [ROUTED_CONFIG if h else DEFAULT_CONFIG] + grid
                for sp in args.splits.split(",")]
        for cfg, sp in runs:
            if left() < 0:
                break
            if cfg.pairs < nh:
                continue
            rec = {"work": name, "config": cfg, "splits": sp}
            try:
                buf.fill_(float("nan"))
                fn = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf,
                                           heads=heads, config=cfg, splits=sp or None)
                fn()
                torch.cuda.synchronize()
                rec["max_rel_err"] = float(((buf - ref)[fin]).abs().max() / scale)
                rec["ms"] = bench(fn)
                rec["tflops"] = 2 * nh * 128 * pairs / rec["ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - record and go on
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results["logits"].append(rec)
            print(rec, flush=True)
        if h == 8 and not args.logits_only:
            ks, ke = inp.ks, inp.ke
            idx_ref = topk(ref, ks, ke, 2048)
            ref_sets = torch.sort(idx_ref, dim=1).values
            results["torch.topk_ms"] = bench(lambda: torch.topk(ref, 2048, dim=1, sorted=False))
            for cfg in [TopkConfig()] + [TopkConfig(*c) for c in itertools.product((512, 1024, 2048), (4, 8),
                                                                                  (1024, 2048))]:
                if left() < 0:
                    break
                rec = {"config": cfg}
                try:
                    fn = lambda: topk(ref, ks, ke, 2048, config=cfg)
                    rec["same"] = bool(torch.equal(torch.sort(fn(), dim=1).values, ref_sets))
                    rec["ms"] = bench(fn)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                results["topk"].append(rec)
                print(rec, flush=True)
            cand = topk(ref, ks, ke, 8192)
            g_ref = gather_logits(inp, cand)
            shapes = [(128, 8, 2)] + list(itertools.product((64, 128), (4, 8), (2, 3)))
            for cfg in [GatherConfig(*c, maxnreg=None) for c in shapes]:
                if left() < 0:
                    break
                rec = {"config": cfg}
                try:
                    fn = lambda: gather_logits(inp, cand, config=cfg)
                    out = fn()
                    f = torch.isfinite(g_ref)
                    rec["max_rel_err"] = float((out - g_ref)[f].abs().max() / g_ref[f].abs().max())
                    rec["ms"] = bench(fn)
                    rec["tflops"] = 2 * 64 * 128 * float(f.sum()) / rec["ms"] / 1e9
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                results["gather"].append(rec)
                print(rec, flush=True)
        del buf, ref
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for key in ("logits", "topk", "gather", "router"):
        ok = [r for r in results.get(key, []) if "ms" in r]
        for work_name in sorted({r.get("work", key) for r in ok}):
            sub = [r for r in ok if r.get("work", key) == work_name]
            best = min(sub, key=lambda r: r["ms"])
            print("BEST", key, work_name, best)


if __name__ == "__main__":
    main()
