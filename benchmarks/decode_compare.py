"""Decode over the paged cache: the batched path (the default: MISA's router in two launches, one
scoring launch, one top-k launch for the whole batch) against the per-sequence path
(``MISA_PAGED_KERNEL=0``), for DSA's and MISA's selection and for MISA's routing alone
(``paged_route_heads``), on the GPU. Each batched result is compared with the per-sequence one
(recall of the selections, share of queries routed to the same heads) before it is timed.

    python benchmarks/decode_compare.py --out decode.json
    TRITON_INTERPRET=1 python benchmarks/decode_compare.py --smoke --out /tmp/decode.json   # CPU check
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

import misa


def bench(fn, smoke):
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median"))


@contextlib.contextmanager
def paged_path(batched: bool):
    """Run the block with the batched paged path (the default) or the per-sequence one."""
    before = os.environ.pop("MISA_PAGED_KERNEL", None)
    if not batched:
        os.environ["MISA_PAGED_KERNEL"] = "0"
    try:
        yield
    finally:
        os.environ.pop("MISA_PAGED_KERNEL", None)
        if before is not None:
            os.environ["MISA_PAGED_KERNEL"] = before


def batch(b, ctx, next_n, h, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [misa.quantize_keys(torch.randn(ctx - 17 * i, d, generator=g).to(device)) for i in range(b)]
    q, w = misa.quantize_queries(torch.randn(b * next_n, h, d, generator=g).to(device),
                                 torch.randn(b * next_n, h, generator=g).to(device))
    cache, table, lens = misa.build_paged_kcache(seqs, generator=g)
    return q.view(b, next_n, h, d), w, cache, table, lens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--next-n", default="1,2")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--active-heads", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        os.environ["MISA_INTERPRET_KERNELS"] = "1"
        args.batches, args.contexts, args.k, args.block_size = "3", "700", 64, 128
    h, d = 64, 128
    rows = []
    for b in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            for n in map(int, args.next_n.split(",")):
                q, w, cache, table, lens = batch(b, ctx, n, h, d, dev)
                routing = dict(active_heads=args.active_heads, block_size=args.block_size)
                runs = {"dsa": lambda: misa.paged_dsa_select(q, cache, w, lens, table, k=args.k),
                        "misa": lambda: misa.paged_misa_select(q, cache, w, lens, table, k=args.k, **routing),
                        "route": lambda: misa.paged_route_heads(q, cache, w, lens, table, **routing)}
                row = {"batch": b, "context": ctx, "next_n": n}
                for name, fn in runs.items():
                    with paged_path(batched=False):
                        ref = fn()
                        row[name + ".per_sequence_ms"] = bench(fn, args.smoke)
                    with paged_path(batched=True):
                        got = fn()
                        row[name + ".batched_ms"] = bench(fn, args.smoke)
                    if name == "route":
                        row["route.same_heads_vs_per_sequence"] = float((got == ref).all(dim=1).float().mean())
                    else:
                        row[name + ".recall_vs_per_sequence"] = float(misa.recall(got, ref).mean())
                    row[name + ".speedup"] = row[name + ".per_sequence_ms"] / row[name + ".batched_ms"]
                print(row, flush=True)
                rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"gpu": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
