"""Triton kernels for MISA's router: block mean-pooled keys, then per-query top-h heads.

The router is small (``H * L / B`` products per query against ``h * L`` for the routed scoring),
so what matters is doing it in one pass with no ``[T, H, NB]`` tensor in memory: each program
scores ``BQ`` queries x all heads against the visible pooled blocks, accumulates the statistic
and picks the heads in registers.

Statistics: ``abs-sum`` (the paper's) and ``gap`` (misa/ops/router/reference.py). ``gap`` needs
the block the all-head pooled DSA score ranks first; it is tracked online while the blocks stream
past (running best score, each head's score on it, each head's sum over all visible blocks), so
it is still one pass.

Decode (``paged_route_heads_batched``) routes a whole batch over the paged index-K cache in two
launches and no host loop: ``_paged_pool_keys_kernel`` pools each sequence's blocks reading its
pages in place through the block table, then ``_route_kernel`` routes every query, each program
taking queries of one sequence only (prefill is the special case of one sequence).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import quant
from .. import power_of_two
from ..triton_common import INTERPRET


@triton.jit(do_not_specialize=["S", "block_size"])
def _pool_keys_kernel(K, KSCALE, OUT, S, block_size, stride_k,
                      D: tl.constexpr, CHUNK: tl.constexpr, HAS_SCALE: tl.constexpr):
    b = tl.program_id(0)
    d = tl.arange(0, D)
    start = b * block_size
    end = tl.minimum(start + block_size, S)
    acc = tl.zeros([D], dtype=tl.float32)
    for r0 in range(start, end, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        m = rows < end
        k = tl.load(K + rows[:, None].to(tl.int64) * stride_k + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        if HAS_SCALE:
            k = k * tl.load(KSCALE + rows, mask=m, other=0.0)[:, None]
        acc += tl.sum(k, axis=0)
    tl.store(OUT + b * D + d, acc / (end - start).to(tl.float32))


class PoolConfig(NamedTuple):
    """A launch of the pooling kernel."""
    chunk: int = 256            # keys per step
    num_warps: int = 8


# One program per block streams its keys, so each step should keep many loads in flight: 0.016 ms
# against 0.028 for 64 keys and 4 warps (131072 keys, B = 1024, H200).
POOL_CONFIG = PoolConfig()


def pool_keys(k: torch.Tensor, k_scale: torch.Tensor | None, block_size: int, config=None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``kbar [ceil(S / B), D]`` float32: the mean dequantised key of each block (written into
    ``out``, a contiguous tensor of that shape, when given)."""
    s, d = k.shape
    nb = triton.cdiv(s, block_size)
    if out is None:
        out = torch.empty(nb, d, dtype=torch.float32, device=k.device)
    cfg = config or POOL_CONFIG
    if nb:
        _pool_keys_kernel[(nb,)](k, k_scale if k_scale is not None else out, out, s, block_size, k.stride(0),
                                 D=d, CHUNK=cfg.chunk, HAS_SCALE=k_scale is not None, num_warps=cfg.num_warps)
    return out


@triton.jit
def _per_pair(x, BQ: tl.constexpr, H: tl.constexpr):
    """``[BQ]`` per query -> ``[BQ * H]`` per (query, head) pair."""
    return tl.reshape(tl.broadcast_to(x[:, None], (BQ, H)), (BQ * H,))


@triton.jit(do_not_specialize=["block_size", "max_blocks"])
def _paged_pool_keys_kernel(VALUES, SCALES, TABLE, CTX, OUT, block_size, max_blocks, stride_table,
                            D: tl.constexpr, PAGE: tl.constexpr):
    # one program per (sequence, block), flattened so that neither count meets the 65535 limit of
    # grid axes 1 and 2; blocks past a sequence's length store zeros (kbar is then fully defined)
    pid = tl.program_id(0)
    seq = pid // max_blocks
    start = (pid - seq * max_blocks) * block_size
    end = tl.minimum(start + block_size, tl.load(CTX + seq))
    d = tl.arange(0, D)
    off = tl.arange(0, PAGE)
    page_bytes = PAGE * (D + 4)
    # summed over the token axis once at the end: a reduction per page (shared memory and a
    # barrier each) ran at 1.6 TB/s on an H200 against 3.7 for this, at B = 1024
    acc = tl.zeros([PAGE, D], dtype=tl.float32)
    # walk the pages the block overlaps: one table lookup per page, and any block size works (a
    # block of a multiple of PAGE tokens covers whole pages, a smaller one part of a page)
    for pg in range(start // PAGE, (end + PAGE - 1) // PAGE):
        page = tl.load(TABLE + seq.to(tl.int64) * stride_table + pg).to(tl.int64)
        pos = pg * PAGE + off
        real = (pos >= start) & (pos < end)     # unused slots of the last page hold garbage
        k = tl.load(VALUES + page * page_bytes + off[:, None] * D + d[None, :], mask=real[:, None],
                    other=0.0).to(tl.float32)
        scale = tl.load(SCALES + page * (page_bytes // 4) + (PAGE * D) // 4 + off, mask=real, other=0.0)
        acc += k * scale[:, None]
    count = tl.maximum(end - start, 1)
    tl.store(OUT + pid.to(tl.int64) * D + d, tl.sum(acc, axis=0) / count.to(tl.float32))


def paged_pool_keys(kv_cache: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                    block_size: int, max_blocks: int) -> torch.Tensor:
    """``kbar [B, max_blocks, D]`` float32: block ``j`` of sequence ``i`` is the mean dequantised key
    of its tokens ``[j * B, min((j + 1) * B, context_lens[i]))`` read from the paged cache; blocks
    past a sequence's length are zero. Inputs as ``misa.paged_*`` checks them."""
    d = quant.paged_head_dim(kv_cache)
    b = context_lens.shape[0]
    out = torch.empty(b, max_blocks, d, dtype=torch.float32, device=kv_cache.device)
    if b * max_blocks:
        flat = kv_cache.reshape(-1)
        _paged_pool_keys_kernel[(b * max_blocks,)](
            flat.view(quant.FP8), flat.view(torch.float32), block_table, context_lens, out, block_size,
            max_blocks, block_table.stride(0), D=d, PAGE=quant.PAGE_SIZE, num_warps=4)
    return out


# stride_kbar stays specialised: its divisibility keeps the pooled-key loads vectorised
@triton.jit(do_not_specialize=["per_seq", "tiles", "NB", "block_size"])
def _route_kernel(Q, W, KBAR, KS, KE, CTX, HEADS, per_seq, tiles, NB, block_size, stride_qt, stride_wt,
                  stride_kbar,
                  H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, NBT: tl.constexpr,
                  ACTIVE: tl.constexpr, PRECISION: tl.constexpr, GAP: tl.constexpr, DECODE: tl.constexpr):
    # Query rows are sequence-major, ``per_seq`` per sequence, each sequence with its own pooled
    # keys (``stride_kbar`` apart, ``NB`` blocks each); a program takes BQ queries of one sequence,
    # ``tiles`` programs per sequence (a flat grid: prefill is one sequence of T queries).
    pid = tl.program_id(0)
    if DECODE:
        seq = pid // tiles
        KBAR += seq.to(tl.int64) * stride_kbar
    else:           # prefill: one sequence, and no division or offset in its code
        seq = 0
    first = (pid - seq * tiles) * BQ          # the program's first query inside its sequence
    d = tl.arange(0, D)
    p = tl.arange(0, BQ * H)                 # (query, head) pairs
    local = first + p // H
    pq_ok = local < per_seq
    pq = seq * per_seq + local
    # int64: T * H * D reaches 2**31 at T = 262144 (H = 64, D = 128)
    q = tl.load(Q + pq[:, None].to(tl.int64) * stride_qt + (p % H)[:, None] * D + d[None, :],
                mask=pq_ok[:, None], other=0.0).to(tl.float32)
    w = tl.load(W + pq * stride_wt + p % H, mask=pq_ok, other=0.0)
    if DECODE:      # query i of a sequence of ctx tokens sees [0, ctx - per_seq + i + 1)
        ks = tl.zeros([BQ * H], dtype=tl.int32)
        ke = tl.where(pq_ok, tl.load(CTX + seq) - per_seq + local + 1, 0)
    else:
        ks = tl.load(KS + pq, mask=pq_ok, other=0)
        ke = tl.load(KE + pq, mask=pq_ok, other=0)
    blo = ks // block_size
    bhi = (ke + block_size - 1) // block_size
    acc = tl.zeros([BQ * H], dtype=tl.float32)            # sum of relu scores over visible blocks
    at_best = tl.zeros([BQ * H], dtype=tl.float32)        # gap: each head's score on the best block
    best = tl.full([BQ], float("-inf"), tl.float32)       # gap: best pooled DSA score so far
    for b0 in range(tl.min(blo, axis=0) // NBT * NBT, tl.max(bhi, axis=0), NBT):
        bidx = b0 + tl.arange(0, NBT)
        kb = tl.load(KBAR + bidx[:, None] * D + d[None, :], mask=(bidx < NB)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=PRECISION)           # [BQ * H, NBT]
        visible = (bidx[None, :] >= blo[:, None]) & (bidx[None, :] < bhi[:, None])
        relu = tl.where(visible, tl.maximum(s, 0.0), 0.0)
        acc += tl.sum(relu, axis=1)
        if GAP:
            # the pooled DSA score of each block per query; the first of equal maxima wins, and
            # a later tile must beat the best strictly (blocks arrive in ascending order)
            block = tl.sum(tl.reshape(w[:, None] * relu, (BQ, H, NBT)), axis=1)
            vis_q = tl.max(tl.reshape(visible.to(tl.int32), (BQ, H, NBT)), axis=1) > 0
            block = tl.where(vis_q, block, float("-inf"))
            tile_best = tl.max(block, axis=1)
            tile_arg = tl.min(tl.where(block == tile_best[:, None], bidx[None, :], NB + NBT), axis=1)
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            pick = _per_pair(tl.where(better, tile_arg, -1), BQ, H)
            on_pick = tl.sum(tl.where(bidx[None, :] == pick[:, None], relu, 0.0), axis=1)
            at_best = tl.where(pick >= 0, on_pick, at_best)
    if GAP:
        n_vis = tl.maximum(tl.minimum(bhi, NB) - blo, 0)
        rest_mean = (acc - at_best) / tl.maximum(n_vis - 1, 1).to(tl.float32)
        score = tl.reshape(w * (at_best - rest_mean), (BQ, H))
    else:
        score = tl.reshape(tl.abs(w) * acc, (BQ, H))

    # top-ACTIVE heads per query, ties to the lower head, written in ascending head order. A head's
    # rank is the number of heads before it in (score desc, head asc) order: one reduction instead
    # of ACTIVE rounds of cross-warp max and min (pooling and routing 0.103 ms against 0.114 with 8
    # rounds, 4096 x 131072, H200)
    head = tl.arange(0, H)
    si = score[:, :, None]
    sj = score[:, None, :]
    before = (sj > si) | ((sj == si) & (head[None, None, :] < head[None, :, None]))
    chosen = tl.sum(before.to(tl.int32), axis=2) < ACTIVE
    slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    rows = first + tl.arange(0, BQ)
    # slot < ACTIVE: NaN scores (inputs not yet validated, misa.select) compare false both ways and
    # could choose more heads than there are slots; the row's stores must stay inside it
    tl.store(HEADS + (seq * per_seq + rows)[:, None] * ACTIVE + slot, tl.broadcast_to(head[None, :], (BQ, H)),
             mask=chosen & (slot < ACTIVE) & (rows < per_seq)[:, None])


class RouteConfig(NamedTuple):
    """A launch of the routing kernel."""
    pairs: int = 128            # (query, head) pairs per program: pairs // H queries
    blocks: int = 32            # pooled blocks per step
    num_warps: int = 4
    precision: str = "tf32"     # the MMA's input_precision
    num_stages: int = 3


# tf32 picks the same heads as tf32x3 for 99.98% of the queries at 2.4x the speed (0.12 ms against
# 0.29 at 4096 x 131072, H200).
DEFAULT_CONFIG = RouteConfig()
# gap compares blocks by their pooled DSA score: an argmax, which tf32's 10-bit mantissa can flip
# between near-equal blocks, so it multiplies in tf32x3 (about float32).
GAP_CONFIG = RouteConfig(precision="tf32x3")


STATISTICS = ("abs-sum", "gap")


def _launch_config(config, router: str) -> tuple[int, dict]:
    """(query-head pairs per program, the routing launch's other settings) from a ``RouteConfig``
    (the statistic's default when None)."""
    cfg = config or (GAP_CONFIG if router == "gap" else DEFAULT_CONFIG)
    # the interpreter has no tf32: it multiplies in float32 whatever the config says
    return cfg.pairs, dict(NBT=cfg.blocks, PRECISION="ieee" if INTERPRET else cfg.precision, GAP=router == "gap",
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def route_heads(inp, active_heads: int, block_size: int, config=None, router: str = "abs-sum",
                out: torch.Tensor | None = None, kbar: torch.Tensor | None = None) -> torch.Tensor:
    """Routing by ``router`` (one of ``STATISTICS``), ``[T, h]`` int32 ascending head ids. ``out``
    (``[T, h]`` int32, contiguous) and ``kbar`` (``[ceil(S / block_size), D]`` float32, contiguous):
    written into instead of allocated (``misa.PrefillSelector``)."""
    t, h, d = inp.q.shape
    heads = out if out is not None else torch.empty(t, active_heads, dtype=torch.int32, device=inp.q.device)
    if t == 0:
        return heads
    if active_heads == h:     # every head: nothing to route
        return heads.copy_(torch.arange(h, dtype=torch.int32, device=heads.device).expand(t, h))
    pairs, launch = _launch_config(config, router)
    kbar = pool_keys(inp.k, inp.k_scale, block_size, out=kbar)
    bq = max(1, pairs // h)
    tiles = triton.cdiv(t, bq)
    _route_kernel[(tiles,)](
        inp.q, inp.weights, kbar, inp.ks, inp.ke, inp.ke, heads, t, tiles, kbar.shape[0], block_size,
        inp.q.stride(0), inp.weights.stride(0), 0,
        H=h, D=d, BQ=bq, ACTIVE=active_heads, DECODE=False, **launch,
    )
    return heads


def batched_router_ok(num_heads: int, router: str) -> bool:
    """Whether ``paged_route_heads_batched`` takes this router: the kernel's statistics, and (query,
    head) pairs tiled by powers of two."""
    return router in STATISTICS and num_heads <= 128 and power_of_two(num_heads)


def paged_route_heads_batched(q, kv_cache, weights, context_lens, block_table, active_heads: int,
                              block_size: int, router: str = "abs-sum", config=None,
                              longest: int | None = None, pooled=None, out=None, kbar=None,
                              max_blocks: int | None = None) -> torch.Tensor:
    """Decode routing for the whole batch in two launches: ``[B * next_n, h]`` int32 ascending head
    ids, rows sequence-major; query ``i`` of sequence ``b`` sees ``[0, context_lens[b] - next_n + i + 1)``.
    ``q [B, next_n, H, D]``; inputs as ``misa.paged_*`` checks them, ``batched_router_ok`` true;
    ``longest``: ``context_lens.max()`` if the caller has it (saves a GPU sync); ``pooled``: the
    pooled-key cache, whose page sums give the blocks without reading the cache (``block_size`` a
    multiple of 64). ``out`` / ``kbar`` (``[B, max_blocks, D]`` float32) preallocated and
    ``max_blocks`` given: nothing allocated or read back (``misa.DecodeSelector``)."""
    b, n, h, d = q.shape
    heads = out if out is not None else torch.empty(b * n, active_heads, dtype=torch.int32, device=q.device)
    if b * n == 0:
        return heads
    if active_heads == h:     # every head: nothing to route
        return heads.copy_(torch.arange(h, dtype=torch.int32, device=heads.device).expand(b * n, h))
    if max_blocks is None:
        max_blocks = triton.cdiv(int(context_lens.max()) if longest is None else longest, block_size)
    if pooled is not None:
        from ..pool.triton import pool_blocks
        kbar = pool_blocks(pooled, block_table, context_lens, block_size, max_blocks, out=kbar)
    else:
        kbar = paged_pool_keys(kv_cache, context_lens, block_table, block_size, max_blocks)
    q, weights = q.contiguous(), weights.contiguous()
    pairs, launch = _launch_config(config, router)
    # next_n queries per program at most (a program never spans two sequences), and at least 16
    # (query, head) pairs, the smallest MMA tile
    bq = max(min(max(1, pairs // h), triton.next_power_of_2(n)), triton.cdiv(16, h))
    tiles = triton.cdiv(n, bq)
    _route_kernel[(b * tiles,)](
        q, weights, kbar, context_lens, context_lens, context_lens, heads, n, tiles, max_blocks, block_size,
        q.stride(1), weights.stride(0), kbar.stride(0),
        H=h, D=d, BQ=bq, ACTIVE=active_heads, DECODE=True, **launch,
    )
    return heads
