"""Top-k of short rows (up to ``MAX_WIDTH`` columns) in one launch: one program holds its whole
row in registers and finds the k-th largest key by a 4-way search on the key range, stopping as
soon as exactly ``k`` keys lie at or above its lower bound; then it writes the winners.

The three-launch top-k (``triton.py``) reads a long row once whatever k is; on the rows decode
produces (a few thousand candidates or blocks per query, often one query) its launches and
hand-offs cost more than the work: this kernel is that case's top-k. Same contract: columns
``[ks - ks_offset, ke - ks_offset)`` of each row, ``cmap`` or ``col + out_offset`` written, -1
padded, ``finite_only`` skipping -inf, ties at the k-th value taken in column order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import ordered_key
from .triton import check_rows

MAX_WIDTH = 16384          # counts share 16-bit fields (< 65536), and the row fits registers


@triton.jit
def row_topk(x, m, out_row, cmap_row, out_offset, K, W: tl.constexpr, HAS_CMAP: tl.constexpr):
    """Write the top-``K`` of ``x [W]`` (float32, where ``m``) to ``out_row``: ``cmap_row[col]``
    or ``col + out_offset``, -1 padded to ``K``; also called inside other kernels that hold a row
    (the block scores' top-m)."""
    c = tl.arange(0, W)
    key = ordered_key(x)
    n = tl.sum(m.to(tl.int32), axis=0)
    lo = tl.min(tl.where(m, key, 0xFFFFFFFF), axis=0)
    hi = tl.max(tl.where(m, key, 0), axis=0)
    at_lo = n
    j = tl.arange(0, 4)
    z = tl.zeros([4], dtype=tl.int32)
    # invariant: count(key >= lo) >= K (when n > K) and no key above hi matters more than lo
    while (n > K) & (hi > lo) & (at_lo != K):
        step = (hi - lo) // 4 + 1
        thr = lo + j.to(tl.uint32) * step
        valid = j.to(tl.uint32) * step <= hi - lo
        # two thresholds per reduction as 16-bit fields (W < 65536): a [W, 4] comparison spilled
        t0 = tl.sum(tl.where(j == 0, thr, 0), axis=0)
        t1 = tl.sum(tl.where(j == 1, thr, 0), axis=0)
        t2 = tl.sum(tl.where(j == 2, thr, 0), axis=0)
        t3 = tl.sum(tl.where(j == 3, thr, 0), axis=0)
        c01 = tl.sum((m & (key >= t0)).to(tl.int32) + ((m & (key >= t1)).to(tl.int32) << 16), axis=0)
        c23 = tl.sum((m & (key >= t2)).to(tl.int32) + ((m & (key >= t3)).to(tl.int32) << 16), axis=0)
        counts = tl.where(j == 0, c01 & 0xFFFF, tl.where(j == 1, c01 >> 16, tl.where(j == 2, c23 & 0xFFFF, c23 >> 16))) + z
        ok = valid & (counts >= K)
        best = tl.max(tl.where(ok, j, 0), axis=0)
        new_lo = lo + best.to(tl.uint32) * step
        has_next = tl.sum((valid & (j == best + 1)).to(tl.int32), axis=0) > 0
        hi = tl.where(has_next, new_lo + step - 1, hi)
        lo = new_lo
        at_lo = tl.sum(tl.where(j == best, counts, 0), axis=0)
    if n <= K:
        take = m
    else:
        above = m & (key > lo)
        tie = m & (key == lo)
        room = K - tl.sum(above.to(tl.int32), axis=0)
        take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    if HAS_CMAP:
        val = tl.load(cmap_row + c, mask=take, other=-1)
    else:
        val = c + out_offset
    tl.store(out_row + pos, val, mask=take)
    total = tl.sum(take.to(tl.int32), axis=0)
    for start in range(total, K, W):              # -1 after the winners
        p = start + c
        tl.store(out_row + p, tl.full([W], -1, tl.int32), mask=p < K)


@triton.jit(do_not_specialize=["ks_offset", "out_offset", "K"])
def _short_rows_kernel(X, KS, KE, OUT, CMAP, stride_x, stride_out, stride_cmap, ks_offset, out_offset, K,
                       W: tl.constexpr, HAS_CMAP: tl.constexpr, FINITE_ONLY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.load(KS + row) - ks_offset
    ke = tl.load(KE + row) - ks_offset
    c = tl.arange(0, W)
    m = (c >= ks) & (c < ke)
    x = tl.load(X + row * stride_x + c, mask=m, other=0.0).to(tl.float32)      # bf16 widens exactly
    if FINITE_ONLY:
        m = m & (x > float("-inf"))
    row_topk(x, m, OUT + row * stride_out, CMAP + row * stride_cmap, out_offset, K, W, HAS_CMAP)


def short_rows_topk(x: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int, out: torch.Tensor,
                    ks_offset: int = 0, out_offset: int = 0, cmap: torch.Tensor | None = None,
                    finite_only: bool = False) -> torch.Tensor:
    """Write the top-``k`` of each row of ``x [T, W]`` f32 or bf16 (W <= ``MAX_WIDTH``) into ``out
    [T, k]`` int32 (see the module docstring); returns ``out``."""
    t, w = x.shape
    check_rows("x", x)
    if w > MAX_WIDTH:
        raise ValueError(f"x: rows of {w} columns exceed the short-row top-k's {MAX_WIDTH}")
    if t:
        width = max(16, triton.next_power_of_2(w))
        _short_rows_kernel[(t,)](
            x, ks, ke, out, cmap if cmap is not None else out, x.stride(0), out.stride(0),
            cmap.stride(0) if cmap is not None else 0, ks_offset, out_offset, k,
            W=width, HAS_CMAP=cmap is not None, FINITE_ONLY=finite_only,
            num_warps=16 if width >= 16384 else 8 if width >= 4096 else 4)
    return out
