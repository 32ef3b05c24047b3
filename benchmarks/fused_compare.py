"""The fused selection against logits-then-top-k, stage by stage, on the bench's workload.

    python benchmarks/fused_compare.py [--seq-len 131072] [--queries 4096] [--rep-ms 60] [--out FILE]

For DSA (64 heads, k = 2048), MISA (8 routed heads, k = 2048) and MISA-dagger's stage 1 (8 routed
heads, k = 8192): the unfused selection (``launch_logits`` then ``topk``) and the fused one
(``fused_select``), timed in interleaved rounds in the same call, plus the fused pipeline's
prefixes (sample; + cut; + scoring pass; + repair; + select) whose differences are its stages. Also
checks on the GPU, at full size, that both pick the same keys (rows whose sets differ can only
differ by ties at the k-th value) and counts the rows the cut missed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton

from misa import select
from misa.bench import _time_rounds
from misa.ops.dsa import triton as dsa_triton
from misa.ops.router.triton import route_heads
from misa.ops.topk.triton import TopkLaunches, topk
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def fused_prefixes(args, buf, top, heads):
    """Callables running the first 1..5 launches of ``fused_select`` (same launches, same order)."""
    q, w, k, k_scale, ks, ke = args
    call = TopkLaunches(buf, ks, ke, top)
    width = buf.shape[1]
    step = max(dsa_triton.FUSED_MIN_STEP, triton.cdiv(width, call.sample - 2))
    sample = torch.empty(q.shape[0], triton.cdiv(width, step), dtype=torch.float32, device=q.device)
    launches = [
        lambda: dsa_triton.launch_logits(q, w, k, k_scale, ks, ke, sample, 0, heads=heads, key_step=step),
        lambda: call.cut_from_sample(sample, step, 0, min_samples=call.sample // 4),
        lambda: dsa_triton.launch_logits(q, w, k, k_scale, ks, ke, buf, 0, heads=heads, fused=call, epilogue=1),
        lambda: dsa_triton.launch_logits(q, w, k, k_scale, ks, ke, buf, 0, heads=heads, fused=call, epilogue=2),
        call.select,
    ]

    def prefix(n):
        def run():
            for launch in launches[:n]:
                launch()
        return run
    return [prefix(n) for n in range(1, 6)], call


def prefixes_for_modes(args, buf, top, heads):
    return fused_prefixes(args, buf, top, heads)[0][2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="also time the fused selection with these programs per block of queries")
    ap.add_argument("--tile-modes", type=int, nargs="*", default=[],
                    help="also time the scoring pass with these FUSED_TILE_MODE values (1 atomics, 2 no stores)")
    ap.add_argument("--routed-configs", nargs="*", default=[],
                    help="also time routed cases with these logits tiles: pairs/BN/warps/stages[/tiles per program]")
    a = ap.parse_args()
    dev = torch.device("cuda")
    wl = indexer_workload(a.seq_len, a.queries, 64, 128, seed=a.seq_len, device=dev)
    inp = select._contiguous(check_inputs(*wl.args))
    args = (inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke)
    routed = route_heads(inp, 8, 1024)
    width = a.seq_len
    cases = {"dsa k=2048": (None, 2048), "misa k=2048": (routed, 2048), "misa-dagger stage 1 k=8192": (routed, 8192)}
    result = {"gpu": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"), "seq_len": a.seq_len,
              "queries": a.queries, "cases": {}}
    for name, (heads, top) in cases.items():
        buf = torch.empty(a.queries, width, device=dev)
        unfused_buf = torch.empty(a.queries, width, device=dev)

        def unfused():
            dsa_triton.launch_logits(*args, unfused_buf, 0, heads=heads)
            return topk(unfused_buf, inp.ks, inp.ke, top)
        fused = lambda: dsa_triton.fused_select(*args, buf, 0, top, heads=heads)
        got, want = fused(), unfused()
        # the scoring pass's programs per block of queries, and its tile shape (pairs, ...)
        variants = {}
        for splits in a.splits:
            variants[f"fused splits={splits}"] = (lambda s_: lambda: dsa_triton.fused_select(
                *args, buf, 0, top, heads=heads, splits=s_))(splits)
        if heads is not None:
            for cfg in a.routed_configs:
                conf = tuple(int(x) for x in cfg.split("/"))
                conf = conf[:4] + (True, True, dsa_triton.ROUTED_CONFIG[6]) + conf[4:]
                variants[f"fused config={cfg}"] = (lambda c_: lambda: dsa_triton.fused_select(
                    *args, buf, 0, top, heads=heads, config=c_))(conf)
        for mode in a.tile_modes:                 # the scoring pass alone, other tile compactions
            def scoring(mode_=mode, pre=prefixes_for_modes(args, buf, top, heads)):
                old = dsa_triton.FUSED_TILE_MODE
                dsa_triton.FUSED_TILE_MODE = mode_
                try:
                    pre()
                finally:
                    dsa_triton.FUSED_TILE_MODE = old
            scoring()
            variants[f"fused[:3] tile mode {mode}"] = scoring
        for name_v, fn in variants.items():      # same picks (up to ties) before timing
            if "tile mode" in name_v:
                continue
            v = fn()
            ok = (torch.sort(v, 1).values == torch.sort(want, 1).values).all(1).float().mean().item()
            print(f"  {name_v}: same sets {ok:.4f}", flush=True)
        launches = []
        dsa_triton.fused_select(*args, buf, 0, top, heads=heads, launches=launches)
        c = launches[0]
        served = (c.cut_keys != 0) & (c.count - c.holes >= top) & (c.count <= c.cap)
        same = (torch.sort(got, 1).values == torch.sort(want, 1).values).all(1)
        prefixes, _ = fused_prefixes(args, buf, top, heads)
        timers = {"unfused": unfused, "fused": fused}
        timers.update({f"fused[:{n + 1}]": p for n, p in enumerate(prefixes)})
        timers.update(variants)
        ms, rounds = _time_rounds(timers, a.rep_ms, a.rounds)
        stages = ["sample", "cut", "scoring pass", "repair", "select"]
        prev = 0.0
        stage_ms = {}
        for n, s in enumerate(stages):
            cur = ms[f"fused[:{n + 1}]"]
            stage_ms[s] = cur - prev
            prev = cur
        row = {"ms": ms, "ms_rounds": rounds, "stage_ms": stage_ms, "speedup": ms["unfused"] / ms["fused"],
               "rows_served": int(served.sum()), "rows_same_set": int(same.sum()),
               "scratch_mean": float(c.count.float().mean()), "scratch_max": int(c.count.max()),
               "holes_mean": float(c.holes.float().mean())}
        result["cases"][name] = row
        print(f"{name}: unfused {ms['unfused']:.3f} ms, fused {ms['fused']:.3f} ms ({row['speedup']:.2f}x); "
              + ", ".join(f"{s} {v:.3f}" for s, v in stage_ms.items())
              + f"; served {row['rows_served']}/{a.queries}, same set {row['rows_same_set']}, "
              f"scratch mean {row['scratch_mean']:.0f} (holes {row['holes_mean']:.0f}) max {row['scratch_max']}; "
              + ", ".join(f"{v} {ms[v]:.3f}" for v in variants), flush=True)
        del buf, unfused_buf
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
