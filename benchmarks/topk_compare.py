"""Top-k on the GPU, stage by stage, against torch.topk and (when benchmarks/topk_previous.py is
present: a copy of an earlier misa/ops/topk/triton.py) the previous kernel, in the same call.

Inputs are DSA-like logits (the routed-logits buffer of the synthetic workload) and plain randn;
each variant's selection is checked against torch.topk by value before it is timed.

    python benchmarks/topk_compare.py --out topk.json
    python benchmarks/topk_compare.py --out topk.json --sizes 131072:2048 --variants WAYS=8,SAMPLE_CHUNK=1+WAYS=8
    python benchmarks/topk_compare.py --out topk-bf16.json --dtype bfloat16 --sizes 131072:2048 --sample \
        --variants COMPACT_CONFIG=256/1/16/64/1,COMPACT_CONFIG=512/1/16/None,COMPACT_CONFIG=1024/1/4/None/1
"""
from __future__ import annotations

import argparse
import importlib
import json

import torch
import triton.testing

from misa.ops.topk import triton as topk_mod


TUNABLE = ("WAYS", "SCRATCH_BLOCK", "COMPACT_CONFIG", "BF16_GRAIN", "DEFAULT_CONFIG",
           "SAMPLE_CHUNK", "CUT_WARPS", "CUT_SIGMAS", "CUT_SLACK", "EARLY_EXIT", "BRACKET", "BRACKET_SIGMAS",
           "BRACKET_MIN", "HOLD", "SELECT_MAXNREG")   # module constants of the kernel


def bench(fn):
    return float(triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median"))


def same_by_value(idx, x, k):
    """Every picked value is at least the k-th largest, and picks are distinct and in range."""
    kth = torch.topk(x, k, dim=1).values[:, -1:]
    got = torch.gather(x, 1, idx.long().clamp_min(0))
    distinct = torch.sort(idx, dim=1).values.diff(dim=1).ne(0).all()
    return bool((idx >= 0).all() and distinct and (got >= kth).all())


def stages(x, ks, ke, k, sample=None, mod=topk_mod):
    """Times of the kernel's three launches on their own (``mod``: this kernel or the previous)."""
    call = mod.TopkLaunches(x, ks, ke, k, sample=sample)

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


def run_variants(grid, x, ks, ke, k, rounds, make_sample=None):
    """The defaults and each variant of module constants, checked, then timed in ``rounds``
    interleaved rounds (whole call and stage by stage; medians over the rounds), so drift during
    the call falls on every variant alike. ``make_sample``: the cut's sample, made again for each
    variant (its size may follow the constants) and timed beside it."""
    names = TUNABLE
    base = {n: getattr(topk_mod, n) for n in names}
    changes = [{}] + grid                       # {}: the defaults, timed beside the variants

    def use(change):
        for n in names:
            setattr(topk_mod, n, change.get(n, base[n]))

    recs, times, samples = [], [], []
    for change in changes:
        use(change)
        rec = {"change": {n: v for n, v in change.items()}}
        sample = make_sample() if make_sample else None
        samples.append(sample)
        try:
            rec["ok"] = same_by_value(topk_mod.topk(x, ks, ke, k, sample=sample), x, k)
        except Exception as e:  # noqa: BLE001 - record and go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        recs.append(rec)
        times.append([])
    for _ in range(rounds):
        for rec, change, t, sample in zip(recs, changes, times, samples):
            if "error" in rec:
                continue
            use(change)
            t.append({"ms": bench(lambda: topk_mod.topk(x, ks, ke, k, sample=sample)),
                      **stages(x, ks, ke, k, sample)})
            if make_sample:
                t[-1]["sample_launch_ms"] = bench(make_sample)
    use({})
    for rec, t in zip(recs, times):
        for key in (t[0] if t else {}):
            rec[key] = float(torch.tensor([r[key] for r in t]).median())
        print(rec, flush=True)
    return recs


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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the variants")
    ap.add_argument("--num-queries", type=int, default=4096, help="rows")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the rows' dtype (MISA's logits are written in it, as logits_dtype= does)")
    ap.add_argument("--sample", action="store_true",
                    help="on MISA's logits also time the top-k given its cut's sample (sample_logits), and "
                         "run the variants with it")
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
            vals = tuple(None if v == "None" else float(v) if "." in v else int(v) for v in value.split("/"))
            base = getattr(topk_mod, name)
            change[name] = type(base)(*vals) if isinstance(base, tuple) else vals[0]     # configs: named tuples
        grid.append(change)
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    try:
        previous = importlib.import_module("topk_previous")
    except ImportError:
        previous = None
    from misa.ops.dsa.triton import launch_logits, sample_logits
    from misa.ops.router.triton import route_heads
    from misa.synthetic import indexer_workload
    from misa.validate import check_inputs

    results = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for s, k in sizes:
        t = args.num_queries
        if s == 8192:      # MISA-dagger's second stage: 8192 candidates, no range
            x = torch.randn(t, s, device=dev).to(dtype)
            ks = torch.zeros(t, dtype=torch.int32, device=dev)
            ke = torch.full((t,), s, dtype=torch.int32, device=dev)
            kind = "randn"
            sample = make_sample = None
        else:
            inp = check_inputs(*indexer_workload(s, t, 64, 128, seed=1, device=dev).args)
            heads = route_heads(inp, 8, 1024)
            x = torch.full((t, s), float("-inf"), device=dev, dtype=dtype)
            launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, x, heads=heads)
            ks, ke = inp.ks, inp.ke
            kind = "misa-logits"
            # the cut's sample as the selections compute it (sample_logits), timed on its own
            def make_sample():         # the step follows the module's constants (variants may change them)
                step = topk_mod.sample_step(s)
                return sample_logits(inp.q, inp.weights, inp.k, inp.k_scale, 0, s, step, heads=heads), step
            sample = make_sample() if args.sample else None
        row = {"keys": s, "k": k, "input": kind, "dtype": args.dtype}
        if sample is not None:
            row["sample_launch_ms"] = bench(make_sample)
            row["with_sample_ok"] = same_by_value(topk_mod.topk(x, ks, ke, k, sample=sample), x, k)
            row["with_sample_ms"] = bench(lambda: topk_mod.topk(x, ks, ke, k, sample=sample))
            row.update({"with_sample_" + n: v for n, v in stages(x, ks, ke, k, sample).items()})
        row["torch_ms"] = bench(lambda: torch.topk(x, k, dim=1, sorted=False))
        new = lambda: topk_mod.topk(x, ks, ke, k)
        row["new_ok"] = same_by_value(new(), x, k)
        row["new_ms"] = bench(new)
        row.update(stages(x, ks, ke, k))
        if previous is not None:
            old = lambda: previous.topk(x, ks, ke, k)
            row["previous_ok"] = same_by_value(old(), x, k)
            row["previous_ms"] = bench(old)
            row.update({"previous_" + n: v for n, v in stages(x, ks, ke, k, mod=previous).items()})
            if sample is not None:
                old_s = lambda: previous.topk(x, ks, ke, k, sample=sample)
                row["previous_with_sample_ok"] = same_by_value(old_s(), x, k)
                row["previous_with_sample_ms"] = bench(old_s)
                row.update({"previous_with_sample_" + n: v
                            for n, v in stages(x, ks, ke, k, sample, mod=previous).items()})
        if (s, k) in variant_sizes and grid:
            row["variants"] = run_variants(grid, x, ks, ke, k, args.rounds, make_sample if sample is not None else None)
            ok = [v for v in row["variants"] if v.get("ok")]
            row["best_variant"] = min(ok, key=lambda v: v["ms"]) if ok else None
        print({kk: v for kk, v in row.items() if kk != "variants"}, flush=True)
        results["rows"].append(row)
        del x, sample
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
