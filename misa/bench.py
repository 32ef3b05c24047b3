"""``misa bench``: each method end to end and stage by stage on the GPU kernels.

Inputs are the synthetic structured workload (fresh random fp8 q/k drawn for every size; recall
against DSA is meaningful on it, unlike on i.i.d. noise). Times are medians of many runs
(``triton.testing.do_bench``); every speed-up is against dense DSA measured in the same run.
"""
from __future__ import annotations

import json
import statistics
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
    rounds: int = 3           # interleaved timing rounds (each rep_ms / rounds)
    seed: int = 0
    methods: tuple = field(default=METHODS)

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds: {self.rounds} must be at least 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}, expected some of {METHODS}")


def _time(fn, rep_ms: float) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _peak_mb(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _time_rounds(timers: dict, rep_ms: int, rounds: int) -> tuple[dict, dict]:
    """Each timer in ``rounds`` interleaved rounds of ``rep_ms / rounds`` each: a card that warms
    up or throttles over the run then slows every method alike, not the ones timed last. Returns
    the median over rounds of each round's median, and the rounds themselves."""
    per_round = {name: [] for name in timers}
    for _ in range(rounds):
        for name, fn in timers.items():
            per_round[name].append(_time(fn, rep_ms / rounds))
    return {name: statistics.median(v) for name, v in per_round.items()}, per_round


def bench_one(cfg: BenchConfig, seq_len: int, device: torch.device) -> dict:
    from .ops.dsa.triton import cut_sample, launch_logits
    from .ops.rescore.triton import rerank
    from .ops.router.triton import route_heads
    from .ops.topk.triton import topk

    t, h, d, k = cfg.num_queries, cfg.heads, cfg.head_dim, cfg.k
    w = indexer_workload(seq_len, t, h, d, seed=cfg.seed + seq_len, device=device)
    inp = check_inputs(*w.args)
    pairs = float((inp.ke - inp.ks).sum())                     # visible (query, key) pairs
    row = {"seq_len": seq_len, "num_queries": t, "heads": h, "head_dim": d, "k": k}
    timers = {}

    # the stages' buffers: dense logits for DSA's top-k, routed logits for MISA's and MISA-dagger's
    # (each timer rewrites its buffer with the same values, so the rounds can interleave)
    dense_buf = torch.full((t, seq_len), float("-inf"), device=device)
    dense = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, dense_buf)
    dense()
    timers["dsa.logits"] = dense
    # the top-k as the selections run it, with its cut's sample where they compute one (cut_sample)
    sample = lambda heads=None: cut_sample(inp.q, inp.weights, inp.k, inp.k_scale, 0, seq_len, heads=heads)
    timers["dsa.topk"] = lambda: topk(dense_buf, inp.ks, inp.ke, k, sample=sample())
    timers["torch.topk"] = lambda: torch.topk(dense_buf, k, dim=1, sorted=False)
    ref = select.dsa_select(inp, k)
    timers["dsa.e2e"] = lambda: select.dsa_select(inp, k)
    row["dsa.peak_mb"] = _peak_mb(lambda: select.dsa_select(inp, k), device)

    runs = {}
    if "misa" in cfg.methods or "misa-dagger" in cfg.methods:
        heads = route_heads(inp, cfg.active_heads, cfg.block_size)
        routed_buf = torch.full((t, seq_len), float("-inf"), device=device)
        routed = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, routed_buf,
                                       heads=heads)
        routed()
        timers["misa.router"] = lambda: route_heads(inp, cfg.active_heads, cfg.block_size)
        timers["misa.logits"] = routed
    if "misa" in cfg.methods:
        timers["misa.topk"] = lambda: topk(routed_buf, inp.ks, inp.ke, k, sample=sample(heads))
        runs["misa"] = lambda: select.misa_select(inp, k, cfg.active_heads, cfg.block_size, None)
    if "misa-gap" in cfg.methods:     # MISA with the "gap" router statistic (docs/results.md)
        timers["misa-gap.router"] = lambda: route_heads(inp, cfg.active_heads, cfg.block_size, router="gap")
        runs["misa-gap"] = lambda: select.misa_select(inp, k, cfg.active_heads, cfg.block_size, None, router="gap")
    if "misa-dagger" in cfg.methods:
        timers["misa-dagger.stage1_topk"] = lambda: topk(routed_buf, inp.ks, inp.ke, cfg.stage1_k,
                                                         sample=sample(heads))
        cand = topk(routed_buf, inp.ks, inp.ke, cfg.stage1_k)
        timers["misa-dagger.rerank"] = lambda: rerank(inp, cand, k)
        runs["misa-dagger"] = lambda: select.misa_select(inp, k, cfg.active_heads, cfg.block_size, cfg.stage1_k)
    if "hisa" in cfg.methods:
        runs["hisa"] = lambda: select.hisa_select(inp, k, cfg.hisa_block_size, cfg.hisa_block_k)
    for method, run in runs.items():
        timers[method + ".e2e"] = run
        row[method + ".recall"] = float(recall(run(), ref).mean())
        if method != "misa-gap":
            row[method + ".peak_mb"] = _peak_mb(run, device)

    ms, row["ms_rounds"] = _time_rounds(timers, cfg.rep_ms, cfg.rounds)
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
