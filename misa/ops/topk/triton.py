"""Triton top-k: the ``k`` largest columns of each row inside its ``[ks, ke)`` range.

One program per row; floats are mapped to order-preserving uint32 keys.

Fast path (rows of at least ``2 * SAMPLE`` columns): a spread-out sample of ``SAMPLE`` columns is
sorted in registers, and a sample quantile safely below the k-th value (expected rank plus four
standard deviations) becomes a cut; one pass over the row moves every element at or above the cut
into a scratch buffer of ``~2k`` entries, where a 4 x 8-bit radix select finds the exact threshold.
So a long row is read once (plus a 1/64 sample), whatever k is.

General path (short rows, or when the cut misses: fewer than k or more than the scratch above
it): a histogram of the top 8 key bits over the row finds the bin holding the k-th value; while
that bin is larger than the scratch, further 8-bit rounds run over the row; then one pass writes
every element above the bin and moves the bin into the scratch for the remaining rounds.

Ties at the threshold go to the lowest columns. Output order within a row is unspecified; rows
with fewer than ``k`` eligible columns are padded with -1. (Triton's ``tl.histogram`` costs about
one operation per bin and element on the GPU, so digits stay at 8 bits.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dsa.triton import INTERPRET

# (elements per step, num_warps, sample size): benchmarks/sweep_kernels.py. The interpreter sorts
# slowly, so CI runs the same code with a smaller sample.
DEFAULT_CONFIG = (1024, 4, 256) if INTERPRET else (1024, 8, 2048)


def scratch_size(k: int, width: int) -> int:
    """Scratch entries per row: room for the fast path's ~1.75 k candidates."""
    return max(1, min(width, max(4096, 2 * k + 1024)))


@triton.jit
def _ordered_key(x):
    """float32 -> uint32 with the same order (-inf smallest)."""
    u = x.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) == 1, ~u, u | 0x80000000)


@triton.jit
def _position(c, cmap_row, out_offset, HAS_CMAP: tl.constexpr, mask):
    if HAS_CMAP:
        return tl.load(cmap_row + c, mask=mask, other=-1)
    return c + out_offset


@triton.jit
def _eligible_keys(x_row, c, ke, FINITE_ONLY: tl.constexpr):
    m = c < ke
    x = tl.load(x_row + c, mask=m, other=0.0)
    if FINITE_ONLY:
        m = m & (x > float("-inf"))
    return _ordered_key(x), m


@triton.jit
def _threshold_digit(hist, bins, k_rem):
    """In a histogram of one digit: the digit holding the ``k_rem``-th largest element, the count
    strictly above it and the count in it."""
    rc = tl.cumsum(hist, axis=0, reverse=True)              # elements at or above each digit
    digit = tl.sum((rc >= k_rem).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    inside = tl.sum(tl.where(bins == digit, hist, 0), axis=0)
    return digit, above, inside


@triton.jit
def _topk_kernel(X, KS, KE, OUT, CMAP, SCR_KEY, SCR_COL,
                 stride_x, stride_out, stride_cmap, stride_scr, ks_offset, out_offset, K, CAP,
                 BLOCK: tl.constexpr, SAMPLE: tl.constexpr, HAS_CMAP: tl.constexpr,
                 FINITE_ONLY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    out_row = OUT + row * stride_out
    cmap_row = CMAP + row * stride_cmap
    scr_key = SCR_KEY + row * stride_scr
    scr_col = SCR_COL + row * stride_scr
    ks = tl.load(KS + row) - ks_offset
    ke = tl.load(KE + row) - ks_offset
    n = ke - ks
    lane = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    n_out = 0
    n_scr = 0
    k_rem = K
    prefix = tl.zeros([], dtype=tl.uint32)
    shift = 0
    write_all = (n <= K) & (not FINITE_ONLY)

    fast = n < 0
    if (n >= 2 * SAMPLE) & (not write_all):
        # cut = a sample quantile safely below the k-th largest value
        i = tl.arange(0, SAMPLE)
        chunk = i // 16
        pos = ks + (chunk * n) // (SAMPLE // 16) + i % 16
        sample = tl.load(x_row + pos, mask=pos < ke, other=float("-inf"))
        ranked = tl.sort(_ordered_key(sample), descending=True)
        expect = K.to(tl.float32) * SAMPLE / n.to(tl.float32)
        r = tl.minimum((expect + 4.0 * tl.sqrt(expect) + 16.0).to(tl.int32), SAMPLE - 1)
        cut = tl.max(tl.where(i == r, ranked, 0), axis=0)
        for start in range(ks, ke, BLOCK):
            c = start + lane
            key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
            keep = m & (key >= cut)
            spos = n_scr + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(scr_key + spos, key.to(tl.int32, bitcast=True), mask=keep & (spos < CAP))
            tl.store(scr_col + spos, c, mask=keep & (spos < CAP))
            n_scr += tl.sum(keep.to(tl.int32), axis=0)
        fast = (n_scr >= K) & (n_scr <= CAP)

    if fast:
        # first 8-bit round over the scratch
        h = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n_scr, BLOCK):
            j = start + lane
            m = j < n_scr
            key = tl.load(scr_key + j, mask=m, other=0).to(tl.uint32, bitcast=True)
            h += tl.histogram((key >> 24).to(tl.int32), 256, mask=m)
        digit, above, cnt = _threshold_digit(h, bins, k_rem)
        k_rem -= above
        prefix = digit.to(tl.uint32)
        shift = 24
    else:
        n_scr = 0
        h = tl.zeros([256], dtype=tl.int32)
        for start in range(ks, ke, BLOCK):
            key, m = _eligible_keys(x_row, start + lane, ke, FINITE_ONLY)
            h += tl.histogram((key >> 24).to(tl.int32), 256, mask=m)
        total = tl.sum(h, axis=0)
        if write_all | (total <= K):
            # every eligible column is selected; pad the rest with -1
            for start in range(ks, ke, BLOCK):
                c = start + lane
                key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
                pos = n_out + tl.cumsum(m.to(tl.int32), axis=0) - 1
                tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, m), mask=m)
                n_out += tl.sum(m.to(tl.int32), axis=0)
            for start in range(n_out, K, BLOCK):
                j = start + lane
                tl.store(out_row + j, tl.full([BLOCK], -1, tl.int32), mask=j < K)
        else:
            digit, above, cnt = _threshold_digit(h, bins, k_rem)
            k_rem -= above
            prefix = digit.to(tl.uint32)
            shift = 24
            # the threshold bin does not fit the scratch: refine over the whole row
            while (cnt > CAP) & (shift > 0):
                h = tl.zeros([256], dtype=tl.int32)
                for start in range(ks, ke, BLOCK):
                    key, m = _eligible_keys(x_row, start + lane, ke, FINITE_ONLY)
                    m = m & ((key >> shift) == prefix)
                    h += tl.histogram(((key >> (shift - 8)) & 255).to(tl.int32), 256, mask=m)
                digit, above, cnt = _threshold_digit(h, bins, k_rem)
                k_rem -= above
                prefix = (prefix << 8) | digit.to(tl.uint32)
                shift -= 8
            # write what lies above the bin; move the bin (or, all bits fixed, its ties) on
            n_tie = 0
            for start in range(ks, ke, BLOCK):
                c = start + lane
                key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
                top = key >> shift
                take = m & (top > prefix)
                match = m & (top == prefix)
                if shift == 0:
                    rank = n_tie + tl.cumsum(match.to(tl.int32), axis=0)
                    n_tie += tl.sum(match.to(tl.int32), axis=0)
                    take = take | (match & (rank <= k_rem))
                else:
                    spos = n_scr + tl.cumsum(match.to(tl.int32), axis=0) - 1
                    tl.store(scr_key + spos, key.to(tl.int32, bitcast=True), mask=match)
                    tl.store(scr_col + spos, c, mask=match)
                    n_scr += tl.sum(match.to(tl.int32), axis=0)
                pos = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
                tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, take), mask=take)
                n_out += tl.sum(take.to(tl.int32), axis=0)

    # remaining 8-bit rounds over the scratch, then write its winners
    if (shift > 0) & (n_scr > 0):
        while shift > 0:
            h = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n_scr, BLOCK):
                j = start + lane
                m = j < n_scr
                key = tl.load(scr_key + j, mask=m, other=0).to(tl.uint32, bitcast=True)
                m = m & ((key >> shift) == prefix)
                h += tl.histogram(((key >> (shift - 8)) & 255).to(tl.int32), 256, mask=m)
            digit, above, cnt = _threshold_digit(h, bins, k_rem)
            k_rem -= above
            prefix = (prefix << 8) | digit.to(tl.uint32)
            shift -= 8
        n_tie = 0
        for start in range(0, n_scr, BLOCK):
            j = start + lane
            m = j < n_scr
            key = tl.load(scr_key + j, mask=m, other=0).to(tl.uint32, bitcast=True)
            c = tl.load(scr_col + j, mask=m, other=0)
            tie = m & (key == prefix)
            rank = n_tie + tl.cumsum(tie.to(tl.int32), axis=0)
            n_tie += tl.sum(tie.to(tl.int32), axis=0)
            take = (m & (key > prefix)) | (tie & (rank <= k_rem))
            pos = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, take), mask=take)
            n_out += tl.sum(take.to(tl.int32), axis=0)


def topk(x: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int, ks_offset: int = 0,
         out_offset: int = 0, cmap: torch.Tensor | None = None, finite_only: bool = False,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Top-``k`` columns of ``x [T, W]`` f32 per row, among columns ``[ks - ks_offset, ke - ks_offset)``.

    Returns ``[T, k]`` int32: ``cmap[row, col]`` when ``cmap`` is given, else ``col + out_offset``;
    -1 padded. ``finite_only`` also skips -inf entries (candidate lists with holes). ``config``:
    (elements per step, num_warps, sample size).
    """
    t, w = x.shape
    out = torch.empty(t, k, dtype=torch.int32, device=x.device)
    if t == 0:
        return out
    block, warps, sample = config or DEFAULT_CONFIG
    cap = scratch_size(k, w)
    scr_key = torch.empty(t, cap, dtype=torch.int32, device=x.device)
    scr_col = torch.empty(t, cap, dtype=torch.int32, device=x.device)
    _topk_kernel[(t,)](
        x, ks, ke, out, cmap if cmap is not None else out, scr_key, scr_col,
        x.stride(0), out.stride(0), cmap.stride(0) if cmap is not None else 0, scr_key.stride(0),
        ks_offset, out_offset, k, cap,
        BLOCK=block, SAMPLE=sample, HAS_CMAP=cmap is not None, FINITE_ONLY=finite_only, num_warps=warps,
    )
    return out


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int) -> torch.Tensor:
    return topk(logits, ks, ke, k)
