"""Prefill selection for serving engines: built once for a largest chunk shape, then called without
host synchronisation, allocation or Python loops over sequences, so an engine can capture it in a
CUDA graph and replay it with new ``q``, ``weights``, ``ks``, ``ke`` and key contents.

    sel = misa.PrefillSelector("misa", num_heads=64, head_dim=128, k=2048, max_queries=8192,
                               max_keys=131072, device="cuda", active_heads=8)
    sel.check(q, (k_fp8, k_scale), weights, ks, ke)      # optional: validates, one sync
    idx = sel(q, (k_fp8, k_scale), weights, ks, ke)      # capturable

Variants: ``"dsa"``, ``"misa"``, ``"misa-dagger"`` (MISA with ``stage1_k``) and ``"hisa"``, the
kernels of ``misa.dsa_select`` / ``misa_select`` / ``hisa_select`` with the same arguments and
conventions (``misa.api``); the checked functions run their kernel path through this class.

Buffers are allocated by the constructor for ``max_queries`` x ``max_keys``, in chunks of queries
that keep the largest intermediate under ``workspace_bytes`` as the checked functions do (a fixed
loop over a few chunks, not over sequences). Each ``(queries, keys)`` shape gets a launch plan on
first use: views of those buffers plus a few bytes of its own, allocated then, so call once at every
shape before capturing. A chunk's logits rows span keys ``[0, S)`` (not narrowed to the chunk's
``[min ks, max ke)``, which would need a read-back): nothing about ``ks`` / ``ke`` is read on the
host, and the kernels skip the key tiles no query of a block sees. The returned tensor is a buffer
of this selector, overwritten by the next call at the same shape. ``__call__`` does not validate
values (that needs a read-back); ``check`` does.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch
import triton

from .ops import power_of_two
from .ops.router.reference import DEFAULT_ROUTER
from .validate import (Inputs, check_hisa_budget, check_int, check_power_of_two, logits_dtype_for,
                       check_stage1_k)

SELECTOR_VARIANTS = ("dsa", "misa", "misa-dagger", "hisa")


def logits_width(num_keys: int) -> int:
    """Columns of a chunk's logits rows: the keys, rounded up to 16 (aligned, vectorised stores)."""
    return max(num_keys + (-num_keys % 16), 16)


def _budget(workspace_bytes, device: torch.device) -> int:
    from .select import DEFAULT_GPU_WORKSPACE_BYTES, DEFAULT_WORKSPACE_BYTES
    if workspace_bytes:
        return workspace_bytes
    return DEFAULT_GPU_WORKSPACE_BYTES if device.type == "cuda" else DEFAULT_WORKSPACE_BYTES


class PrefillSelector:
    """A prefill selector with preallocated buffers; see the module docstring.

    ``variant``: "dsa", "misa", "misa-dagger" or "hisa"; ``num_heads``, ``head_dim``: the indexer's H
    and D (powers of two, what the kernels tile); ``k``: tokens kept per query (default 2048);
    ``max_queries``, ``max_keys``: the largest ``T`` and ``S`` a call may pass. MISA: ``active_heads``
    (default 8, a power of two, at most H) routed by ``router`` ("gap", the default, or "abs-sum")
    over blocks of ``block_size`` keys; MISA-dagger also ``stage1_k`` (>= k, required). HISA: ``hisa_block_size``
    and ``hisa_block_k`` (``hisa_block_k * hisa_block_size >= k``). ``workspace_bytes``: as for the
    checked functions (None: 4 GiB on a GPU, 1 GiB elsewhere). ``logits_dtype`` (not HISA, which has
    no logits matrix): ``torch.float32`` or ``torch.bfloat16``, the logits rows the top-k reads
    (MISA-dagger's stage 1; its re-scoring stays float32); None: bfloat16 for MISA-dagger, float32
    for DSA and MISA (``misa.validate.DEFAULT_LOGITS_DTYPES``). bfloat16 rounds each logit once to
    nearest even, halving the logits' memory and their write and read traffic; with 8 significant
    bits, keys tie at the k-th value. DSA and MISA then score the tied keys again in float32
    (``misa.ops.ties``) and keep what the float32 logits keep, up to keys whose float32 scores
    differ in the fp8 MMA's last bits (a class of more than ``misa.ops.topk.triton.TIE_CAP`` tied
    keys keeps its first arrivals); MISA-dagger's stage 1 keeps either tied key, its margin.
    """

    def __init__(self, variant: str, *, num_heads: int, head_dim: int, k: int = 2048, max_queries: int,
                 max_keys: int, device=None, active_heads: int = 8, block_size: int = 1024,
                 router: str = DEFAULT_ROUTER, stage1_k: int | None = None, hisa_block_size: int = 128,
                 hisa_block_k: int = 64, workspace_bytes: int | None = None,
                 logits_dtype: torch.dtype | None = None):
        if variant not in SELECTOR_VARIANTS:
            raise ValueError(f"variant: expected one of {SELECTOR_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.num_heads = check_power_of_two("num_heads", num_heads)
        self.head_dim = check_power_of_two("head_dim", head_dim)
        self.k = check_int("k", k)
        self.max_queries = check_int("max_queries", max_queries)
        self.max_keys = check_int("max_keys", max_keys)
        if workspace_bytes is not None:
            check_int("workspace_bytes", workspace_bytes)
        self.workspace_bytes = workspace_bytes
        self.logits_dtype = logits_dtype_for(variant, logits_dtype)
        if variant == "hisa" and self.logits_dtype != torch.float32:
            raise ValueError(f"logits_dtype: 'hisa' scores pooled blocks and has no logits matrix to store in "
                             f"{logits_dtype}; leave it float32")
        device = torch.device(device if device is not None else "cuda")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.routed = variant in ("misa", "misa-dagger")
        self.stage1_k = None
        if self.routed:
            from .ops.router.triton import STATISTICS
            check_int("active_heads", active_heads, 1, num_heads)
            if not power_of_two(active_heads):
                raise ValueError(f"active_heads: the routed kernels take a power of two, got {active_heads}")
            check_int("block_size", block_size)
            if router not in STATISTICS:
                raise ValueError(f"router: the selector routes with one of {STATISTICS}, got {router!r}")
            if num_heads > 128:
                raise ValueError(f"num_heads: the router kernel takes at most 128 heads, got {num_heads}")
            if variant == "misa-dagger":
                if stage1_k is None:
                    raise ValueError("stage1_k: required by 'misa-dagger' (candidates re-ranked by all heads)")
                self.stage1_k = check_stage1_k(stage1_k, k)
            self.active_heads, self.block_size, self.router = active_heads, block_size, router
        if stage1_k is not None and variant != "misa-dagger":
            raise ValueError(f"stage1_k: only 'misa-dagger' takes it, got {stage1_k} with {variant!r}")
        if variant == "hisa":
            from .ops.blocks.reference import kept_blocks
            check_int("hisa_block_size", hisa_block_size)
            try:
                check_hisa_budget(k, hisa_block_size, hisa_block_k)
            except ValueError as e:
                raise ValueError(f"hisa_{e}") from None
            self.hisa_block_size, self.hisa_block_k = hisa_block_size, hisa_block_k
            self.kept = kept_blocks(k, hisa_block_size, hisa_block_k)
        self._flat: dict[str, torch.Tensor] = {}
        self._allocate()
        self._plans: dict[tuple[int, int], SimpleNamespace] = {}

    # -----------------------------------------------------------------------------------------
    # buffers

    def _allocate(self) -> None:
        """Every buffer, sized for ``max_queries`` x ``max_keys`` in chunks of ``chunk_rows``."""
        from .ops.dsa.triton import SAMPLE_MAX_HEADS
        from .ops.topk.triton import DEFAULT_CONFIG, TopkWorkspace, sample_step
        i32, f32 = torch.int32, torch.float32
        word = 4
        sizes = {}           # name -> (elements per chunk row, elements besides, dtype)
        ws = {}              # top-k workspaces: name -> (k, width)
        if self.variant == "hisa":
            nb = triton.cdiv(self.max_keys, self.hisa_block_size)
            cand = self.kept * self.hisa_block_size
            sizes.update(bks=(1, 0, i32), bke=(1, 0, i32), scores=(max(nb, 1), 0, f32), blocks=(self.kept, 0, i32),
                         cand=(cand, 0, i32), kbar32=(0, nb * self.head_dim, f32),
                         kbar16=(0, nb * self.head_dim, torch.bfloat16))
            ws["block_topk"] = (self.kept, max(nb, 1))
            rerank_width = cand
        else:
            width = logits_width(self.max_keys)
            n_heads = self.active_heads if self.routed else self.num_heads
            # a sample of at most 2 * sample columns (n = ceil(w / (w // sample)) at any width w)
            sample_cols = min(width, 2 * DEFAULT_CONFIG.sample) if n_heads <= SAMPLE_MAX_HEADS else 0
            first_k = self.stage1_k or self.k
            sizes.update(logits=(width, 0, self.logits_dtype), sample=(sample_cols, 0, f32),
                         sample_scales=(0, sample_cols, f32))
            ws["topk"] = (first_k, width)
            if self.routed:
                sizes.update(heads=(0, self.max_queries * self.active_heads, i32),
                             kbar=(0, triton.cdiv(self.max_keys, self.block_size) * self.head_dim, f32))
            rerank_width = self.stage1_k
            if rerank_width:
                sizes["stage1"] = (first_k, 0, i32)
        if rerank_width:
            step = sample_step(rerank_width)
            sizes.update(rr_scores=(rerank_width, 0, f32),
                         rr_sample=(triton.cdiv(rerank_width, step) if step > 1 else 0, 0, f32))
            ws["rr_topk"] = (self.k, rerank_width)
        per_row = sum(n * torch.empty(0, dtype=dt).element_size() for n, _, dt in sizes.values())
        per_row += sum(word * TopkWorkspace.numel(1, kk, w) for kk, w in ws.values()) + 3 * word
        self.row_bytes = per_row       # workspace per query of a chunk
        self.chunk_rows = rows = max(1, min(self.max_queries, _budget(self.workspace_bytes, self.device) // per_row))
        dev = self.device
        self._flat["out"] = torch.empty(self.max_queries * self.k, dtype=i32, device=dev)
        for name, (n, extra, dt) in sizes.items():
            # heads zeroed: whatever the router writes (or leaves), every entry is a head id
            self._flat[name] = (torch.zeros if name == "heads" else torch.empty)(rows * n + extra, dtype=dt, device=dev)
        self._ranges = torch.empty(2, self.max_queries, dtype=i32, device=dev)
        self._workspaces = {name: TopkWorkspace(rows, kk, w, dev) for name, (kk, w) in ws.items()}
        self.zeros = torch.zeros(rows, dtype=i32, device=dev)
        if rerank_width:
            self.rerank_width = torch.full((rows,), rerank_width, dtype=i32, device=dev)
        self.all_heads = None
        if self.routed and self.active_heads == self.num_heads:       # nothing to route
            self.all_heads = torch.arange(self.num_heads, dtype=i32, device=dev).expand(
                self.max_queries, self.num_heads).contiguous()

    def _view(self, name: str, *shape: int) -> torch.Tensor:
        n = 1
        for x in shape:
            n *= x
        return self._flat[name][:n].view(*shape)

    @property
    def nbytes(self) -> int:
        """Device memory this selector holds (plans' few bytes aside)."""
        tensors = [*self._flat.values(), *(w.flat for w in self._workspaces.values()), self.zeros, self._ranges,
                   getattr(self, "rerank_width", None), self.all_heads]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -----------------------------------------------------------------------------------------
    # plans

    def plan(self, num_queries: int, num_keys: int) -> SimpleNamespace:
        """The views and launch settings for ``num_queries`` x ``num_keys`` (made on first use)."""
        key = (num_queries, num_keys)
        p = self._plans.get(key)
        if p is None:
            check_int("num_queries", num_queries, 0, self.max_queries)
            check_int("num_keys", num_keys, 0, self.max_keys)
            p = self._plans[key] = self._make_plan(num_queries, num_keys)
        return p

    def _make_plan(self, t: int, s: int) -> SimpleNamespace:
        from .ops.dsa.triton import SampleBuffers, cut_step, sampled_keys
        from .ops.rescore.triton import RerankBuffers
        from .ops.topk.triton import sample_step
        p = SimpleNamespace(out=self._view("out", t, self.k), chunks=[])
        rows = self.chunk_rows
        if self.variant == "hisa":
            nb = triton.cdiv(s, self.hisa_block_size)
            width = max(nb, 1)
            p.kbar32, p.kbar16 = self._view("kbar32", nb, self.head_dim), self._view("kbar16", nb, self.head_dim)
            rerank_width = self.kept * self.hisa_block_size
        else:
            width = logits_width(s)
            step = cut_step(width, self.active_heads if self.routed else self.num_heads)
            if step:     # the sample's every-key range: one per plan, as its key count depends on s
                p.sample_ends = torch.full((rows,), sampled_keys(s, 0, width, step), dtype=torch.int32,
                                           device=self.device)
            if self.routed and self.all_heads is None:
                p.heads = self._view("heads", t, self.active_heads)
                p.kbar = self._view("kbar", triton.cdiv(s, self.block_size), self.head_dim)
            rerank_width = self.stage1_k
        for t0 in range(0, t, rows):
            r = min(t, t0 + rows) - t0
            c = SimpleNamespace(rows=slice(t0, t0 + r))
            if self.variant == "hisa":
                c.bks, c.bke = self._view("bks", r), self._view("bke", r)
                c.scores = self._view("scores", r, width)
                c.blocks = self._view("blocks", r, self.kept)
                c.block_topk = self._workspaces["block_topk"].buffers(r, width)
                c.cand = self._view("cand", r, rerank_width)
            else:
                c.logits = self._view("logits", r, width)
                c.topk = self._workspaces["topk"].buffers(r, width)
                c.sample = None
                if step:
                    n = triton.cdiv(width, step)
                    c.sample = SampleBuffers(self._view("sample", r, n), self._view("sample_scales", n),
                                             self.zeros[:r], p.sample_ends[:r])
                if self.stage1_k:
                    c.stage1 = self._view("stage1", r, self.stage1_k)
            if rerank_width:
                rr_step = sample_step(rerank_width)
                c.rerank = RerankBuffers(self._view("rr_scores", r, rerank_width),
                                         self._view("rr_sample", r, triton.cdiv(rerank_width, rr_step))
                                         if rr_step > 1 else None,
                                         self.zeros[:r], self.rerank_width[:r],
                                         self._workspaces["rr_topk"].buffers(r, rerank_width))
            p.chunks.append(c)
        return p

    # -----------------------------------------------------------------------------------------
    # calls

    def _inputs(self, q, kv, weights, ks, ke) -> Inputs:
        """Host-side checks of shapes only (nothing read from the device)."""
        k, k_scale = kv if isinstance(kv, (tuple, list)) else (kv, None)
        k_name = "kv[0] (k_fp8)" if k_scale is not None else "kv"
        if q.dim() != 3 or tuple(q.shape[1:]) != (self.num_heads, self.head_dim):
            raise ValueError(f"q: expected [T, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        if q.shape[0] > self.max_queries:
            raise ValueError(f"q: {q.shape[0]} queries exceed max_queries ({self.max_queries})")
        if k.dim() != 2 or k.shape[0] > self.max_keys:
            raise ValueError(f"{k_name}: {tuple(k.shape)}: more keys than max_keys ({self.max_keys})")
        for name, x in (("q", q), (k_name, k), ("kv[1] (k_scale)", k_scale), ("weights", weights), ("ks", ks),
                        ("ke", ke)):
            if x is not None and not x.is_contiguous():
                raise ValueError(f"{name}: the selector takes contiguous tensors")
        return Inputs(q, k, k_scale, weights, ks, ke)

    def check(self, q, kv, weights, ks, ke) -> None:
        """Validate inputs as the checked ``misa.*_select`` functions do (one device read), and that
        they fit this selector: shapes within its maxima, dtypes the kernels take, its device."""
        from .select import KERNEL_DTYPES
        from .validate import check_inputs
        inp = check_inputs(q, kv, weights, ks, ke)
        self._inputs(q, kv, weights, ks, ke)
        for name, x in (("q", inp.q), ("kv", inp.k)):
            if x.dtype not in KERNEL_DTYPES:
                raise ValueError(f"{name}: the kernels take float8_e4m3fn and bfloat16, got {x.dtype}")
        if q.device != self.device:
            raise ValueError(f"q: on {q.device}, the selector on {self.device}")

    def __call__(self, q, kv, weights, ks, ke) -> torch.Tensor:
        """``[T, k]`` int32 absolute key positions, -1 padded (as ``misa.dsa_select`` and the
        others): a buffer of this selector, overwritten by the next call at the same shape."""
        return self._select(self._inputs(q, kv, weights, ks, ke))

    def _select(self, inp: Inputs, heads: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The pipeline on unchecked, contiguous inputs; ``heads``: routed heads computed elsewhere
        (a router statistic without a kernel) instead of the selector's router; ``out``: a ``[T, k]``
        int32 tensor written instead of the selector's buffer."""
        p = self.plan(inp.num_queries, inp.num_keys)
        out = p.out if out is None else out
        if p.chunks:
            if self.variant == "hisa":
                self._hisa(inp, p, out)
            else:
                self._scored(inp, p, heads, out)
        return out

    def _clamped_ranges(self, inp: Inputs) -> Inputs:
        """``inp`` with ``ks``, ``ke`` clamped into ``0 <= ks <= ke <= S`` (copies in this selector):
        valid ranges are unchanged, and the kernels stay in bounds on inputs not validated yet."""
        t, s = inp.num_queries, inp.num_keys
        ks, ke = self._ranges[0, :t], self._ranges[1, :t]
        torch.clamp(inp.ks, 0, s, out=ks)
        torch.clamp(inp.ke, max=s, out=ke)
        torch.maximum(ke, ks, out=ke)
        return replace(inp, ks=ks, ke=ke)

    def _scored(self, inp: Inputs, p, heads, out) -> None:
        """DSA / MISA / MISA-dagger: per chunk, the (routed) logits of every key into the chunk's
        rows, the top-k's sample beside them, the top-k (MISA-dagger: of ``stage1_k``, re-scored with
        all heads and cut to ``k``)."""
        from .ops.dsa import triton as dsa_t
        from .ops.rescore import triton as rescore_t
        from .ops.ties import triton as ties_t
        from .ops.topk import triton as topk_t
        if self.routed and heads is None:
            if self.all_heads is not None:
                heads = self.all_heads[:inp.num_queries]
            else:
                from .ops.router import triton as router_t
                heads = router_t.route_heads(inp, self.active_heads, self.block_size, router=self.router,
                                             out=p.heads, kbar=p.kbar)
        for c in p.chunks:
            q, w, ks, ke = inp.q[c.rows], inp.weights[c.rows], inp.ks[c.rows], inp.ke[c.rows]
            chunk_heads = heads[c.rows] if heads is not None else None
            dsa_t.launch_logits(q, w, inp.k, inp.k_scale, ks, ke, c.logits, 0, heads=chunk_heads)
            # the top-k's cut samples every step-th column: computed from the keys (routed heads), it
            # costs ~1/step of the logits instead of thousands of scattered sector reads per row
            sample = dsa_t.cut_sample(q, w, inp.k, inp.k_scale, 0, c.logits.shape[1], heads=chunk_heads,
                                      buffers=c.sample)
            if self.stage1_k:
                cand = topk_t.topk(c.logits, ks, ke, self.stage1_k, sample=sample, out=c.stage1, buffers=c.topk)
                rescore_t.rerank(inp, cand, self.k, c.rows, out=out[c.rows], buffers=c.rerank)
            else:
                ties = self.logits_dtype != torch.float32
                topk_t.topk(c.logits, ks, ke, self.k, sample=sample, out=out[c.rows], buffers=c.topk,
                            record_ties=ties)
                if ties:
                    # the keys tied at the k-th bfloat16 value, ranked by their float32 scores
                    ties_t.break_ties(q, w, inp.k, inp.k_scale, out[c.rows], c.topk.ties, heads=chunk_heads)

    def _hisa(self, inp: Inputs, p, out) -> None:
        """HISA: pooled-block scores with all heads (the dense logits kernel on the bf16 mean keys),
        the first and last visible block forced in, the top blocks, then the exact DSA scores of
        their tokens (the gathered re-scoring) and their top-k."""
        from .ops.blocks import triton as blocks_t
        from .ops.dsa import triton as dsa_t
        from .ops.rescore import triton as rescore_t
        from .ops.router import triton as router_t
        from .ops.topk import triton as topk_t
        bs = self.hisa_block_size
        router_t.pool_keys(inp.k, inp.k_scale, bs, out=p.kbar32)
        p.kbar16.copy_(p.kbar32)
        for c in p.chunks:
            ks, ke = inp.ks[c.rows], inp.ke[c.rows]
            blocks_t.prefill_block_ranges(ks, ke, bs, c.bks, c.bke)
            dsa_t.launch_logits(inp.q[c.rows], inp.weights[c.rows], p.kbar16, None, c.bks, c.bke, c.scores)
            blocks_t.force_edge_blocks(c.scores, c.bks, c.bke)
            blocks = topk_t.topk(c.scores, c.bks, c.bke, self.kept, out=c.blocks, buffers=c.block_topk)
            blocks_t.block_positions(blocks, bs, c.cand)
            rescore_t.rerank(inp, c.cand, self.k, c.rows, out=out[c.rows], buffers=c.rerank)


# ---------------------------------------------------------------------------------------------
# The checked functions' selectors

_SELECTORS: dict = {}
MAX_CACHED = 4                      # selectors kept for the checked functions
MAX_CACHED_BYTES = 8 << 30          # and the device memory they may hold together


def cached_selector(variant: str, inp: Inputs, k: int, workspace_bytes: int | None, **options) -> PrefillSelector:
    """The ``PrefillSelector`` for this call's shapes, made once and kept (the 4 made last, holding
    at most 8 GiB together, the newest always kept): the checked functions then allocate no
    buffers and set up no launches per call."""
    t, h, d = inp.q.shape
    key = (variant, t, inp.num_keys, h, d, k, inp.q.device, workspace_bytes, tuple(sorted(options.items())))
    sel = _SELECTORS.pop(key, None)
    if sel is None:
        while len(_SELECTORS) >= MAX_CACHED:
            _SELECTORS.pop(next(iter(_SELECTORS)))
        sel = PrefillSelector(variant, num_heads=h, head_dim=d, k=k, max_queries=max(t, 1),
                              max_keys=max(inp.num_keys, 1), device=inp.q.device, workspace_bytes=workspace_bytes,
                              **options)
        while _SELECTORS and sum(s.nbytes for s in _SELECTORS.values()) + sel.nbytes > MAX_CACHED_BYTES:
            _SELECTORS.pop(next(iter(_SELECTORS)))
    _SELECTORS[key] = sel            # most recently used last
    return sel


def clear_cached_selectors() -> None:
    """Drop the checked functions' selectors (and their device memory)."""
    _SELECTORS.clear()
