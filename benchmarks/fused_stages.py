"""The fused top-k (misa/ops/topk/fused.py) launch by launch on the GPU, beside the unfused path,
for dense DSA and MISA's routed heads, in one call; each variant's selection is checked against
the unfused one by value before it is timed.

    python benchmarks/fused_stages.py --out fused.json
    python benchmarks/fused_stages.py --out fused.json --keys 131072 --slot-runs 64,128,512
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.testing

from misa.ops.dsa import triton as dsa_triton
from misa.ops.dsa.triton import COMPACT, REPAIR, launch_logits
from misa.ops.router.triton import route_heads
from misa.ops.topk import fused
from misa.ops.topk import triton as topk_mod
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


SMOKE = False      # --smoke: CPU under TRITON_INTERPRET=1, one untimed-quality run per stage


def bench(fn):
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median"))


def same_by_value(idx, x, k):
    kth = torch.topk(x, k, dim=1).values[:, -1:]
    got = torch.gather(x, 1, idx.long().clamp_min(0))
    return bool((idx >= 0).all() and (got >= kth).all())


def stages(inp, heads, k, buf):
    """Each launch of ``fused_logits_topk`` timed on its own, with the row statistics."""
    args = (inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke)
    t, width = buf.shape
    call = topk_mod.TopkLaunches(buf, inp.ks, inp.ke, k)
    call.kept = torch.empty_like(call.count)
    stride = max(fused.SAMPLE_STRIDE, triton.cdiv(width, fused.SAMPLE_MAX))
    first, end = 0, triton.cdiv(width, stride)
    sample = torch.empty(t, end - first, dtype=torch.float32, device=buf.device)
    ks_s, ke_s = (inp.ks + stride - 1) // stride, (inp.ke + stride - 1) // stride
    k_s = inp.k[::stride]
    ksc_s = inp.k_scale[::stride].contiguous()

    def sample_fn():
        launch_logits(*args[:2], k_s, ksc_s, ks_s, ke_s, sample, first, heads=heads)

    def cut_fn():
        topk_mod._sample_cut_kernel[(t,)](
            sample, ks_s, ke_s, inp.ks, inp.ke, call.cut_keys, call.count, call.kept, sample.stride(0), first, k,
            NS=triton.next_power_of_2(fused.SAMPLE_MAX), MIN_SAMPLE=fused.MIN_SAMPLE, WAYS=topk_mod.WAYS,
            num_warps=4)

    def compact_fn():
        call.count.zero_()
        call.kept.zero_()
        launch_logits(*args, buf, 0, heads=heads, topk=call, mode=COMPACT)

    def repair_fn():
        launch_logits(*args, buf, 0, heads=heads, topk=call, mode=REPAIR)

    sample_fn(); cut_fn(); compact_fn(); repair_fn(); call.select()
    res = {"sample_logits_ms": bench(sample_fn), "sample_cut_ms": bench(cut_fn), "compact_ms": bench(compact_fn)}
    compact_fn()
    res["repair_ms"] = bench(repair_fn)
    res["select_ms"] = bench(call.select)
    res["store_logits_ms"] = bench(lambda: launch_logits(*args, buf, 0, heads=heads))
    cut = call.cut_keys != 0
    kept, count = call.kept[cut].float(), call.count[cut].float()
    res["rows_with_cut"] = float(cut.float().mean())
    res["kept_mean"], res["kept_min"], res["kept_max"] = float(kept.mean()), float(kept.min()), float(kept.max())
    res["slots_mean"] = float(count.mean())
    res["repaired_rows"] = float((cut & ((call.kept < k) | (call.count > call.cap))).float().mean())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", type=int, default=131072)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--slot-runs", default="64,128,256,512", help="SLOT_RUN values to time end to end")
    ap.add_argument("--compact-configs", default="128/64/4/3/1,128/128/4/3/1,256/64/4/2/1",
                    help="tile shapes (pairs/BN/warps/stages/head-major) of the compacting launches to time")
    ap.add_argument("--smoke", action="store_true", help="check the script on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    dev = torch.device("cpu" if args.smoke else "cuda")
    inp = check_inputs(*indexer_workload(args.keys, args.queries, 64, 128, seed=1, device=dev).args)
    out = {"gpu": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "keys": args.keys, "queries": args.queries, "k": args.k,
           "rows": []}
    buf = torch.empty(args.queries, args.keys, dtype=torch.float32, device=dev)
    for name, heads in (("dsa", None), ("misa", route_heads(inp, 8, 1024))):
        row = {"method": name}
        ref_buf = torch.full_like(buf, float("-inf"))
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, ref_buf, 0, heads=heads)
        unfused = lambda: (launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf, 0,
                                         heads=heads), topk_mod.topk(buf, inp.ks, inp.ke, args.k))
        row["unfused_ms"] = bench(unfused)
        row.update(stages(inp, heads, args.k, buf))
        row["slot_runs"] = []
        base = dsa_triton.SLOT_RUN
        for run in [int(v) for v in args.slot_runs.split(",") if v]:
            dsa_triton.SLOT_RUN = run
            fn = lambda: fused.fused_logits_topk(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, args.k,
                                                 buf, 0, heads=heads)
            rec = {"slot_run": run, "ok": same_by_value(fn(), ref_buf, args.k), "fused_ms": bench(fn)}
            row["slot_runs"].append(rec)
            print(name, rec, flush=True)
        dsa_triton.SLOT_RUN = base
        row["compact_configs"] = []
        for text in [v for v in args.compact_configs.split(",") if v]:
            cfg = tuple(int(v) for v in text.split("/"))
            fused.COMPACT_CONFIG = cfg[:4] + (bool(cfg[4]),)
            fn = lambda: fused.fused_logits_topk(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, args.k,
                                                 buf, 0, heads=heads)
            try:
                rec = {"config": text, "ok": same_by_value(fn(), ref_buf, args.k), "fused_ms": bench(fn)}
            except Exception as e:  # noqa: BLE001 - record and go on
                rec = {"config": text, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["compact_configs"].append(rec)
            print(name, rec, flush=True)
        fused.COMPACT_CONFIG = None
        print({kk: v for kk, v in row.items() if kk not in ("slot_runs", "compact_configs")}, flush=True)
        out["rows"].append(row)
        del ref_buf
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
