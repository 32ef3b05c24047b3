"""Triton kernels for block-pruned decode over the paged cache (the math: ``reference.py``).

``block_scores``: one program per (sequence, split) loads the sequence's ``next_n`` queries with
all heads once and walks its blocks in tiles of ``TB``: each block's mean key comes from the
pooled-key cache (``G`` page rows summed, divided by the cached tokens), so this pass reads
``2 * D`` bytes per 64 tokens (bfloat16 rows) instead of the ``64 * (D + 4)`` the dense paged logits read. It also
writes each row's visible block count, which the top-m reads as its range.

``chosen_block_logits``: one program per (row, split) scores the pages of the row's chosen
blocks, read in place through the block table (a ``[64, D] x [D, H]`` MMA per page), and writes
the scores with the positions the top-k maps them to.

``prefill_block_ranges`` / ``force_edge_blocks``: prefill HISA's per-query block ranges, and the
first and last visible block forced into its pick (``misa.PrefillSelector``), one program per
``BLOCK`` queries, in place of a dozen PyTorch ops and a boolean-mask gather (which reads its size
back to the host).

Grids depend on shapes only and nothing is read back to the host: all these kernels can be captured
in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import quant
from ..dsa import paged_triton
from ..dsa.triton import mma_cast
from ..topk.triton_rows import row_topk
from ..triton_common import INTERPRET, load_pair_queries, load_row_queries, sm_count


@triton.jit(do_not_specialize=["out_width", "M"])
def _block_scores_kernel(Q, W, POOLED, TABLE, CTX, OUT, BLOCK_ENDS, TOP, out_width, M,
                         stride_qb, stride_qn, stride_qh, stride_wt, stride_table, stride_out, stride_top,
                         N: tl.constexpr, QB: tl.constexpr, H: tl.constexpr, HS: tl.constexpr,
                         D: tl.constexpr, PAGE: tl.constexpr, G: tl.constexpr, TB: tl.constexpr,
                         CAST: tl.constexpr, WB: tl.constexpr):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    q0 = tl.program_id(2) * QB                                  # this program's tile of queries
    d = tl.arange(0, D)
    ctx = tl.load(CTX + b)
    # (head, query) pairs head-major, as the dense paged kernel: the head sum stays in-thread
    qt, w = load_pair_queries(Q, W, W, b, q0, stride_qb, stride_qn, stride_qh, stride_wt, 0,
                              N, QB, H, HS, D, False, CAST)                     # [D, HS * QB], [HS * QB]

    queries = q0 + tl.arange(0, QB)
    q_ok = queries < N
    ke = ctx - N + queries + 1                                  # each query's visible end
    bsize = PAGE * G
    last = (ke - 1) // bsize                                    # its last visible block
    if pid_s == 0:
        tl.store(BLOCK_ENDS + b * N + queries, last + 1, mask=q_ok)
    n_blocks = tl.cdiv(ctx, bsize)
    jb = tl.arange(0, TB)
    if G == 1:      # this program's first tile's table entries
        page = tl.load(TABLE + b * stride_table + pid_s * TB + jb, mask=pid_s * TB + jb < n_blocks, other=0)
    for t in range(pid_s, tl.cdiv(n_blocks, TB), n_split):
        blk = t * TB + jb
        count = tl.minimum(ctx - blk * bsize, bsize).to(tl.float32)
        if G == 1:
            # one page a block: its pooled row goes into the MMA as loaded, the 1/count after the
            # MMA (relu commutes with it); the next tile's table entries load before this MMA
            rows = tl.load(POOLED + page.to(tl.int64)[:, None] * D + d[None, :], mask=(blk < n_blocks)[:, None],
                           other=0.0)
            nxt = blk + n_split * TB
            page = tl.load(TABLE + b * stride_table + nxt, mask=nxt < n_blocks, other=0)
            acc = tl.dot(rows.to(CAST), qt)                     # [TB, HS * QB]
        else:
            sums = tl.zeros([TB, D], dtype=tl.float32)
            for g in tl.static_range(G):
                lp = blk * G + g
                has = lp * PAGE < ctx
                pg = tl.load(TABLE + b * stride_table + lp, mask=has, other=0).to(tl.int64)
                sums += tl.load(POOLED + pg[:, None] * D + d[None, :], mask=has[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(sums.to(CAST), qt)
        acc = tl.maximum(acc, 0.0) * w[None, :]
        s = tl.sum(tl.reshape(acc, (TB, HS, QB)), axis=1) / tl.maximum(count, 1.0)[:, None]     # [TB, QB]
        forced = (blk[:, None] == 0) | (blk[:, None] == last[None, :])
        s = tl.where(forced, float("inf"), s)
        s = tl.where(blk[:, None] <= last[None, :], s, float("-inf"))
        tl.store(OUT + (b * N + queries)[None, :].to(tl.int64) * stride_out + blk[:, None], s,
                 mask=q_ok[None, :] & ((blk < n_blocks) & (blk < out_width))[:, None])
    if WB > 0:
        # this program wrote all its queries' blocks: their top-M here saves the top-m's launch
        # (the per-call floor at small batch); the barrier makes the rows' stores visible
        tl.debug_barrier()
        cb = tl.arange(0, WB)
        for i in range(0, QB):
            query = q0 + i
            if query < N:
                row = (b * N + query).to(tl.int64)
                visible = cb < (ctx - N + query) // bsize + 1         # the query's visible blocks
                x = tl.load(OUT + row * stride_out + cb, mask=visible, other=0.0)
                row_topk(x, visible, TOP + row * stride_top, TOP, 0, M, WB, False)


@triton.jit(do_not_specialize=["M"])
def _chosen_blocks_kernel(Q, W, VALUES, SCALES, TABLE, CTX, BLOCKS, OUT, POS, M,
                          stride_qb, stride_qn, stride_qh, stride_wt, stride_table, stride_blk, stride_out,
                          N: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                          PAGE: tl.constexpr, G: tl.constexpr, CAST: tl.constexpr):
    r = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = r // N
    ke = tl.load(CTX + b) - N + r % N + 1
    d = tl.arange(0, D)
    qt, w = load_row_queries(Q, W, r, stride_qb, stride_qn, stride_qh, stride_wt, N, H, HS, D, CAST)
    off = tl.arange(0, PAGE)
    page_bytes = PAGE * (D + 4)
    out_row = r.to(tl.int64) * stride_out
    for j in range(pid_s, M * G, n_split):                     # (block slot, page of the block)
        blk = tl.load(BLOCKS + r.to(tl.int64) * stride_blk + j // G)
        lp = blk * G + j % G
        pos = lp * PAGE + off                                  # negative for an empty slot (blk = -1)
        ok = (pos >= 0) & (pos < ke)
        page = tl.load(TABLE + b * stride_table + lp, mask=(lp >= 0) & (lp * PAGE < ke), other=0).to(tl.int64)
        k = tl.load(VALUES + page * page_bytes + off[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        if CAST is not None:
            k = k.to(CAST)
        acc = tl.maximum(tl.dot(k, qt), 0.0) * w[None, :]     # [PAGE, HS]
        s = tl.sum(acc, axis=1)
        scale = tl.load(SCALES + page * (page_bytes // 4) + (PAGE * D) // 4 + off, mask=ok, other=0.0)
        col = j * PAGE + off
        tl.store(OUT + out_row + col, tl.where(ok, s * scale, float("-inf")))
        tl.store(POS + out_row + col, tl.where(ok, pos, -1))


def _heads_padded(h: int, queries: int) -> int:
    """Head slots: a power of two, and at least 16 (head, query) pairs: the MMA's smallest N."""
    return max(triton.next_power_of_2(h), triton.cdiv(16, queries))


# the widest block row whose top-m the scoring program takes on (registers of 4 warps)
FUSED_TOP_WIDTH = 4096


def block_scores(q, pooled, weights, context_lens, block_table, block_size: int, out, block_ends,
                 tile: int = 64, splits: int | None = None, top=None) -> bool:
    """Write ``out [B * N, >= max blocks]`` (see ``reference.block_scores``; columns past a
    sequence's blocks untouched) and ``block_ends [B * N]`` int32, each row's visible block count.
    ``top [B * N, m]`` int32: where one program walks all of a sequence's blocks (small batch and
    context, ``splits`` 1), it also writes each row's top-``m`` blocks there, as
    ``short_rows_topk(out, 0, block_ends, m)`` would, and returns True; else False (the caller's
    top-m then runs)."""
    b, n, h, d = q.shape
    if b == 0:
        return top is not None
    qb, hs = paged_triton.query_tile(n, h)        # long query runs (chunked prefill) in tiles of qb queries
    tiles = triton.cdiv(n, qb)
    g = block_size // quant.PAGE_SIZE
    max_blocks = triton.cdiv(block_table.shape[1], g)
    if splits is None:
        # at most 2 programs per SM, one wave (64 x 128K, H100, one page a block: 23-25 us at 256
        # programs, 23-28 at 512, 24-30 at 1024; rounding up gave 320, a second partial wave)
        splits = max(1, min(triton.cdiv(max_blocks, tile), (2 * sm_count(q)) // (b * tiles)))
    # One page a block: its bfloat16 page sum meets q (fp8 or bf16, widened exactly) in a bf16 MMA
    # with float32 sums, exact products, twice tf32's rate (64 x 128K, H100: 23 against 44 us).
    # Several pages a block, or a float32 pooled cache: float32 sums in a tf32 MMA, since rounding
    # them to bf16 moved block scores by ~1% where heads cancel, enough to swap near blocks.
    cast = tl.bfloat16 if g == 1 and pooled.dtype == torch.bfloat16 and not INTERPRET else tl.float32
    width = max(16, triton.next_power_of_2(max_blocks))
    fuse = top is not None and splits == 1 and width <= FUSED_TOP_WIDTH
    _block_scores_kernel[(b, splits, tiles)](
        q, weights, pooled, block_table, context_lens, out, block_ends, top if fuse else block_ends, out.shape[1],
        top.shape[1] if fuse else 0,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), block_table.stride(0), out.stride(0),
        top.stride(0) if fuse else 0,
        N=n, QB=qb, H=h, HS=hs, D=d, PAGE=quant.PAGE_SIZE, G=g, TB=tile, CAST=cast, WB=width if fuse else 0,
        num_warps=4, num_stages=3)
    return fuse


def chosen_block_logits(q, kv_cache, weights, context_lens, block_table, blocks, block_size: int, out, positions,
                        splits: int | None = None) -> None:
    """Write ``out`` / ``positions [B * N, m * block_size]`` (see ``reference.chosen_block_logits``)."""
    b, n, h, d = q.shape
    rows, m = blocks.shape
    if rows == 0:
        return
    g = block_size // quant.PAGE_SIZE
    hs = _heads_padded(h, 1)
    flat = kv_cache.reshape(-1)
    if splits is None:
        splits = max(1, min(m * g, triton.cdiv(4 * sm_count(q), rows)))
    _chosen_blocks_kernel[(rows, splits)](
        q, weights, flat.view(quant.FP8), flat.view(torch.float32), block_table, context_lens, blocks, out, positions,
        m, q.stride(0), q.stride(1), q.stride(2), weights.stride(0), block_table.stride(0), blocks.stride(0),
        out.stride(0), N=n, H=h, HS=hs, D=d, PAGE=quant.PAGE_SIZE, G=g, CAST=mma_cast(q.dtype, quant.FP8),
        num_warps=4, num_stages=2)      # 3 stages: 27 against 25 us at 64 x 128K, H100


@triton.jit(do_not_specialize=["T", "block_size"])
def _prefill_block_ranges_kernel(KS, KE, BKS, BKE, T, block_size, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < T
    ks = tl.load(KS + i, mask=m, other=0)
    ke = tl.load(KE + i, mask=m, other=0)
    bks = ks // block_size
    bke = tl.where(ke > ks, (ke + block_size - 1) // block_size, bks)
    tl.store(BKS + i, bks, mask=m)
    tl.store(BKE + i, bke, mask=m)


@triton.jit(do_not_specialize=["T"])
def _force_edge_blocks_kernel(BKS, BKE, SCORES, T, stride, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bks = tl.load(BKS + i, mask=i < T, other=0)
    bke = tl.load(BKE + i, mask=i < T, other=0)
    m = (i < T) & (bke > bks)
    row = SCORES + i.to(tl.int64) * stride
    inf = tl.full([BLOCK], float("inf"), tl.float32)
    tl.store(row + bks, inf, mask=m)
    tl.store(row + bke - 1, inf, mask=m)


RANGE_BLOCK = 256       # queries per program


def prefill_block_ranges(ks, ke, block_size: int, bks, bke) -> None:
    """Write ``bks, bke [T]`` int32 (see ``reference.prefill_block_ranges``)."""
    t = ks.shape[0]
    if t:
        _prefill_block_ranges_kernel[(triton.cdiv(t, RANGE_BLOCK),)](ks, ke, bks, bke, t, block_size,
                                                                     BLOCK=RANGE_BLOCK, num_warps=4)


def force_edge_blocks(scores, bks, bke) -> None:
    """+inf at each row's first and last visible block of ``scores [T, W]`` (see
    ``reference.force_edge_blocks``; ``scores`` rows may be strided, columns contiguous)."""
    t = bks.shape[0]
    if t:
        _force_edge_blocks_kernel[(triton.cdiv(t, RANGE_BLOCK),)](bks, bke, scores, t, scores.stride(0),
                                                                  BLOCK=RANGE_BLOCK, num_warps=4)


@triton.jit(do_not_specialize=["M"])
def _block_positions_kernel(BLOCKS, OUT, M, stride_blocks, stride_out, B: tl.constexpr, BP: tl.constexpr,
                            SLOTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * SLOTS + tl.arange(0, SLOTS)
    block = tl.load(BLOCKS + row * stride_blocks + j, mask=j < M, other=-1)
    o = tl.arange(0, BP)
    pos = tl.where(block[:, None] >= 0, block[:, None] * B + o[None, :], -1)
    tl.store(OUT + row * stride_out + j[:, None] * B + o[None, :], pos, mask=(j < M)[:, None] & (o < B)[None, :])


def block_positions(blocks, block_size: int, out) -> None:
    """Write ``out [T, m * block_size]`` int32 (see ``reference.block_positions``): one pass writing
    the positions, where a broadcast add and a clamp in PyTorch wrote them twice and read them once."""
    t, m = blocks.shape
    if t and m:
        bp = triton.next_power_of_2(block_size)
        slots = max(1, min(triton.next_power_of_2(m), 4096 // bp))
        _block_positions_kernel[(t, triton.cdiv(m, slots))](blocks, out, m, blocks.stride(0), out.stride(0),
                                                            B=block_size, BP=bp, SLOTS=slots, num_warps=4)
