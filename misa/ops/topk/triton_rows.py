"""Top-k of short rows (up to ``MAX_WIDTH`` columns) in one launch: one program holds its whole
row in registers and finds the k-th largest key by radix select: a 256-bin histogram of one 8-bit
digit per pass, most significant first, among the keys that share the digits found so far; it
stops as soon as those keys are exactly the ones still needed (at most four passes), then writes
the winners.

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

MAX_WIDTH = 16384          # the row fits registers


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
    key = ordered_key(x)
    n = tl.sum(m.to(tl.int32), axis=0)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], dtype=tl.uint32)      # the k-th key's bits found so far (under hmask)
    hmask = tl.zeros([], dtype=tl.uint32)
    krem = K                                     # the k-th key is the krem-th largest matching prefix
    shift = 24
    going = n > K
    while going:                                 # one 8-bit digit per pass, most significant first
        h = tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=m & ((key & hmask) == prefix))
        at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
        digit = tl.max(tl.where(at_or_above >= krem, bins, 0), axis=0)
        krem -= tl.sum(tl.where(bins > digit, h, 0), axis=0)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        hmask = hmask | (tl.full([], 0xFF, tl.uint32) << shift)
        # done when the keys sharing the prefix are exactly the ones still needed
        going = (shift > 0) & (tl.sum(tl.where(bins == digit, h, 0), axis=0) != krem)
        shift -= 8
    if n <= K:
        take = m
    else:
        top = key & hmask
        above = m & (top > prefix)
        tie = m & (top == prefix)
        room = K - tl.sum(above.to(tl.int32), axis=0)
        take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    if HAS_CMAP:
        val = tl.load(CMAP + row * stride_cmap + c, mask=take, other=-1)
    else:
        val = c + out_offset
    out_row = OUT + row * stride_out
    tl.store(out_row + pos, val, mask=take)
    total = tl.sum(take.to(tl.int32), axis=0)
    for start in range(total, K, W):              # -1 after the winners
        p = start + c
        tl.store(out_row + p, tl.full([W], -1, tl.int32), mask=p < K)


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
        width = max(256, triton.next_power_of_2(w))   # at least the histogram's bins
        _short_rows_kernel[(t,)](
            x, ks, ke, out, cmap if cmap is not None else out, x.stride(0), out.stride(0),
            cmap.stride(0) if cmap is not None else 0, ks_offset, out_offset, k,
            W=width, HAS_CMAP=cmap is not None, FINITE_ONLY=finite_only,
            num_warps=16 if width >= 16384 else 8 if width >= 4096 else 4)
    return out
