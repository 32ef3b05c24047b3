"""``misa bench``: each method end to end and stage by stage on the GPU kernels.

Inputs are the synthetic structured workload (fresh random fp8 q/k drawn for every size; recall
against DSA is meaningful on it, unlike on i.i.d. noise). Times are medians of many runs
(``triton.testing.do_bench``); every speed-up is against dense DSA measured in the same run.

End to end is each method's ``misa.PrefillSelector`` call (the kernels, into buffers allocated
once); "checked" is the public function on the same inputs (``misa.dsa_select`` and the others:
validation with its one read-back, the kernels through a cached selector, a copy of the result),
and its overhead is checked / end to end - 1, both measured in the same run.

Each method runs with its default logits dtype (float32, bfloat16 for MISA-dagger's first stage:
``misa.validate.DEFAULT_LOGITS_DTYPES``). ``compare_logits_dtypes`` (``misa bench
--compare-logits-dtypes``) adds for DSA and each requested method with a logits matrix (not HISA)
a row in the other dtype, ``<method>-bf16`` or ``<method>-f32``: the same selector storing its
logits in bfloat16 or float32. Besides its time, speed-up and recall of DSA's (float32)
selection, the bfloat16 row of each pair reports ``.recall_vs_f32``, the recall of the float32
selection: what decides which dtype is the default (they differ only where rounding ties keys at
the k-th value).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import MisaConfig
from .metrics import recall
from .synthetic import indexer_workload
from .validate import LOGITS_DTYPE_NAMES, check_inputs, logits_dtype_for
from .variants import METHODS as REGISTRY, VARIANTS, check_methods, method_config

METHODS = tuple(REGISTRY)          # the names --methods takes: misa.variants.METHODS
BF16, F32 = "-bf16", "-f32"        # suffixes of the rows in the logits dtype other than the method's default


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
    compare_logits_dtypes: bool = False     # also each method's row in the other logits dtype

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds: {self.rounds} must be at least 1")
        self.methods = tuple(check_methods(self.methods))
        if not isinstance(self.compare_logits_dtypes, bool):
            raise ValueError(f"compare_logits_dtypes: expected a bool, got {self.compare_logits_dtypes!r}")


DTYPE_NAMES = {d: n for n, d in LOGITS_DTYPE_NAMES.items()}


def default_logits_dtype(name: str) -> str:
    """Method ``name``'s logits dtype when none is given, as configs spell it."""
    return DTYPE_NAMES[logits_dtype_for(REGISTRY[name].variant)]


def _dsa_first(methods) -> list[str]:
    """``methods`` with DSA, the reference every row is measured against, first."""
    return ["dsa"] + [m for m in methods if m != "dsa"]


def _table_order(methods, rows) -> list[str]:
    """DSA first, then each method, each followed by those of ``rows`` that time it in its other
    logits dtype."""
    names = []
    for name in _dsa_first(methods):
        names += [name] + [row for row in rows if row in (name + BF16, name + F32)]
    return names


def dtype_rows(methods, compare: bool) -> dict[str, tuple[str, str]]:
    """The rows a bench of ``methods`` (DSA always among them) adds with ``compare``: ``{row:
    (method, logits dtype)}``, one per method with a logits matrix, in the dtype other than its
    default."""
    if not compare:
        return {}
    out = {}
    for name in _dsa_first(methods):
        if not VARIANTS[REGISTRY[name].variant].block_pruned:
            other = "float32" if default_logits_dtype(name) == "bfloat16" else "bfloat16"
            out[name + (F32 if other == "float32" else BF16)] = (name, other)
    return out


def row_names(methods, compare: bool) -> list[str]:
    """Every timed selector in table order: DSA first, each method's other-dtype row after it."""
    return _table_order(methods, dtype_rows(methods, compare))


def dtype_pairs(dtypes: dict[str, str]) -> dict[str, tuple[str, str]]:
    """From each timed row's logits dtype: ``{method: (its float32 row, its bfloat16 row)}`` for the
    methods timed in both."""
    pairs = {}
    for row, dtype in dtypes.items():
        method = row.removesuffix(BF16).removesuffix(F32) if row.endswith((BF16, F32)) else row
        if method != row and method in dtypes:
            f32, b16 = (row, method) if dtype == "float32" else (method, row)
            pairs[method] = (f32, b16)
    return pairs


def _time(fn, rep_ms: float) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


class HostTimed:
    """A timer that ``_time_rounds`` times by wall clock (``_time_host``) instead of CUDA events."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn()


def _time_host(fn, rep_ms: float, batches: int = 10) -> float:
    """ms per call of ``fn`` called back to back from Python: wall clock over ``batches`` batches,
    the card synchronised at the end of each, median over batches. For a call that waits on the
    card itself (a checked function reads its checks back) this is what its caller waits, host work
    included; do_bench's CUDA events would hide the host work that overlaps the L2 flush it issues
    before every call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - start, 1e-6)
    per_batch = max(1, int(rep_ms / 1e3 / once / batches))
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / per_batch)
    return statistics.median(times) * 1e3


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
            timer = _time_host if isinstance(fn, HostTimed) else _time
            per_round[name].append(timer(fn, rep_ms / rounds))
    return {name: statistics.median(v) for name, v in per_round.items()}, per_round


def _config(cfg: BenchConfig, name: str):
    """Method ``name``'s ``MisaConfig`` at the bench's sizes."""
    return method_config(name, active_heads=cfg.active_heads, block_size=cfg.block_size, stage1_k=cfg.stage1_k,
                         hisa_block_size=cfg.hisa_block_size, hisa_block_k=cfg.hisa_block_k)


def _run(mc, inp, k: int) -> torch.Tensor:
    """``mc.select`` on inputs validated once (``misa.select``'s entry points, as ``misa.api``
    calls them after its checks: a selector cached per shape, a new output tensor)."""
    from . import select
    if mc.variant == "dsa":
        return select.dsa_select(inp, k, mc.workspace_bytes)
    if mc.variant == "hisa":
        return select.hisa_select(inp, k, mc.hisa_block_size, mc.hisa_block_k, mc.workspace_bytes)
    return select.misa_select(inp, k, mc.active_heads, mc.block_size, mc.stage1_k, mc.router, mc.workspace_bytes)


def row_config(cfg: BenchConfig, name: str):
    """The ``MisaConfig`` of a bench row: a method, or its row in the other logits dtype
    (``<method>-bf16`` / ``<method>-f32``, from ``row_names``)."""
    method, dtype = dtype_rows(cfg.methods, True).get(name, (name, None))
    mc = _config(cfg, method)
    return mc if dtype is None else mc.with_options(logits_dtype=dtype)


def _selector(cfg: BenchConfig, mc, seq_len: int, device):
    """Method ``mc``'s ``PrefillSelector`` for ``cfg.num_queries`` x ``seq_len``."""
    from .prefill import PrefillSelector
    opts = {}
    if mc.variant in ("misa", "misa-dagger"):
        opts = dict(active_heads=mc.active_heads, block_size=mc.block_size, router=mc.router, stage1_k=mc.stage1_k)
    elif mc.variant == "hisa":
        opts = dict(hisa_block_size=mc.hisa_block_size, hisa_block_k=mc.hisa_block_k)
    return PrefillSelector(mc.variant, num_heads=cfg.heads, head_dim=cfg.head_dim, k=cfg.k,
                           max_queries=cfg.num_queries, max_keys=seq_len, device=device,
                           workspace_bytes=mc.workspace_bytes, logits_dtype=mc.torch_logits_dtype, **opts)


def _key(name: str) -> str:
    return name.replace("-", "_")


def stage_owners(methods) -> dict[str, str]:
    """For each routed method, the method whose router / routed-logits timers it shares: the first
    requested routed method with the same router statistic (MISA-dagger's first stage is MISA's)."""
    owners, by_router = {}, {}
    for name in methods:
        v = VARIANTS[REGISTRY[name].variant]
        if v.routed:
            router = REGISTRY[name].router or MisaConfig.router     # None: MisaConfig's default
            owners[name] = by_router.setdefault(router, name)
    return owners


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

    # the stages' buffers: dense logits for DSA's top-k, routed logits per router statistic for the
    # routed methods' top-k (each timer rewrites its buffer with the same values, so the rounds can
    # interleave)
    dense_buf = torch.full((t, seq_len), float("-inf"), device=device)
    dense = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, dense_buf)
    dense()
    timers["dsa.logits"] = dense
    # the top-k as the selections run it, with its cut's sample where they compute one (cut_sample)
    sample = lambda heads=None: cut_sample(inp.q, inp.weights, inp.k, inp.k_scale, 0, seq_len, heads=heads)
    timers["dsa.topk"] = lambda: topk(dense_buf, inp.ks, inp.ke, k, sample=sample())
    timers["torch.topk"] = lambda: torch.topk(dense_buf, k, dim=1, sorted=False)
    extra = dtype_rows(cfg.methods, cfg.compare_logits_dtypes)     # other-dtype row -> (method, dtype)
    if extra:
        dense16 = torch.full((t, seq_len), float("-inf"), dtype=torch.bfloat16, device=device)
        timers["dsa-bf16.logits"] = lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke,
                                                          dense16)
        timers["dsa-bf16.logits"]()
        timers["dsa-bf16.topk"] = lambda: topk(dense16, inp.ks, inp.ke, k, sample=sample())
    # end to end: each method's selector (buffers allocated once, as an engine holds it); checked:
    # the public function (validation and its read-back, a cached selector, a copy of the result)
    args = (inp.q, (inp.k, inp.k_scale), inp.weights, inp.ks, inp.ke)
    runs = {}
    row["logits_dtypes"] = dtypes = {}
    for name in row_names(cfg.methods, cfg.compare_logits_dtypes):
        mc = row_config(cfg, name)
        if not VARIANTS[mc.variant].block_pruned:
            dtypes[name] = DTYPE_NAMES[logits_dtype_for(mc.variant, mc.torch_logits_dtype)]
        sel = _selector(cfg, mc, seq_len, device)
        runs[name] = run = (lambda sel: lambda: sel(*args))(sel)
        timers[name + ".e2e"] = run
        timers[name + ".checked"] = (lambda mc: lambda: mc.select(*w.args, k))(mc)
        # memory a call needs: the selector's buffers (and anything a call would allocate beyond them)
        row[name + ".peak_mb"] = sel.nbytes / 2**20 + _peak_mb(run, device)
    ref = runs["dsa"]().clone()
    timers["checks"] = lambda: check_inputs(*w.args)

    owners = stage_owners(cfg.methods)
    routed = {}                                  # owner -> (heads, routed logits buffer)
    for name, owner in owners.items():
        mc = _config(cfg, name)
        if owner == name:
            heads = route_heads(inp, mc.active_heads, mc.block_size, router=mc.router)
            buf = torch.full((t, seq_len), float("-inf"), device=device)
            fill = (lambda heads, buf: lambda: launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke,
                                                             buf, heads=heads))(heads, buf)
            fill()
            routed[name] = (heads, buf)
            timers[name + ".router"] = (lambda mc: lambda: route_heads(inp, mc.active_heads, mc.block_size,
                                                                       router=mc.router))(mc)
            timers[name + ".logits"] = fill
        heads, buf = routed[owner]
        if default_logits_dtype(name) == "bfloat16":
            # the top-k reads the rows this method stores (the routed logits' timer stays its owner's)
            buf = buf.to(torch.bfloat16)
        if mc.stage1_k is None:
            timers[name + ".topk"] = (lambda heads, buf: lambda: topk(buf, inp.ks, inp.ke, k,
                                                                      sample=sample(heads)))(heads, buf)
        else:
            timers[name + ".stage1_topk"] = (lambda heads, buf, k1: lambda: topk(
                buf, inp.ks, inp.ke, k1, sample=sample(heads)))(heads, buf, mc.stage1_k)
            cand = topk(buf, inp.ks, inp.ke, mc.stage1_k)
            timers[name + ".rerank"] = (lambda cand: lambda: rerank(inp, cand, k))(cand)
    for name in runs:
        if name != "dsa":
            row[name + ".recall"] = float(recall(runs[name](), ref).mean())
    for f32, b16 in dtype_pairs(dtypes).values():     # each selector returns its own buffer: both stay valid
        row[b16 + ".recall_vs_f32"] = float(recall(runs[b16](), runs[f32]()).mean())

    ms, row["ms_rounds"] = _time_rounds(timers, cfg.rep_ms, cfg.rounds)
    row["ms"] = ms
    row["dsa.logits_tflops"] = 2 * h * d * pairs / ms["dsa.logits"] / 1e9
    if extra:
        row["dsa-bf16.logits_tflops"] = 2 * h * d * pairs / ms["dsa-bf16.logits"] / 1e9
    for owner in routed:
        row[owner + ".logits_tflops"] = 2 * cfg.active_heads * d * pairs / ms[owner + ".logits"] / 1e9
        row[f"speedup.{_key(owner)}_scoring"] = ms["dsa.logits"] / (ms[owner + ".router"] + ms[owner + ".logits"])
    for name in runs:
        if name != "dsa":
            row[f"speedup.{_key(name)}_e2e"] = ms["dsa.e2e"] / ms[name + ".e2e"]
    row["speedup.topk_vs_torch"] = ms["torch.topk"] / ms["dsa.topk"]
    for name in runs:
        row[f"overhead.{_key(name)}_checked"] = ms[name + ".checked"] / ms[name + ".e2e"] - 1
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
    return {**run_info(cfg, device), "rows": rows}


def run_info(cfg: BenchConfig, device: torch.device) -> dict:
    """What a saved bench result records about its run: card, date, versions, config."""
    return {"gpu": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "config": asdict(cfg)}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    left: int = 2             # the first columns are labels (left-aligned), the rest numbers


def _label(name: str) -> str:
    for suffix in (BF16, F32):
        if name.endswith(suffix) and name[:-len(suffix)] in REGISTRY:
            return _label(name[:-len(suffix)]) + " " + suffix[1:]
    return REGISTRY[name].label if name in REGISTRY else name


def _methods(result: dict) -> list[str]:
    return list(result.get("config", {}).get("methods") or METHODS)


def _row_dtypes(result: dict, r: dict) -> dict[str, str]:
    """Each timed row's logits dtype, as the row recorded it; results saved before rows did so
    timed every method in float32, and with ``logits_dtype: bfloat16`` each one's "-bf16" row too."""
    if "logits_dtypes" in r:
        return r["logits_dtypes"]
    methods = [m for m in _dsa_first(_methods(result)) if not VARIANTS[REGISTRY[m].variant].block_pruned]
    out = {m: "float32" for m in methods}
    if result.get("config", {}).get("logits_dtype") == "bfloat16":
        out.update({m + BF16: "bfloat16" for m in methods})
    return out


def _row_names(result: dict, r: dict) -> list[str]:
    """The rows of one size in table order: DSA first, each method's other-dtype row after it."""
    return _table_order(_methods(result), _row_dtypes(result, r))


def _f(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def bench_tables(result: dict) -> list[Table]:
    """The bench's results as narrow tables (long format: one row per size and method, so the
    width does not grow with the number of methods): end to end, bfloat16 against float32 logits
    (where measured), stages, speed-up summary, checked functions."""
    methods = _methods(result)
    owners = stage_owners(methods)
    e2e, stages, low = [], [], []
    for r in result["rows"]:
        ms = r["ms"]
        names = _row_names(result, r)
        keys = str(r["seq_len"])
        dsa_ms = ms.get("dsa.e2e")
        first = True
        for name in names:
            t = ms.get(name + ".e2e")
            if t is None:
                continue
            e2e.append([keys if first else "", _label(name), _f(t), _f(dsa_ms / t if dsa_ms else None),
                        "1.000" if name == "dsa" else _f(r.get(name + ".recall"), ".3f"),
                        _f(r.get(name + ".peak_mb"), ".0f")])
            first = False
        dense = ms.get("dsa.logits")
        stages.append([keys, "DSA", "-", _f(dense), _f(r.get("dsa.logits_tflops"), ".0f"), _f(ms.get("dsa.topk")),
                       "-", "1.00"])
        if "dsa-bf16.logits" in ms:
            stages.append(["", _label("dsa-bf16"), "-", _f(ms["dsa-bf16.logits"]),
                           _f(r.get("dsa-bf16.logits_tflops"), ".0f"), _f(ms.get("dsa-bf16.topk")), "-",
                           _f(dense / ms["dsa-bf16.logits"] if dense else None)])
        stages.append(["", "torch.topk", "-", "-", "-", _f(ms.get("torch.topk")), "-", "-"])
        for name, owner in owners.items():
            router, logits = ms.get(owner + ".router"), ms.get(owner + ".logits")
            scoring = dense / (router + logits) if dense and router is not None and logits is not None else None
            if name + ".rerank" in ms:
                top, rescore = ms.get(name + ".stage1_topk"), ms.get(name + ".rerank")
            else:
                top, rescore = ms.get(name + ".topk"), None
            stages.append(["", _label(name), _f(router), _f(logits), _f(r.get(owner + ".logits_tflops"), ".0f"),
                           _f(top), _f(rescore), _f(scoring)])
        first = True
        for method, (f32, b16) in dtype_pairs(_row_dtypes(result, r)).items():
            t, t32 = ms.get(b16 + ".e2e"), ms.get(f32 + ".e2e")
            if t is None or t32 is None:
                continue
            recall_f32, recall_b16 = (1.0 if n == "dsa" else r.get(n + ".recall") for n in (f32, b16))
            low.append([keys if first else "", _label(method), _f(t32), _f(t), _f(t32 / t),
                        _f(r.get(b16 + ".recall_vs_f32"), ".4f"), _f(recall_f32, ".3f"), _f(recall_b16, ".3f")])
            first = False
    checked = []
    for r in result["rows"]:
        ms = r["ms"]
        first = True
        for name in _row_names(result, r):
            t, c = ms.get(name + ".e2e"), ms.get(name + ".checked")
            if t is None or c is None:
                continue
            checked.append([str(r["seq_len"]) if first else "", _label(name), _f(t), _f(c),
                            _f(100 * (c / t - 1), "+.1f"), _f(ms.get("checks"), ".3f")])
            first = False
    others = [m for m in methods if m != "dsa"]
    summary = [[str(r["seq_len"])] + [_f(r["ms"]["dsa.e2e"] / r["ms"][m + ".e2e"] if m + ".e2e" in r["ms"] else None)
                                      for m in others] for r in result["rows"]]
    tables = [
        Table("End to end (the selector call): ms, x = speed-up over DSA in the same run, recall of DSA's tokens, "
              "MB of device memory the call needs (the selector's buffers)",
              ["keys", "method", "ms", "x DSA", "recall", "MB"], e2e),
        Table("Stages, ms (TFLOP/s of the scoring; scoring x = DSA logits / (router + logits); MISA-dagger: "
              "top-k = its stage-1 top-k1, then the re-scoring with all heads)",
              ["keys", "method", "router", "logits", "TFLOP/s", "top-k", "re-score", "scoring x"], stages),
        Table("Speed-up over DSA, end to end (x)", ["keys"] + [_label(m) for m in others], summary, left=1),
        Table("Checked functions (misa.dsa_select, misa_select, hisa_select: validation with one read-back, the "
              "kernels, a copy of the result) against the selector alone, ms; overhead in %; checks = the "
              "validation alone", ["keys", "method", "selector", "checked", "overhead %", "checks"], checked),
    ]
    if low:
        tables.insert(1, Table(
            "bfloat16 logits against float32, end to end: ms of each, x = float32 / bfloat16, recall of the "
            "float32 selection (DSA and MISA rank the keys rounding ties at the k-th value in float32; "
            "MISA-dagger's stage 1 keeps either), and each one's recall of DSA's float32 selection",
            ["keys", "method", "f32 ms", "bf16 ms", "x", "vs f32", "f32 DSA", "bf16 DSA"], low))
    return tables


def format_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The end-to-end table's columns and rows (``bench_tables(result)[0]``)."""
    t = bench_tables(result)[0]
    return t.columns, t.rows


def save(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
