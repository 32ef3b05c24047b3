"""Triton kernel for decode logits straight from the paged index-K cache (all heads, or each
query's routed heads), one launch for the whole batch.

The per-sequence path (``misa/paged.py``) gathers each sequence's pages into contiguous keys and
runs the prefill kernels sequence by sequence. Here a program takes one sequence's ``next_n``
queries and every ``splits``-th of its pages: a key tile is one page (``PAGE_SIZE`` = 64 tokens),
its id read from the block table, its fp8 values and float32 scales read in place. The MMA puts the
page's 64 keys on M and the (head slot, query) pairs on N, head-major as in the prefill kernel,
padded to at least 16 pairs; a tile of two queries with 16 or more heads runs one MMA per query
instead (heads on N), so that each query's head sum stays inside threads. Rows are ``b * next_n + i``; query ``i`` of sequence ``b`` sees
positions ``[0, context_lens[b] - next_n + i + 1)``. Long query runs (chunked prefill against the
cache, ``next_n`` in the hundreds) are cut into tiles of ``QB`` queries, at most ``MAX_PAIRS``
(head, query) pairs a program (the MMA's N, held in registers): each tile reads the sequence's
pages again, so the cache is read ``ceil(next_n / QB)`` times.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import quant
from ..triton_common import load_pair_queries, sm_count
from .triton import mma_cast


@triton.jit(do_not_specialize=["out_width"])
def _paged_logits_kernel(
    Q, W, HEADS, VALUES, SCALES, TABLE, CTX, OUT,
    out_width,
    stride_qb, stride_qn, stride_qh, stride_wt, stride_ht, stride_table, stride_out,
    N: tl.constexpr, QB: tl.constexpr, NH: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, ROUTED: tl.constexpr, CAST: tl.constexpr, PER_QUERY: tl.constexpr,
):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    q0 = tl.program_id(2) * QB                             # this program's tile of queries
    d = tl.arange(0, D)
    ctx = tl.load(CTX + b)
    if PER_QUERY:       # two queries, one MMA each with the heads on N ([D, HS] operands)
        qt0, w0 = load_pair_queries(Q, W, HEADS, b, q0, stride_qb, stride_qn, stride_qh, stride_wt, stride_ht,
                                    N, 1, NH, HS, D, ROUTED, CAST)
        qt1, w1 = load_pair_queries(Q, W, HEADS, b, q0 + 1, stride_qb, stride_qn, stride_qh, stride_wt, stride_ht,
                                    N, 1, NH, HS, D, ROUTED, CAST)
    else:
        qt, w = load_pair_queries(Q, W, HEADS, b, q0, stride_qb, stride_qn, stride_qh, stride_wt, stride_ht,
                                  N, QB, NH, HS, D, ROUTED, CAST)               # [D, HS * QB], [HS * QB]

    queries = q0 + tl.arange(0, QB)
    ke = ctx - N + queries + 1                             # each query's visible end
    off = tl.arange(0, PAGE)
    page_bytes = PAGE * (D + 4)
    for pg in range(pid_s, tl.cdiv(ctx, PAGE), n_split):
        page = tl.load(TABLE + b * stride_table + pg).to(tl.int64)
        k = tl.load(VALUES + page * page_bytes + off[:, None] * D + d[None, :])
        if CAST is not None:
            k = k.to(CAST)
        scale = tl.load(SCALES + page * (page_bytes // 4) + (PAGE * D) // 4 + off)
        pos = pg * PAGE + off
        if PER_QUERY:
            row = (b * N + q0).to(tl.int64)
            _store_query_row(k, qt0, w0, scale, pos, ctx - N + q0 + 1, OUT + row * stride_out, out_width)
            # a last tile holding one query writes no second row
            _store_query_row(k, qt1, w1, scale, pos, ctx - N + q0 + 2, OUT + (row + 1) * stride_out,
                             tl.where(q0 + 1 < N, out_width, 0))
        else:
            acc = tl.dot(k, qt)                                # [PAGE, HS * QB]
            acc = tl.maximum(acc, 0.0) * w[None, :]
            logits = tl.sum(tl.reshape(acc, (PAGE, HS, QB)), axis=1)                 # [PAGE, QB]
            logits = logits * scale[:, None]
            logits = tl.where(pos[:, None] < ke[None, :], logits, float("-inf"))
            tl.store(OUT + (b * N + queries)[None, :].to(tl.int64) * stride_out + pos[:, None], logits,
                     mask=(queries < N)[None, :] & (pos < out_width)[:, None])


@triton.jit
def _store_query_row(k, qt, w, scale, pos, ke, OUT_ROW, width):
    """One query's scores of a page: ``sum_h w_h relu(q_h . k) * scale``, -inf from ``ke`` on,
    columns from ``width`` on not written."""
    logits = tl.sum(tl.maximum(tl.dot(k, qt), 0.0) * w[None, :], axis=1) * scale
    tl.store(OUT_ROW + pos, tl.where(pos < ke, logits, float("-inf")), mask=pos < width)


# (head, query) pairs a program holds at most: next_n <= 4 at 64 heads in one tile (the MTP case)
MAX_PAIRS = 256


def query_tile(queries: int, heads: int) -> tuple[int, int]:
    """``(QB, HS)``: queries per tile (a power of two) and head slots (a power of two, at least 16
    pairs: the MMA's smallest N) for ``queries`` queries of ``heads`` heads."""
    hs = triton.next_power_of_2(heads)
    qb = min(triton.next_power_of_2(queries), max(1, MAX_PAIRS // hs))
    return qb, max(hs, triton.cdiv(16, qb))


def one_mma_per_query(queries_per_tile: int, heads: int) -> bool:
    """Two queries a tile with at least 16 heads each: one MMA per query, the heads on N, instead
    of one over their (head, query) pairs, whose head sum crosses threads (H100, 64 x 128K, next_n
    = 2: the cache read at 2.49 against 2.00 TB/s)."""
    return queries_per_tile == 2 and triton.next_power_of_2(heads) >= 16


def paged_logits(q, kv_cache, weights, context_lens, block_table, out, heads=None, splits=None) -> torch.Tensor:
    """Write ``out [B * next_n, W]`` float32 for every page a sequence holds: the scores of its
    visible positions, -inf for the rest of its pages; columns past a sequence's pages are not
    touched. ``q [B, next_n, H, D]`` fp8/bf16, ``weights [B * next_n, H]``, ``heads [B * next_n, h]``
    int32 for routed scoring (None: all heads). Inputs as ``misa.paged_*`` checks them."""
    b, n, h_all, d = q.shape
    if b == 0:
        return out
    q, weights = q.contiguous(), weights.contiguous()
    heads = heads.contiguous() if heads is not None else None
    nh = heads.shape[1] if heads is not None else h_all
    qb, hs = query_tile(n, nh)
    per_query = one_mma_per_query(qb, nh)       # query_tile's head slots are then the heads, unpadded
    tiles = triton.cdiv(n, qb)
    flat = kv_cache.reshape(-1)
    values = flat.view(quant.FP8)
    scales = flat.view(torch.float32)
    if splits is None:  # enough programs to fill the GPU when the batch is small
        # four programs per SM, six stages of page loads in flight: the cache streams at 90% of the
        # card's copy bandwidth at 64 x 128K (H100: 2.73 TB/s against 1.87 with two programs and
        # three stages; copy 3.02 TB/s)
        splits = max(1, min(block_table.shape[1], triton.cdiv(4 * sm_count(q), b * tiles)))
    _paged_logits_kernel[(b, splits, tiles)](
        q, weights, heads if heads is not None else context_lens, values, scales, block_table, context_lens, out,
        out.shape[1],
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), heads.stride(0) if heads is not None else 0,
        block_table.stride(0), out.stride(0),
        N=n, QB=qb, NH=nh, HS=hs, D=d, PAGE=quant.PAGE_SIZE, ROUTED=heads is not None,
        CAST=mma_cast(q.dtype, quant.FP8), PER_QUERY=per_query, num_warps=4, num_stages=6,
    )
    return out
