"""``misa bench``: each method end to end and stage by stage on the GPU kernels.

Inputs are the synthetic structured workload (fresh random fp8 q/k drawn for every size; recall
against DSA is meaningful on it, unlike on i.i.d. noise). Times are medians of many runs
(``triton.testing.do_bench``); every speed-up is against dense DSA measured in the same run.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from . import select
from .metrics import recall
from .synthetic import indexer_workload
from .validate import check_inputs


METHODS = ("dsa", "misa", "misa-gap", "misa-dagger", "hisa")


@dataclass
class BenchConfig:
    num_queries: int = 4096
    context_lens: tuple = (16384, 32768, 65536, 131072)
    heads: int = 64
    head_dim: int = 128
    k: int = 2048
    active_heads: int = 8
    block_size: int = 1024
    stage1_k: int = 8192
    hisa_block_size: int = 128
    hisa_block_k: int = 64
    rep_ms: int = 200
    seed: int = 0
    methods: tuple = field(default=METHODS)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}, expected some of {METHODS}")


def _time(fn, rep_ms: int) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _peak_mb(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_one(cfg: BenchConfig, seq_len: int, device: torch.device) -> dict:
    from .ops.dsa.triton import launch_logits
    from .ops.misa.triton import rerank
    from .ops.router.triton import route_heads
    from .ops.topk.triton import topk

    t, h, d, k = cfg.num_queries, cfg.heads, cfg.head_dim, cfg.k
    w = indexer_workload(seq_len, t, h, d, seed=cfg.seed + seq_len, device=device)
    inp = check_inputs(*w.args)
    pairs = float((inp.ke - inp.ks).sum())                     # visible (query, key) pairs
    row = {"seq_len": seq_len, "num_queries": t, "heads": h, "head_dim": d, "k": k}
    ms = {}

    buf = torch.full((t, seq_len), float("-inf"), device=device)
    dense = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf)
    ms["dsa.logits"] = _time(dense, cfg.rep_ms)
    dense()
    ms["dsa.topk"] = _time(lambda: topk(buf, inp.ks, inp.ke, k), cfg.rep_ms)
    ms["torch.topk"] = _time(lambda: torch.topk(buf, k, dim=1, sorted=False), cfg.rep_ms)
    ref = select.dsa_select(inp, k)
    ms["dsa.e2e"] = _time(lambda: select.dsa_select(inp, k), cfg.rep_ms)
    row["dsa.peak_mb"] = _peak_mb(lambda: select.dsa_select(inp, k), device)

    if "misa" in cfg.methods or "misa-dagger" in cfg.methods:
        heads = route_heads(inp, cfg.active_heads, cfg.block_size)
        ms["misa.router"] = _time(lambda: route_heads(inp, cfg.active_heads, cfg.block_size), cfg.rep_ms)
        routed = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf, heads=heads)
        ms["misa.logits"] = _time(routed, cfg.rep_ms)
        routed()
        ms["misa.topk"] = _time(lambda: topk(buf, inp.ks, inp.ke, k), cfg.rep_ms)
        run = lambda: select.misa_select(inp, k, cfg.active_heads, cfg.block_size, None)
        ms["misa.e2e"] = _time(run, cfg.rep_ms)
        row["misa.recall"] = float(recall(run(), ref).mean())
        row["misa.peak_mb"] = _peak_mb(run, device)
    if "misa-gap" in cfg.methods:     # MISA with the "gap" router statistic (docs/results.md)
        gap = lambda: route_heads(inp, cfg.active_heads, cfg.block_size, router="gap")
        ms["misa-gap.router"] = _time(gap, cfg.rep_ms)
        run = lambda: select.misa_select(inp, k, cfg.active_heads, cfg.block_size, None, router="gap")
        ms["misa-gap.e2e"] = _time(run, cfg.rep_ms)
        row["misa-gap.recall"] = float(recall(run(), ref).mean())
    if "misa-dagger" in cfg.methods:
        ms["misa-dagger.stage1_topk"] = _time(lambda: topk(buf, inp.ks, inp.ke, cfg.stage1_k), cfg.rep_ms)
        cand = topk(buf, inp.ks, inp.ke, cfg.stage1_k)
        ms["misa-dagger.rerank"] = _time(lambda: rerank(inp, cand, k), cfg.rep_ms)
        run = lambda: select.misa_select(inp, k, cfg.active_heads, cfg.block_size, cfg.stage1_k)
        ms["misa-dagger.e2e"] = _time(run, cfg.rep_ms)
        row["misa-dagger.recall"] = float(recall(run(), ref).mean())
        row["misa-dagger.peak_mb"] = _peak_mb(run, device)
    if "hisa" in cfg.methods:
        run = lambda: select.hisa_select(inp, k, cfg.hisa_block_size, cfg.hisa_block_k)
        ms["hisa.e2e"] = _time(run, cfg.rep_ms)
        row["hisa.recall"] = float(recall(run(), ref).mean())
        row["hisa.peak_mb"] = _peak_mb(run, device)

    row["ms"] = ms
    row["dsa.logits_tflops"] = 2 * h * d * pairs / ms["dsa.logits"] / 1e9
    if "misa.logits" in ms:
        row["misa.logits_tflops"] = 2 * cfg.active_heads * d * pairs / ms["misa.logits"] / 1e9
        row["speedup.scoring"] = ms["dsa.logits"] / (ms["misa.router"] + ms["misa.logits"])
        row["speedup.misa_e2e"] = ms["dsa.e2e"] / ms["misa.e2e"]
    if "misa-gap.e2e" in ms:
        row["speedup.misa_gap_e2e"] = ms["dsa.e2e"] / ms["misa-gap.e2e"]
    if "misa-dagger.e2e" in ms:
        row["speedup.misa_dagger_e2e"] = ms["dsa.e2e"] / ms["misa-dagger.e2e"]
    if "hisa.e2e" in ms:
        row["speedup.hisa_e2e"] = ms["dsa.e2e"] / ms["hisa.e2e"]
    row["speedup.topk_vs_torch"] = ms["torch.topk"] / ms["dsa.topk"]
    del buf
    torch.cuda.empty_cache()
    return row


def run_bench(cfg: BenchConfig, device: torch.device, progress: bool = True) -> dict:
    if device.type != "cuda":
        raise ValueError("device: misa bench times the GPU kernels and needs a CUDA device")
    rows = []
    sizes = cfg.context_lens
    if progress:
        from rich.progress import track
        sizes = track(sizes, description="misa bench")
    for s in sizes:
        rows.append(bench_one(cfg, s, device))
    return {
        "gpu": torch.cuda.get_device_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "config": asdict(cfg),
        "rows": rows,
    }


def format_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["keys", "DSA logits ms (TFLOP/s)", "MISA router+logits ms (TFLOP/s)", "scoring x",
            "top-k ms (torch x)", "DSA e2e ms", "MISA e2e ms (x, recall)", "MISA-gap e2e ms (x, recall)",
            "MISA† e2e ms (x, recall)",
            "HISA e2e ms (x, recall)", "peak MB DSA/MISA"]
    out = []
    for r in result["rows"]:
        ms = r["ms"]
        f = lambda m, key: f"{ms[m + '.e2e']:.2f} ({r['speedup.' + key]:.2f}x, {r[m + '.recall']:.3f})" \
            if m + ".e2e" in ms else "-"
        out.append([
            str(r["seq_len"]),
            f"{ms['dsa.logits']:.2f} ({r['dsa.logits_tflops']:.0f})",
            f"{ms.get('misa.router', 0):.2f}+{ms.get('misa.logits', 0):.2f} ({r.get('misa.logits_tflops', 0):.0f})",
            f"{r.get('speedup.scoring', 0):.2f}",
            f"{ms['dsa.topk']:.2f} ({r['speedup.topk_vs_torch']:.1f}x)",
            f"{ms['dsa.e2e']:.2f}",
            f("misa", "misa_e2e"), f("misa-gap", "misa_gap_e2e"), f("misa-dagger", "misa_dagger_e2e"),
            f("hisa", "hisa_e2e"),
            f"{r['dsa.peak_mb']:.0f}/{r.get('misa.peak_mb', 0):.0f}",
        ])
    return cols, out


def save(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
