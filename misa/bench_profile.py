"""``misa bench --profile``: where each selector's time goes, kernel by kernel.

Each method's ``misa.PrefillSelector`` (the selector ``misa bench`` times end to end) runs ``calls``
times under ``torch.profiler`` at the largest context asked for; a kernel's figure is its GPU time
per call, summed over its launches. ``STAGES`` says what our kernels do; PyTorch's kernels keep
their own names. The end-to-end time beside each table is ``triton.testing.do_bench``'s median of
the same call, so the gap between it and the kernels' sum is launch and idle time.
"""
from __future__ import annotations

import collections
from dataclasses import asdict, dataclass

import torch

from .bench import BenchConfig, Table, _label, _selector, _time, row_config, row_names, run_info
from .synthetic import indexer_workload
from .validate import check_inputs

# our kernels by their Triton names
STAGES = {
    "_pool_keys_kernel": "router: key pooling",
    "_route_kernel": "router: head choice",
    "_mqa_logits_kernel": "logits (+ cut's sample)",
    "_cut_kernel": "top-k: cut",
    "_compact_kernel": "top-k: compaction",
    "_select_kernel": "top-k: select",
    "_short_rows_kernel": "top-k: short rows",
    "_gather_logits_kernel": "all heads on candidates",
    "_pool_blocks_kernel": "blocks: pooling",
    "_prefill_block_ranges_kernel": "blocks: ranges",
    "_force_edge_blocks_kernel": "blocks: first and last",
    "_block_positions_kernel": "blocks: key positions",
    "_checks_kernel": "input checks",
}


@dataclass
class KernelTime:
    name: str
    stage: str
    us: float            # GPU time per call, all its launches
    launches: float      # launches per call


def kernel_times(events, calls: int) -> list[KernelTime]:
    """Each kernel's GPU time per call from profiler ``(name, microseconds)`` pairs recorded over
    ``calls`` calls, the slowest first."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls: expected a positive int, got {calls!r}")
    total, launches = collections.defaultdict(float), collections.Counter()
    for name, us in events:
        total[name] += us
        launches[name] += 1
    rows = [KernelTime(name, STAGES.get(name, "-"), total[name] / calls, launches[name] / calls) for name in total]
    return sorted(rows, key=lambda r: -r.us)


def _kernel_events(fn, calls: int) -> list[tuple[str, float]]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [(e.name, e.device_time_total) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def profile_selectors(cfg: BenchConfig, device: torch.device, calls: int = 10) -> dict:
    """Kernel times of each method's selector (and, with ``cfg.compare_logits_dtypes``, of its
    other-dtype row) at ``max(cfg.context_lens)`` keys."""
    if device.type != "cuda":
        raise ValueError("device: misa bench --profile reads the GPU's kernel times and needs a CUDA device")
    return {
        **run_info(cfg, device),
        "seq_len": max(cfg.context_lens),
        "calls": calls,
        "methods": _profile_methods(cfg, device, calls),
    }


def _profile_methods(cfg: BenchConfig, device: torch.device, calls: int) -> dict:
    seq_len = max(cfg.context_lens)
    w = indexer_workload(seq_len, cfg.num_queries, cfg.heads, cfg.head_dim, seed=cfg.seed + seq_len, device=device)
    inp = check_inputs(*w.args)
    args = (inp.q, (inp.k, inp.k_scale), inp.weights, inp.ks, inp.ke)
    methods = {}
    for name in row_names(cfg.methods, cfg.compare_logits_dtypes):
        sel = _selector(cfg, row_config(cfg, name), seq_len, device)
        run = (lambda sel: lambda: sel(*args))(sel)
        ms = _time(run, cfg.rep_ms)
        methods[name] = {"ms": ms, "kernels": [asdict(k) for k in kernel_times(_kernel_events(run, calls), calls)]}
        del sel, run          # one selector's buffers on the card at a time
        torch.cuda.empty_cache()
    return methods


def short_name(name: str, width: int = 30) -> str:
    """A kernel's name cut to ``width`` characters: PyTorch's templated names lose their arguments."""
    if len(name) <= width:
        return name
    cut = min((i for i in (name.find("<"), name.find("(")) if i > 0), default=width)
    return name[:min(cut, width - 5)] + "<...>"


def profile_tables(result: dict) -> list[Table]:
    """One table per method: its kernels' GPU time per call, their sum, and the call's time."""
    c = result["config"]
    tables = []
    for name, m in result["methods"].items():
        rows = [[k["stage"], short_name(k["name"]), f"{k['us']:.1f}", f"{k['launches']:g}"] for k in m["kernels"]]
        rows.append(["all kernels", "", f"{sum(k['us'] for k in m['kernels']):.1f}", ""])
        rows.append(["the call (do_bench)", "", f"{1e3 * m['ms']:.1f}", ""])
        tables.append(Table(f"{_label(name)}, {c['num_queries']} queries x {result['seq_len']} keys: GPU time per "
                            f"call by kernel, us ({result['calls']} profiled calls)",
                            ["stage", "kernel", "us", "launches"], rows, left=2))
    return tables
