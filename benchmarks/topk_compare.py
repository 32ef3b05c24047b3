"""Top-k on the GPU, stage by stage, against torch.topk and (when benchmarks/topk_previous.py is
present: a copy of an earlier misa/ops/topk/triton.py) the previous kernel, in the same call.

Inputs are DSA-like logits (the routed-logits buffer of the synthetic workload) and plain randn;
each variant's selection is checked against torch.topk by value before it is timed.

    python benchmarks/topk_compare.py --out topk.json
    python benchmarks/topk_compare.py --out topk.json --sizes 131072:2048 --variants WAYS=8,SAMPLE_CHUNK=1+WAYS=8
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json

import torch
import triton.testing

from misa.ops.topk import triton as topk_mod


TUNABLE = ("WAYS", "SCRATCH_BLOCK", "COMPACT_CONFIG", "DEFAULT_CONFIG", "SAMPLE_CHUNK", "CUT_WARPS", "CUT_SIGMAS",
           "CUT_SLACK", "EARLY_EXIT", "BRACKET", "BRACKET_SIGMAS", "BRACKET_MIN",
           "HOLD")   # module constants of the kernel


def bench(fn):
    return float(triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median"))


def same_by_value(idx, x, k):
    """Every picked value is at least the k-th largest, and picks are distinct and in range."""
    kth = torch.topk(x, k, dim=1).values[:, -1:]
    got = torch.gather(x, 1, idx.long().clamp_min(0))
    distinct = torch.sort(idx, dim=1).values.diff(dim=1).ne(0).all()
    return bool((idx >= 0).all() and distinct and (got >= kth).all())


def stages(x, ks, ke, k):
    """Times of the kernel's three launches on their own."""
    call = topk_mod.TopkLaunches(x, ks, ke, k)

    def compact_fn():
        call.count.zero_()       # the cut launch zeroes the counters in a whole call
        call.compact()

    call.cut(); compact_fn(); call.select()
    torch.cuda.synchronize()
    res = {"cut_ms": bench(call.cut), "compact_ms": bench(compact_fn)}
    compact_fn()
    res["select_ms"] = bench(call.select)
    count, cut = call.count, call.cut_keys
    res["survivors_mean"] = float(count.float().mean())
    res["fast_rows"] = float(((count >= k) & (count <= call.cap) & (cut != 0)).float().mean())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="16384:2048,32768:2048,65536:2048,131072:2048,131072:8192,8192:2048",
                    help="keys:k pairs (8192 keys: MISA-dagger's second stage on randn)")
    ap.add_argument("--variants", default="SAMPLE_CHUNK=16,WAYS=8,COMPACT_CONFIG=512/2/8,COMPACT_CONFIG=256/1/8,CUT_WARPS=1,"
                                          "DEFAULT_CONFIG=512/4/2048,SCRATCH_BLOCK=512,SCRATCH_BLOCK=2048",
                    help="module constants to try at 131072:2048, one variant per comma (NAME=value, tuples "
                         "with /, several constants joined by +)")
    ap.add_argument("--variant-sizes", default="131072:2048", help="keys:k pairs at which the variants run")
    args = ap.parse_args()
    variant_sizes = {tuple(int(v) for v in p.split(":")) for p in args.variant_sizes.split(",") if p}
    sizes = [tuple(int(v) for v in p.split(":")) for p in args.sizes.split(",") if p]
    grid = []
    for item in filter(None, args.variants.split(",")):
        change = {}
        for part in item.split("+"):          # NAME=value, several joined by +
            name, value = part.split("=")
            if name not in TUNABLE:
                ap.error(f"--variants: {name!r} is not one of {TUNABLE}")
            vals = tuple(float(v) if "." in v else int(v) for v in value.split("/"))
            change[name] = vals if len(vals) > 1 else vals[0]
        grid.append(change)
    dev = torch.device("cuda")
    try:
        previous = importlib.import_module("topk_previous")
    except ImportError:
        previous = None
    from misa.ops.dsa.triton import launch_logits
    from misa.ops.router.triton import route_heads
    from misa.synthetic import indexer_workload
    from misa.validate import check_inputs

    results = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for s, k in sizes:
        t = 4096
        if s == 8192:      # MISA-dagger's second stage: 8192 candidates, no range
            x = torch.randn(t, s, device=dev)
            ks = torch.zeros(t, dtype=torch.int32, device=dev)
            ke = torch.full((t,), s, dtype=torch.int32, device=dev)
            kind = "randn"
        else:
            inp = check_inputs(*indexer_workload(s, t, 64, 128, seed=1, device=dev).args)
            heads = route_heads(inp, 8, 1024)
            x = torch.full((t, s), float("-inf"), device=dev)
            launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, x, heads=heads)
            ks, ke = inp.ks, inp.ke
            kind = "misa-logits"
            del inp
        row = {"keys": s, "k": k, "input": kind}
        row["torch_ms"] = bench(lambda: torch.topk(x, k, dim=1, sorted=False))
        new = lambda: topk_mod.topk(x, ks, ke, k)
        row["new_ok"] = same_by_value(new(), x, k)
        row["new_ms"] = bench(new)
        row.update(stages(x, ks, ke, k))
        if previous is not None:
            old = lambda: previous.topk(x, ks, ke, k)
            row["previous_ok"] = same_by_value(old(), x, k)
            row["previous_ms"] = bench(old)
        if (s, k) in variant_sizes and grid:
            row["variants"] = []
            names = TUNABLE
            base = {n: getattr(topk_mod, n) for n in names}
            for change in [{}] + grid:          # {}: the defaults again, timed beside the variants
                for n in names:
                    setattr(topk_mod, n, change.get(n, base[n]))
                rec = {n: getattr(topk_mod, n) for n in names}
                try:
                    rec["ok"] = same_by_value(topk_mod.topk(x, ks, ke, k), x, k)
                    rec["ms"] = bench(lambda: topk_mod.topk(x, ks, ke, k))
                    call = topk_mod.TopkLaunches(x, ks, ke, k)
                    call.cut(); call.compact()
                    rec["survivors_mean"] = float(call.count.float().mean())
                    rec["fast_rows"] = float(((call.count >= k) & (call.count <= call.cap)
                                              & (call.cut_keys != 0)).float().mean())
                except Exception as e:  # noqa: BLE001 - record and go on
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(rec, flush=True)
                row["variants"].append(rec)
            for n in names:
                setattr(topk_mod, n, base[n])
            ok = [v for v in row["variants"] if v.get("ok")]
            row["best_variant"] = min(ok, key=lambda v: v["ms"]) if ok else None
        print({kk: v for kk, v in row.items() if kk != "variants"}, flush=True)
        results["rows"].append(row)
        del x
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
