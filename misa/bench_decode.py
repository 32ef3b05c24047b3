"""``misa bench --decode``: paged decode selection as an engine runs it (CUDA graphs), against
dense DSA measured in the same run.

For every (batch, context, next_n): the card's copy bandwidth (a device-to-device copy, bytes read
plus written), the dense paged logits alone (bytes of cache read per second, and that as a share
of the copy figure), DSA's selection, the block-pruned selection for each ``block_k``, MISA (8
routed heads) and MISA† (8 routed heads keeping ``stage1_k`` candidates for all heads to re-score),
each captured in a CUDA graph and timed by replay, the checked functions called eagerly, back to
back, timed by wall clock per call (host work included: their per-call host cost is eager minus
replay; repeated at one shape they replay a graph of their own, ``misa/paged.py``), block-pruned
m = 64 also from a float32 pooled-key cache, and the recall of DSA's selection (for block-pruned
also its bound: the recall of the best choice of as many pages). Where DeepGEMM imports with its
paged logits, dense DSA as engines run it on DeepGEMM (``fp8_paged_mqa_logits`` + ``torch.topk``)
is timed beside it as the baseline. Every method is set up and
checked first, then all are timed in ``rounds`` interleaved rounds (median of the rounds' medians;
each round's figures in ``ms_rounds``). Workload: the synthetic indexer traffic of
``misa/synthetic.py``, a few distinct sequences repeated over the batch, each the last ``next_n``
tokens of a causal sequence.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from . import quant
from .bench import HostTimed, _time, _time_rounds
from .decode import DecodeSelector
from .metrics import page_recall_bound, recall
from .paged import _visible_ends
from .synthetic import indexer_workload

DEFAULT_SHAPES = ((1, 4096), (8, 131072), (64, 131072))


@dataclass
class DecodeBenchConfig:
    shapes: tuple = DEFAULT_SHAPES          # (batch, context) pairs
    next_ns: tuple = (1, 2)
    heads: int = 64
    head_dim: int = 128
    k: int = 2048
    block_ks: tuple = (32, 64, 128)         # block-pruned: 64-token pages kept
    stage1_k: int = 8192                    # MISA-dagger: candidates the routed heads keep
    distinct: int = 4                       # distinct synthetic sequences, repeated over the batch
    rep_ms: int = 100                       # timing per method, over all rounds
    rounds: int = 3                         # interleaved timing rounds (the median is reported)
    seed: int = 0

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds: {self.rounds} must be at least 1")


def _graph(fn):
    """``fn`` captured in a CUDA graph (after a warm-up call); returns the replay."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(device, nbytes: int = 2 << 30, rep_ms: int = 200) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), rep_ms)
    return 2 * src.numel() / ms / 1e6


# A DeepGEMM build can crash the process instead of raising (one built on the card segfaulted in
# its schedule metadata): the bench first calls it in a child process, so a crash costs only the row.
_DEEPGEMM_PROBE = """
import torch, deep_gemm
lens = torch.full((1, 1), 64, dtype=torch.int32, device={device!r})
deep_gemm.get_paged_mqa_logits_metadata(lens, 64, 1)
"""


def load_deepgemm(device="cuda", probe_timeout_s: float = 600.0):
    """``(deep_gemm, None)`` where DeepGEMM imports, has the paged logits and builds their schedule
    metadata in a child process on ``device`` without failing, else ``(None, why)``."""
    try:
        import deep_gemm
    except Exception as e:      # not installed, or built for another torch or CUDA
        return None, f"deep_gemm not importable ({type(e).__name__}: {e})"
    if not all(hasattr(deep_gemm, name) for name in ("fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata")):
        return None, "this deep_gemm build has no fp8_paged_mqa_logits"
    try:
        res = subprocess.run([sys.executable, "-c", _DEEPGEMM_PROBE.format(device=str(device))],
                             capture_output=True, text=True, timeout=probe_timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"deep_gemm's get_paged_mqa_logits_metadata did not return in {probe_timeout_s:.0f} s"
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [""])[-1][:200]
        how = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}: {last}"
        return None, f"deep_gemm's get_paged_mqa_logits_metadata failed in a probe process ({how})"
    return deep_gemm, None


class DeepGemmDense:
    """Dense DSA decode as engines run it on DeepGEMM: ``fp8_paged_mqa_logits`` over the same cache
    (our layout is its layout), each row's positions past its context set to -inf, ``torch.topk``.
    DeepGEMM takes a context length per row: query ``j`` of a sequence of ``L`` tokens with ``n`` new
    ones sees ``L - n + 1 + j`` keys. Its schedule metadata is built here once (engines build it
    once per step for all layers), so ``logits()`` and ``select()`` are launches only: capturable."""

    def __init__(self, deep_gemm, q, kv_cache, weights, context_lens, block_table, k: int):
        self.dg, self.k = deep_gemm, k
        n = q.shape[1]
        self.args = (q.contiguous(), kv_cache, weights.contiguous().float())
        self.ends = _visible_ends(context_lens, n)[:, None]                        # [B * n, 1] int32
        self.row_lens = self.ends.view(-1, n)                                      # [B, n], DeepGEMM's form
        self.table = block_table.to(torch.int32).contiguous()
        self.width = block_table.shape[1] * quant.PAGE_SIZE
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        self.schedule = deep_gemm.get_paged_mqa_logits_metadata(self.row_lens, quant.PAGE_SIZE, num_sms)
        self.past_end = torch.arange(self.width, device=q.device)[None, :] >= self.ends   # [B * n, width]

    def logits(self) -> torch.Tensor:
        q, cache, w = self.args
        return self.dg.fp8_paged_mqa_logits(q, cache, w, self.row_lens, self.table, self.schedule, self.width, False)

    def select(self) -> torch.Tensor:
        """``[B * n, k]`` int64 positions (unsorted); rows with fewer than ``k`` keys end in -inf picks."""
        return self.logits().masked_fill_(self.past_end, float("-inf")).topk(self.k, dim=-1, sorted=False).indices

    def select_our_topk(self) -> torch.Tensor:
        """DeepGEMM's logits and our top-k, dispatched as the selectors dispatch it (one launch for
        rows that fit the short-row kernel, else the long-row top-k): dense DSA from the faster
        stage of each, ``[B * n, k]`` int32 positions, -1 padded."""
        from .ops.topk.launches import topk_launch
        ends = self.ends.view(-1)
        call = topk_launch(self.logits(), torch.zeros_like(ends), ends, self.k)
        call.run()
        return call.out

    def positions(self) -> torch.Tensor:
        """``select()`` as the selectors return it: int32, -1 where a pick is past the row's end."""
        idx = self.select()
        return torch.where(idx < self.ends, idx, -1).to(torch.int32)


def decode_batch(batch: int, context: int, next_n: int, heads: int, head_dim: int, distinct: int, seed: int,
                 device):
    """``(q [B, n, H, D], weights [B * n, H], kv_cache, block_table, context_lens, pooled)``."""
    seqs, qs, ws = [], [], []
    for i in range(min(distinct, batch)):
        wl = indexer_workload(context, next_n, heads, head_dim, seed=seed + i, device=device)
        seqs.append(wl.kv)
        qs.append(wl.q)
        ws.append(wl.weights)
    reps = [j % len(seqs) for j in range(batch)]
    cache, table, lens = quant.build_paged_kcache([seqs[j] for j in reps],
                                                  generator=torch.Generator().manual_seed(seed))
    from .ops.pool.triton import pool_paged_kcache
    pooled = pool_paged_kcache(cache, table, lens)
    q = torch.stack([qs[j] for j in reps])
    w = torch.cat([ws[j] for j in reps])
    return q, w, cache, table, lens, pooled


def bench_shape(cfg: DecodeBenchConfig, batch: int, context: int, next_n: int, device, deep_gemm=None) -> dict:
    import misa
    from .ops.dsa.paged_triton import paged_logits
    q, w, cache, table, lens, pooled = decode_batch(batch, context, next_n, cfg.heads, cfg.head_dim, cfg.distinct,
                                                    cfg.seed, device)
    args = (q, cache, w, lens, table)
    row = {"batch": batch, "context": context, "next_n": next_n}
    common = dict(num_heads=cfg.heads, head_dim=cfg.head_dim, k=cfg.k, max_batch=batch, max_context=context,
                  next_n=next_n, device=device)
    # every method is captured and checked first, then all are timed in interleaved rounds: a
    # stretch of host or card noise then slows one round of every method, not one method's figure
    timers = {}
    buf = torch.empty(batch * next_n, table.shape[1] * quant.PAGE_SIZE, dtype=torch.float32, device=device)
    timers["dsa.logits_ms"] = _graph(lambda: paged_logits(q, cache, w, lens, table, buf))
    dsa = DecodeSelector("dsa", **common)
    timers["dsa.graph_ms"] = _graph(lambda: dsa(*args))
    reference = dsa(*args).clone()
    timers["dsa.eager_ms"] = HostTimed(lambda: misa.paged_dsa_select(*args, k=cfg.k))
    selectors = [dsa]            # the graphs write into their selectors' buffers: kept alive until timed
    if deep_gemm is not None:
        try:
            dg = DeepGemmDense(deep_gemm, q, cache, w, lens, table, cfg.k)
            ours = buf.narrow(1, 0, dg.width)        # the dense logits the dsa.logits capture left
            theirs = dg.logits()
            valid = ~dg.past_end
            row["deepgemm.logits_max_rel_err"] = float((theirs - ours)[valid].abs().max() / ours[valid].abs().max())
            row["deepgemm.recall_mean"] = float(recall(dg.positions(), reference).mean())
            row["deepgemm-ourtopk.recall_mean"] = float(recall(dg.select_our_topk(), reference).mean())
            timers.update({"deepgemm.logits_ms": _graph(dg.logits), "deepgemm.graph_ms": _graph(dg.select),
                           "deepgemm-ourtopk.graph_ms": _graph(dg.select_our_topk)})
            selectors.append(dg)
        except RuntimeError as e:      # a shape or card this DeepGEMM build does not take
            row["deepgemm.skipped"] = str(e).splitlines()[0][:200]
    for m in cfg.block_ks:
        if m * quant.PAGE_SIZE < cfg.k:
            continue
        sel = DecodeSelector("hisa", block_size=quant.PAGE_SIZE, block_k=m, **common)
        selectors.append(sel)
        key = f"hisa-m{m}"
        timers[f"{key}.graph_ms"] = _graph(lambda sel=sel: sel(*args, pooled))
        r = recall(sel(*args, pooled), reference)
        row[f"{key}.recall_mean"], row[f"{key}.recall_min"] = float(r.mean()), float(r.min())
        # the best any choice of as many pages could keep: what the workload allows page pruning
        row[f"{key}.oracle_recall_mean"] = float(page_recall_bound(reference, sel.kept).mean())
        if m == cfg.block_ks[0] or m == 64:
            timers[f"{key}.eager_ms"] = HostTimed(lambda m=m: misa.paged_hisa_select(
                *args, k=cfg.k, block_size=quant.PAGE_SIZE, block_k=m, pooled=pooled))
        if m == 64:     # the same pages scored from a float32 pooled-key cache (8 bytes a token, not 4)
            wide = misa.pool_paged_kcache(cache, table, lens, dtype=torch.float32)
            timers[f"f32-pooled.{key}.graph_ms"] = _graph(lambda sel=sel: sel(*args, wide))
            row[f"f32-pooled.{key}.recall_mean"] = float(recall(sel(*args, wide), reference).mean())
    routed = DecodeSelector("misa", active_heads=8, **common)
    dagger = DecodeSelector("misa-dagger", active_heads=8, stage1_k=cfg.stage1_k, **common)
    selectors += [routed, dagger]
    timers["misa-h8.graph_ms"] = _graph(lambda: routed(*args, pooled))
    timers["misa-h8.eager_ms"] = HostTimed(lambda: misa.paged_misa_select(*args, k=cfg.k, active_heads=8,
                                                                        pooled=pooled))
    row["misa-h8.recall_mean"] = float(recall(routed(*args, pooled), reference).mean())
    timers["misa-dagger-h8.graph_ms"] = _graph(lambda: dagger(*args, pooled))
    timers["misa-dagger-h8.eager_ms"] = HostTimed(lambda: misa.paged_misa_select(*args, k=cfg.k, active_heads=8,
                                                                                 stage1_k=cfg.stage1_k, pooled=pooled))
    r = recall(dagger(*args, pooled), reference)
    row["misa-dagger-h8.recall_mean"], row["misa-dagger-h8.recall_min"] = float(r.mean()), float(r.min())
    # each eager call's graph replayed the same way (back to back from Python, wall clock): the
    # difference is the checked call's own host cost, free of do_bench's flushes and clock drift
    for name in [n for n in timers if n.endswith(".eager_ms")]:
        method = name[:-len("eager_ms")]
        timers[method + "replay_wall_ms"] = HostTimed(timers[method + "graph_ms"])
    ms, row["ms_rounds"] = _time_rounds(timers, cfg.rep_ms, cfg.rounds)
    row.update(ms)
    for name in [n for n in ms if n.endswith(".eager_ms")]:
        method = name[:-len("eager_ms")]
        row[method + "eager_overhead_ms"] = ms[name] - ms[method + "replay_wall_ms"]
    cache_bytes = batch * context * quant.paged_bytes_per_token(cfg.head_dim)
    row["dsa.logits_GBps"] = cache_bytes / ms["dsa.logits_ms"] / 1e6
    if "deepgemm.logits_ms" in ms:
        row["deepgemm.logits_GBps"] = cache_bytes / ms["deepgemm.logits_ms"] / 1e6
    # dense DSA at its best: ours, or DeepGEMM's logits with either top-k where it ran
    row["best-dense.graph_ms"] = min(ms[name] for name in ("dsa.graph_ms", "deepgemm.graph_ms",
                                                          "deepgemm-ourtopk.graph_ms") if name in ms)
    for name in ms:
        if name.startswith("hisa-m") and name.endswith(".graph_ms"):
            row[name[:-len("graph_ms")] + "speedup"] = ms["dsa.graph_ms"] / ms[name]
            row[name[:-len("graph_ms")] + "speedup_vs_best_dense"] = row["best-dense.graph_ms"] / ms[name]
    return row         # its buffers and graphs go with this frame: the caller empties the cache


def run_decode_bench(cfg: DecodeBenchConfig, device, progress: bool = True) -> dict:
    device = torch.device(device)
    card = torch.cuda.get_device_name(device)
    copy = copy_bandwidth(device)
    deep_gemm, why_not = load_deepgemm(device)
    rows = []
    for batch, context in cfg.shapes:
        for n in cfg.next_ns:
            row = bench_shape(cfg, batch, context, n, device, deep_gemm)
            torch.cuda.empty_cache()
            row["dsa.logits_share_of_copy"] = row["dsa.logits_GBps"] / copy
            if "deepgemm.logits_GBps" in row:
                row["deepgemm.logits_share_of_copy"] = row["deepgemm.logits_GBps"] / copy
            rows.append(row)
            if progress:
                print(format_row(row), flush=True)
    return {"card": card, "copy_GBps": copy, "config": asdict(cfg), "rows": rows,
            "torch": torch.__version__,
            "deepgemm": getattr(deep_gemm, "__version__", "unknown version") if deep_gemm else why_not}


def format_row(row: dict) -> str:
    head = (f"B={row['batch']:>3} ctx={row['context']:>6} n={row['next_n']}: dsa logits {row['dsa.logits_ms']:.3f} ms "
            f"({row['dsa.logits_GBps']:.0f} GB/s), dsa graph {row['dsa.graph_ms'] * 1e3:.1f} us / eager "
            f"{row['dsa.eager_ms'] * 1e3:.1f} us")
    parts = [head]
    if "deepgemm.graph_ms" in row:
        parts.append(f"  deepgemm logits {row['deepgemm.logits_ms'] * 1e3:.1f} us "
                     f"({row['deepgemm.logits_GBps']:.0f} GB/s), + topk {row['deepgemm.graph_ms'] * 1e3:.1f} us graph, "
                     f"recall {row['deepgemm.recall_mean']:.4f}, "
                     f"logits max rel err {row['deepgemm.logits_max_rel_err']:.1e}")
        if "deepgemm-ourtopk.graph_ms" in row:
            parts.append(f"  deepgemm logits + our topk {row['deepgemm-ourtopk.graph_ms'] * 1e3:.1f} us graph, "
                         f"recall {row['deepgemm-ourtopk.recall_mean']:.4f}")
    elif "deepgemm.skipped" in row:
        parts.append(f"  deepgemm skipped: {row['deepgemm.skipped']}")
    for key in sorted(k[:-len('.graph_ms')] for k in row if k.startswith("hisa-") and k.endswith(".graph_ms")):
        bound = row.get(key + ".oracle_recall_mean")
        parts.append(f"  {key}: {row[key + '.graph_ms'] * 1e3:.1f} us graph ({row[key + '.speedup']:.2f}x dsa), "
                     f"recall {row[key + '.recall_mean']:.3f} (min {row[key + '.recall_min']:.3f})"
                     + (f", best pages {bound:.3f}" if bound is not None else ""))
    if "f32-pooled.hisa-m64.graph_ms" in row:
        parts.append(f"  hisa-m64 from a float32 pooled cache: {row['f32-pooled.hisa-m64.graph_ms'] * 1e3:.1f} us graph, "
                     f"recall {row['f32-pooled.hisa-m64.recall_mean']:.3f}")
    parts.append(f"  misa-h8 graph {row['misa-h8.graph_ms'] * 1e3:.1f} us, eager {row['misa-h8.eager_ms'] * 1e3:.1f} us, "
                 f"recall {row['misa-h8.recall_mean']:.3f}")
    if "misa-dagger-h8.graph_ms" in row:
        parts.append(f"  misa-dagger-h8 graph {row['misa-dagger-h8.graph_ms'] * 1e3:.1f} us, eager "
                     f"{row['misa-dagger-h8.eager_ms'] * 1e3:.1f} us, recall {row['misa-dagger-h8.recall_mean']:.3f} "
                     f"(min {row['misa-dagger-h8.recall_min']:.3f})")
    return "\n".join(parts)


def decode_tables(result: dict):
    """The decode bench as narrow tables: one row per (shape, method)."""
    from .bench import Table
    rows = []
    for r in result["rows"]:
        shape = f"{r['batch']}x{r['context'] // 1024}K n={r['next_n']}"
        dsa = r["dsa.graph_ms"]
        best = r.get("best-dense.graph_ms", dsa)       # results saved before it was measured: ours

        def eager(method):
            """The checked call's wall clock per call, and what it adds to its graph's replay."""
            if f"{method}.eager_ms" not in r:
                return "-"
            text = f"{r[method + '.eager_ms'] * 1e3:.1f}"
            over = r.get(f"{method}.eager_overhead_ms")       # results saved before it was measured lack it
            return text + (f" ({over * 1e3:+.1f})" if over is not None else "")

        def add(method, graph_ms, eager_text, recall_text, logits=""):
            rows.append([shape, method, f"{graph_ms * 1e3:.1f}", eager_text,
                         f"{dsa / graph_ms:.2f}", f"{best / graph_ms:.2f}", recall_text, logits])

        add("DSA dense", dsa, eager("dsa"), "1.000",
            f"{r['dsa.logits_GBps']:.0f} ({r['dsa.logits_share_of_copy']:.0%})")
        if "deepgemm.graph_ms" in r:
            add("DSA, DeepGEMM logits + torch.topk", r["deepgemm.graph_ms"], "-", f"{r['deepgemm.recall_mean']:.3f}",
                f"{r['deepgemm.logits_GBps']:.0f} ({r['deepgemm.logits_share_of_copy']:.0%})")
        if "deepgemm-ourtopk.graph_ms" in r:
            add("DSA, DeepGEMM logits + our top-k", r["deepgemm-ourtopk.graph_ms"], "-",
                f"{r['deepgemm-ourtopk.recall_mean']:.3f}")
        for key in sorted((k[:-len(".graph_ms")] for k in r if k.startswith("hisa-m") and k.endswith(".graph_ms")),
                          key=lambda k: int(k[len("hisa-m"):])):
            bound = r.get(f"{key}.oracle_recall_mean")      # results saved before it was measured lack it
            add(f"block-pruned m={key[len('hisa-m'):]}", r[key + ".graph_ms"], eager(key),
                f"{r[key + '.recall_mean']:.3f}" + (f" (best {bound:.3f})" if bound is not None else ""))
        add("MISA h=8", r["misa-h8.graph_ms"], eager("misa-h8"), f"{r['misa-h8.recall_mean']:.3f}")
        if "misa-dagger-h8.graph_ms" in r:     # results saved before MISA-dagger was measured lack it
            add(f"MISA† h=8 k1={result['config'].get('stage1_k', '')}", r["misa-dagger-h8.graph_ms"],
                eager("misa-dagger-h8"), f"{r['misa-dagger-h8.recall_mean']:.3f}")
    dg = result.get("deepgemm")
    return [Table(f"Decode selection per call, us ({result['card']}, copy {result['copy_GBps']:.0f} GB/s); x = DSA "
                  "graph / method graph; x best = the fastest dense DSA's graph / method graph; recall of DSA's "
                  "selection (best: the most any choice of as many pages keeps); eager: the checked call, wall clock, "
                  "(+ what it adds to its graph replayed back to back the same way)" + (f"; DeepGEMM: {dg}" if dg else ""),
                  ["shape", "method", "graph us", "eager us", "x", "x best", "recall", "logits GB/s"], rows)]
