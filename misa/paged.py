"""Decode: the same selectors over the paged index-K cache (SPEC section 1, DeepGEMM's layout).

``q [B, next_n, H, D]``; ``weights [B * next_n, H]`` float32; ``context_lens [B]`` int32 (tokens in
the cache for each sequence, the ``next_n`` new ones included); ``block_table [B, max_pages]`` int32.
Query ``i`` of sequence ``b`` sees keys ``[0, context_lens[b] - next_n + i + 1)`` (multi-token
prediction puts several new tokens in one step). Indices are positions inside the sequence.
Outputs have ``B * next_n`` rows, sequence-major.

The cache is DeepGEMM's ``[num_pages, 64, 1, D + 4]`` uint8 layout (``misa.new_paged_kcache``).
``backend`` is as for the prefill functions (``misa.api``). On the kernels, DSA's, MISA's and
MISA-dagger's logits and selections run batched: MISA's router pools and routes the
whole batch in two launches (``misa/ops/router/triton.py``), one launch scores it reading the
pages in place (``misa/ops/dsa/paged_triton.py``) and one top-k launch selects. MISA-dagger adds
a top-``stage1_k`` launch, one re-scoring launch over those candidates with all heads
(``misa/ops/rescore/triton.py``, keys read through the block table) and the final top-k. DSA,
MISA, MISA-dagger and HISA run through a cached ``misa.DecodeSelector`` (MISA's and MISA-dagger's
options permitting: power-of-two routed heads fewer than all, blocks of whole pages), which a
repeated call replays as a CUDA graph (``misa.graphs``) that checks its own inputs: from the third
call at a layout, one replay and one wait for the check flags, no read-back before the launches. The reference backend and
router statistics without a kernel take the per-sequence path: each sequence's pages are gathered
into contiguous keys and the prefill path runs sequence by sequence.
"""
from __future__ import annotations

import os

import torch

from . import graphs, quant, select
from .api import check_router, check_workspace
from .ops import power_of_two
from .ops.rescore import MAX_RESCORE_HEADS
from .ops.router.reference import DEFAULT_ROUTER
from .validate import (Inputs, check_hisa_budget, check_int, check_stage1_k, check_tensor, raise_first,
                       value_checks, Q_DTYPES)


def _check_paged_shapes(q, kv_cache, weights, context_lens, block_table) -> None:
    """Raise on inputs of the wrong kind, shape or device (no read of the values)."""
    check_tensor("q", q, 4, Q_DTYPES)
    b, n, h, d = q.shape
    cache_dim = quant.paged_head_dim(kv_cache)
    if cache_dim != d:
        raise ValueError(f"kv_cache: head dim {cache_dim} does not match q's {d}")
    check_tensor("weights", weights, 2, (torch.float32,))
    if tuple(weights.shape) != (b * n, h):
        raise ValueError(f"weights: expected shape {(b * n, h)}, got {tuple(weights.shape)}")
    check_tensor("context_lens", context_lens, 1, (torch.int32,))
    if context_lens.shape[0] != b:
        raise ValueError(f"context_lens: expected [{b}], got {tuple(context_lens.shape)}")
    check_tensor("block_table", block_table, 2, (torch.int32,))
    if block_table.shape[0] != b:
        raise ValueError(f"block_table: expected {b} rows, got {block_table.shape[0]}")
    for name, x in (("kv_cache", kv_cache), ("weights", weights), ("context_lens", context_lens),
                    ("block_table", block_table)):
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q on {q.device}")


def _raise_paged_flags(bad, next_n: int) -> None:
    """The ``ValueError`` of the first failed value check (``misa.ops.checks.PAGED_FLAGS`` order)."""
    raise_first(bad, (("q", "contains NaN or infinite values"), ("weights", "contains NaN or infinite values"),
                      ("context_lens", f"every sequence must hold at least next_n ({next_n}) tokens"),
                      ("block_table", "too few columns for the longest context"),
                      # the batched kernels read pages through the table unchecked: a stray id must fail here
                      ("block_table", "page id outside the cache")))


def _check_paged_values(q, kv_cache, weights, context_lens, block_table) -> int:
    """Raise on bad values of inputs whose shapes passed; return the longest context. The value
    checks (``misa.ops.checks``: one launch on a GPU) and that length are read back together, one
    GPU sync for all of them."""
    *bad, longest = value_checks("paged_flags", q, weights, context_lens, block_table, kv_cache.shape[0],
                                 quant.PAGE_SIZE)
    _raise_paged_flags(bad, q.shape[1])
    return longest


def _check_paged(q, kv_cache, weights, context_lens, block_table) -> int:
    """Raise on bad input; return the longest context (one GPU sync)."""
    _check_paged_shapes(q, kv_cache, weights, context_lens, block_table)
    return _check_paged_values(q, kv_cache, weights, context_lens, block_table)


def _visible_ends(context_lens, n: int) -> torch.Tensor:
    """``[B * n]`` int32: query ``i`` of sequence ``b`` sees ``[0, context_lens[b] - n + i + 1)``."""
    ends = context_lens[:, None] - n + 1 + torch.arange(n, device=context_lens.device)
    return ends.reshape(-1).to(torch.int32)


def _sequences(q, kv_cache, weights, context_lens, block_table):
    """Yield ``(rows, Inputs)`` per sequence: its queries against its keys read from the cache."""
    b, n = q.shape[:2]
    ends = _visible_ends(context_lens, n)
    for i, length in enumerate(context_lens.tolist()):
        k_fp8, k_scale = quant.read_paged_kcache(kv_cache, block_table[i], length)
        rows = slice(i * n, (i + 1) * n)
        ke = ends[rows]
        yield rows, Inputs(q[i], k_fp8, k_scale, weights[rows], torch.zeros_like(ke), ke)


def _batched(q, backend) -> bool:
    """The batched paged kernels (the paged kernel pads the heads, not the head dimension)."""
    check_tensor("q", q, 4, Q_DTYPES)
    return select.use_kernels(select.check_backend_arg(backend), q, (q.dtype,), power_of_two(q.shape[3]),
                              f"head dim {q.shape[3]} must be a power of two")


def _batched_select(q, kv_cache, weights, context_lens, block_table, k, longest: int, heads=None):
    """One scoring launch over the pages in place, one top-k launch, for the whole batch
    (``longest``: the longest context, as ``_check_paged`` returns it)."""
    from .ops.dsa.paged_triton import paged_logits
    from .ops.topk.triton import topk
    b, n = q.shape[:2]
    width = max(longest, 1)
    buf = torch.empty(b * n, width, dtype=torch.float32, device=q.device)
    paged_logits(q, kv_cache, weights, context_lens, block_table, buf, heads=heads)
    ke = _visible_ends(context_lens, n)
    return topk(buf, torch.zeros_like(ke), ke, k)


def paged_dsa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len: int | None = None,
                     *, backend: str | None = None) -> torch.Tensor:
    """DSA logits of every cached position: ``[B * next_n, max_context_len]`` float32 (default
    width: the longest context), -inf beyond each query's visible range."""
    longest = _check_paged(q, kv_cache, weights, context_lens, block_table)
    width = longest if max_context_len is None else check_int("max_context_len", max_context_len, longest)
    out = torch.full((q.shape[0] * q.shape[1], width), float("-inf"), device=q.device)
    if _batched(q, backend):
        from .ops.dsa.paged_triton import paged_logits
        return paged_logits(q, kv_cache, weights, context_lens, block_table, out)
    for rows, inp in _sequences(q, kv_cache, weights, context_lens, block_table):
        out[rows, : inp.num_keys] = select.dsa_logits(inp, backend=backend)
    return out


def _paged_select(fn, q, kv_cache, weights, context_lens, block_table, k):
    _check_paged(q, kv_cache, weights, context_lens, block_table)
    out = torch.empty(q.shape[0] * q.shape[1], k, dtype=torch.int32, device=q.device)
    for rows, inp in _sequences(q, kv_cache, weights, context_lens, block_table):
        out[rows] = fn(inp)
    return out


def paged_dsa_select(q, kv_cache, weights, context_lens, block_table, k: int = 2048, *,
                     backend: str | None = None) -> torch.Tensor:
    """DSA's decode selection: the top ``k`` (default 2048) cached positions per query,
    ``[B * next_n, k]`` int32 positions inside each sequence, -1 padded."""
    check_int("k", k)
    call = ("dsa", k, backend)
    out = _replay_seen(call, q, kv_cache, weights, context_lens, block_table)
    if out is not None:
        return out
    if _batched(q, backend):
        return _select_checked("dsa", {}, q, kv_cache, weights, context_lens, block_table, k, call=call)
    return _paged_select(lambda inp: select.dsa_select(inp, k, backend=backend), q, kv_cache, weights,
                         context_lens, block_table, k)


def _check_pooled_blocks(pooled, kv_cache, block_size: int):
    if pooled is not None:
        check_pooled(pooled, kv_cache)
        if block_size % quant.PAGE_SIZE:
            raise ValueError(f"block_size: with pooled, a multiple of the page size ({quant.PAGE_SIZE}), got {block_size}")


def paged_route_heads(q, kv_cache, weights, context_lens, block_table, active_heads: int = 8,
                      block_size: int = 1024, *, router: str = DEFAULT_ROUTER, pooled: torch.Tensor | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """MISA's router over the cache: ``[B * next_n, active_heads]`` int32 head ids, ascending.
    ``active_heads`` (default 8), ``block_size`` (default 1024) and ``router`` as for
    ``misa.route_heads``; blocks are cut from each sequence's own positions. With ``pooled`` (the
    pooled-key cache; ``block_size`` a multiple of 64) the blocks come from its page sums instead
    of a pass over the cache; the routing is the same up to float rounding."""
    check_tensor("q", q, 4, Q_DTYPES)
    check_int("active_heads", active_heads, 1, q.shape[2])
    check_int("block_size", block_size)
    check_router(router)
    _check_pooled_blocks(pooled, kv_cache, block_size)
    longest = _check_paged(q, kv_cache, weights, context_lens, block_table) if _batched(q, backend) else None
    return _route(q, kv_cache, weights, context_lens, block_table, active_heads, block_size, router, longest,
                  backend, pooled)


def _route(q, kv_cache, weights, context_lens, block_table, active_heads, block_size, router, longest, backend,
           pooled=None):
    """MISA's routing, batched in two launches when ``longest`` is given (inputs checked, batched
    path on) and the router kernel has the statistic; sequence by sequence otherwise."""
    if longest is not None:
        from .ops.router import triton as router_triton
        if router_triton.batched_router_ok(q.shape[2], router):
            return router_triton.paged_route_heads_batched(q, kv_cache, weights, context_lens, block_table,
                                                           active_heads, block_size, router, longest=longest,
                                                           pooled=pooled)
    return _paged_select(lambda inp: select.route_heads(inp, active_heads, block_size, router, backend=backend),
                         q, kv_cache, weights, context_lens, block_table, active_heads)


def paged_misa_select(q, kv_cache, weights, context_lens, block_table, k: int = 2048,
                      active_heads: int = 8, block_size: int = 1024, stage1_k: int | None = None, *,
                      router: str = DEFAULT_ROUTER, workspace_bytes: int | None = None,
                      pooled: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """MISA (or MISA† with ``stage1_k``) over the cache: ``[B * next_n, k]`` int32 positions inside
    each sequence, -1 padded. Arguments as for ``misa.misa_select``; ``pooled`` as for
    ``paged_route_heads``. On the kernels the router's blocks come from the pooled-key cache, built
    from the cache for this call when ``pooled`` is None, so selections with and without it agree.
    MISA†'s first stage ranks float32 logits here (``misa_select`` stores bfloat16 by default)."""
    check_int("k", k)
    check_tensor("q", q, 4, Q_DTYPES)
    check_int("active_heads", active_heads, 1, q.shape[2])
    check_int("block_size", block_size)
    stage1_k = check_stage1_k(stage1_k, k)
    check_router(router)
    check_workspace(workspace_bytes)
    call = ("misa", k, active_heads, block_size, stage1_k, router, workspace_bytes, backend)
    out = _replay_seen(call, q, kv_cache, weights, context_lens, block_table, pooled)
    if out is not None:
        return out
    _check_pooled_blocks(pooled, kv_cache, block_size)
    if _batched(q, backend) and (stage1_k is None or q.shape[2] <= MAX_RESCORE_HEADS):
        if q.shape[0] and _routed_selector_ok(q.shape[2], active_heads, block_size, router):
            # without the pooled-key cache the selector call builds one from the cache (one launch),
            # so selections with and without it are the same
            variant, extra = ("misa-dagger", dict(stage1_k=stage1_k)) if stage1_k is not None else ("misa", {})
            return _select_checked(variant, dict(active_heads=active_heads, router_block_size=block_size,
                                                 router=router, **extra),
                                   q, kv_cache, weights, context_lens, block_table, k, pooled, call=call)
        longest = _check_paged(q, kv_cache, weights, context_lens, block_table)
        if stage1_k is not None and q.shape[0] == 0:
            return torch.empty(0, k, dtype=torch.int32, device=q.device)
        heads = _route(q, kv_cache, weights, context_lens, block_table, active_heads, block_size, router, longest,
                       backend, pooled)
        if stage1_k is None:
            return _batched_select(q, kv_cache, weights, context_lens, block_table, k, longest, heads=heads)
        # MISA-dagger with options the selector does not take (every head, a non-power-of-two
        # head count, a block not a multiple of the page): the same stages, allocated per call
        from .ops.rescore.triton import paged_rescore
        from .ops.topk.triton import topk
        cand = _batched_select(q, kv_cache, weights, context_lens, block_table, stage1_k, longest, heads=heads)
        scores = paged_rescore(q, kv_cache, weights, context_lens, block_table, cand,
                               torch.empty(cand.shape, dtype=torch.float32, device=q.device))
        zeros = torch.zeros(cand.shape[0], dtype=torch.int32, device=q.device)
        return topk(scores, zeros, torch.full_like(zeros, cand.shape[1]), k, cmap=cand, finite_only=True)
    # decode's first stage keeps float32 logits (the kernels' too): its rows are few, and the time
    # goes into reading the cache, not the logits
    return _paged_select(lambda inp: select.misa_select(inp, k, active_heads, block_size, stage1_k, router,
                                                        workspace_bytes, backend=backend,
                                                        logits_dtype=torch.float32),
                         q, kv_cache, weights, context_lens, block_table, k)


def _routed_selector_ok(num_heads: int, active_heads: int, block_size: int, router: str) -> bool:
    """Whether the ``"misa"`` and ``"misa-dagger"`` ``DecodeSelector`` take these options."""
    from .ops.router.triton import STATISTICS
    return (active_heads < num_heads and power_of_two(active_heads) and block_size % quant.PAGE_SIZE == 0
            and router in STATISTICS)


_SELECTORS: dict = {}


def _selector_key(variant: str, q, k: int, block_table, options: dict):
    b, n, h, d = q.shape
    return (variant, b, n, h, d, k, block_table.shape[1], q.device, tuple(sorted(options.items())))


def _selector(variant: str, q, k: int, block_table, **options):
    """The ``DecodeSelector`` for these shapes, made once and kept (the ``graphs.KEPT`` made last; each
    holds its buffers, e.g. ~40 MB of logits and top-k scratch for 64 x 128K, and its graphs): the
    checked functions then allocate no buffers and set up no launches per call."""
    from .decode import DecodeSelector
    b, n, h, d = q.shape
    key = _selector_key(variant, q, k, block_table, options)
    sel = _SELECTORS.get(key)
    if sel is None:
        sel = graphs.keep(_SELECTORS, key, DecodeSelector(variant, num_heads=h, head_dim=d, k=k, max_batch=b,
                                                          next_n=n,
                                                          max_context=max(block_table.shape[1], 1) * quant.PAGE_SIZE,
                                                          device=q.device, **options))
        for sig in [sig for sig, (sel_key, _) in _REPLAYS.items() if sel_key not in _SELECTORS]:
            del _REPLAYS[sig]       # a dropped selector's graphs go with it
    return sel


def _pooled_for(sel, pooled, kv_cache, block_table, context_lens):
    """``pooled``, or for a selector that reads one when none is given, one built from the cache
    (one launch, no loop over sequences)."""
    if pooled is None and sel.variant != "dsa":
        from .ops.pool.triton import pool_paged_kcache
        return pool_paged_kcache(kv_cache, block_table, context_lens)
    return pooled


def _graph(sel, q, kv_cache, weights, context_lens, block_table, pooled) -> graphs.Graph:
    """The selector's call in a CUDA graph reading copies of ``q``, ``weights``, ``context_lens``
    and ``block_table`` (one copy launch and one replay of host work per call), and the cache and the
    pooled-key cache in place: calls find it by those caches' addresses. Without a pooled-key cache,
    building one from the cache is part of the graph.

    The graph checks its inputs first (``graph.checks``: the flags, their pinned host copy and an
    event after that copy): the check launch also clamps the copied lengths and page ids into the
    cache (``misa.ops.checks``, ``sanitize``), so the selection it runs on bad input reads only the
    cache, and a call waits for the flags alone instead of a read-back before its launches.

    The selector's graphs over other caches (a model's layers) share these input buffers and flags:
    a call copies its values in, replays and waits on one stream, so a graph per layer holds no
    buffers of its own (bar the pooled-key cache it builds where a call passes none)."""
    from .ops.checks.triton import paged_flags
    clamp = kv_cache.shape[0] >= 1 and block_table.shape[1] * quant.PAGE_SIZE >= q.shape[1]   # clamping possible
    shared = sel.__dict__.setdefault("graph_inputs", {})
    layout = (tuple(graphs.layout(x) for x in (q, weights, context_lens, block_table)), clamp)
    if layout not in shared:
        inputs = [x.clone(memory_format=torch.contiguous_format) for x in (q, weights, context_lens, block_table)]
        checks = None
        if clamp:
            from .ops.checks import PAGED_FLAGS
            flags = torch.zeros(len(PAGED_FLAGS) + 1, dtype=torch.int64, device=q.device)
            checks = (flags, torch.zeros(flags.shape, dtype=torch.int64, pin_memory=True),
                      torch.cuda.Event(external=True))
        graphs.keep(shared, layout, (inputs, checks))
    inputs, checks = shared[layout]
    sq, sw, sl, st = inputs

    def run():
        if checks is not None:
            paged_flags(sq, sw, sl, st, kv_cache.shape[0], quant.PAGE_SIZE, out=checks[0], sanitize=True)
            checks[1].copy_(checks[0], non_blocking=True)
            checks[2].record()
        return sel(sq, kv_cache, sw, sl, st, _pooled_for(sel, pooled, kv_cache, st, sl))

    graph = graphs.Graph(run, inputs)
    graph.checks = checks
    return graph


def _graph_key(q, kv_cache, weights, context_lens, block_table, pooled):
    return (graphs.layout(q), graphs.layout(kv_cache, True), graphs.layout(weights), graphs.layout(context_lens),
            graphs.layout(block_table), graphs.layout(pooled, True))


def _replay_checked(sel, q, kv_cache, weights, context_lens, block_table, pooled=None):
    """A checked function's whole call as one replay of ``sel``'s graph for these layouts, checks
    included (``_replay``), and that graph's key; None where there is no such graph yet (the
    first two calls at a layout, graphs off): the caller checks and runs as ``_run``."""
    if not graphs.enabled(q):
        return None
    key = _graph_key(q, kv_cache, weights, context_lens, block_table, pooled)
    graph = graphs.made(sel, key)
    if graph is None or graph.checks is None:
        return None
    return _replay(graph, q, weights, context_lens, block_table), key


def _replay(graph, q, weights, context_lens, block_table) -> torch.Tensor:
    """The inputs copied in, the replay, a copy of the result, one wait for the flags, then the
    error of the first failed check or the result."""
    out = graph.replay(q, weights, context_lens, block_table).clone()
    graph.checks[2].synchronize()
    *bad, _ = graph.checks[1].tolist()
    _raise_paged_flags(bad, q.shape[1])
    return out


# A checked call's signature -> (selector key, graph key) of the graph that served it. A call with
# the same signature would pass the same shape checks and find the same selector and graph, so it
# goes straight to ``_replay``: its host work is the copies, the replay and the wait.
_REPLAYS: dict = {}


def _signature(call, q, kv_cache, weights, context_lens, block_table, pooled):
    """What a checked call's shape checks, backend choice, selector and graph depend on (``call``:
    the function and its other arguments): the graph's key, the tensors' devices and the
    environment's overrides; None for arguments that are not tensors."""
    try:
        return (call, os.environ.get("MISA_BACKEND"), os.environ.get("MISA_GRAPHS"),
                _graph_key(q, kv_cache, weights, context_lens, block_table, pooled),
                q.device, kv_cache.device, weights.device, context_lens.device, block_table.device,
                None if pooled is None else pooled.device)
    except AttributeError:      # not tensors: the full checks name the argument
        return None


def _replay_seen(call, q, kv_cache, weights, context_lens, block_table, pooled=None) -> torch.Tensor | None:
    """The checked selection of a call whose signature an earlier call's replay served, by the same
    replay (its checks included); None otherwise."""
    if not _REPLAYS:
        return None
    hit = _REPLAYS.get(_signature(call, q, kv_cache, weights, context_lens, block_table, pooled))
    if hit is None or torch.cuda.is_current_stream_capturing():
        return None
    sel = _SELECTORS.get(hit[0])
    graph = graphs.made(sel, hit[1]) if sel is not None else None
    if graph is None:
        return None
    return _replay(graph, q, weights, context_lens, block_table)


def _run(sel, q, kv_cache, weights, context_lens, block_table, pooled=None) -> torch.Tensor:
    """A checked function's selection through the cached selector ``sel``, inputs checked: a fresh
    ``[B * next_n, k]`` tensor. On CUDA a call that repeats an earlier one's shapes and cache
    addresses replays a CUDA graph (``misa.graphs``); the first runs the selector as is (a one-off
    call pays no capture)."""
    if graphs.enabled(q):
        key = _graph_key(q, kv_cache, weights, context_lens, block_table, pooled)
        graph = graphs.lookup(sel, key, lambda: _graph(sel, q, kv_cache, weights, context_lens, block_table, pooled))
        if graph is not None:
            return graph.replay(q, weights, context_lens, block_table).clone()
    return sel(q, kv_cache, weights, context_lens, block_table,
               _pooled_for(sel, pooled, kv_cache, block_table, context_lens)).clone()


def _select_checked(variant: str, options: dict, q, kv_cache, weights, context_lens, block_table, k: int,
                    pooled=None, *, call=None):
    """The checked selection through the cached ``DecodeSelector`` of ``variant`` and ``options``
    (``_selector``'s): a replay that checks its own inputs where one exists (kept for the public
    call ``call``'s signature, ``_replay_seen``), else the checks with their read-back, then ``_run``."""
    _check_paged_shapes(q, kv_cache, weights, context_lens, block_table)
    if q.shape[0]:
        sel = _selector(variant, q, k, block_table, **options)
        replayed = _replay_checked(sel, q, kv_cache, weights, context_lens, block_table, pooled)
        if replayed is not None:
            out, graph_key = replayed
            if call is not None:
                graphs.keep(_REPLAYS, _signature(call, q, kv_cache, weights, context_lens, block_table, pooled),
                            (_selector_key(variant, q, k, block_table, options), graph_key),
                            graphs.KEPT * graphs.GRAPHS_KEPT)
            return out
    _check_paged_values(q, kv_cache, weights, context_lens, block_table)
    if q.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.int32, device=q.device)
    return _run(sel, q, kv_cache, weights, context_lens, block_table, pooled)


def check_pooled(pooled, kv_cache) -> torch.Tensor:
    """The pooled-key cache: bfloat16 or float32 ``[num_pages, D]`` beside ``kv_cache``."""
    quant.check_pooled(pooled, kv_cache.shape[0], quant.paged_head_dim(kv_cache), kv_cache.device)
    return pooled


def paged_hisa_select(q, kv_cache, weights, context_lens, block_table, k: int = 2048,
                      block_size: int = 128, block_k: int = 64, *, pooled: torch.Tensor | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """HISA over the cache: ``[B * next_n, k]`` int32 positions inside each sequence, -1 padded.
    Arguments as for ``misa.hisa_select`` (``block_k * block_size >= k``).

    On the kernels, with ``block_size`` a multiple of the 64-token page, this is block-pruned decode
    for the whole batch: block means from the pooled-key cache ``pooled`` (``misa.new_pooled_kcache``
    kept by ``misa.write_paged_kcache``; built from the cache for this call when None) scored with
    all heads, the first, the last and the best ``block_k`` blocks kept and only their pages read.
    With ``pooled``, ``block_size`` must be a multiple of 64. Selections with and without
    ``pooled`` agree up to float rounding."""
    check_int("k", k)
    check_int("block_size", block_size)
    check_hisa_budget(k, block_size, block_k)
    call = ("hisa", k, block_size, block_k, backend)
    out = _replay_seen(call, q, kv_cache, weights, context_lens, block_table, pooled)
    if out is not None:
        return out
    _check_pooled_blocks(pooled, kv_cache, block_size)
    if block_size % quant.PAGE_SIZE == 0 and _batched(q, backend):
        return _select_checked("hisa", dict(block_size=block_size, block_k=block_k), q, kv_cache, weights,
                               context_lens, block_table, k, pooled, call=call)
    return _paged_select(lambda inp: select.hisa_select(inp, k, block_size, block_k, backend=backend),
                         q, kv_cache, weights, context_lens, block_table, k)
