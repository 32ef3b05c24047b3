"""Triton radix select: the top-k columns of each row inside its ``[ks, ke)`` range.

One program per row. Floats are mapped to order-preserving uint32 keys; a histogram of the top 12
bits finds the bin holding the k-th largest value; one more pass writes every element above that
bin and moves the elements of the bin into a small scratch buffer, where two 10-bit rounds find
the exact threshold. So a row is read twice from memory whatever k is (a full sort reads it
log(n) times). If the threshold bin is larger than the scratch (heavy ties), the 10-bit rounds
run over the whole row instead. Ties at the threshold go to the lowest columns. Output order
within a row is unspecified; rows with fewer than ``k`` eligible columns are padded with -1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_CONFIG = (1024, 8)     # (elements per step, num_warps): benchmarks/sweep_kernels.py
MAX_SCRATCH = 8192


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
                 BLOCK: tl.constexpr, HAS_CMAP: tl.constexpr, FINITE_ONLY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    out_row = OUT + row * stride_out
    cmap_row = CMAP + row * stride_cmap
    scr_key = SCR_KEY + row * stride_scr
    scr_col = SCR_COL + row * stride_scr
    ks = tl.load(KS + row) - ks_offset
    ke = tl.load(KE + row) - ks_offset
    lane = tl.arange(0, BLOCK)
    bins12 = tl.arange(0, 4096)
    bins10 = tl.arange(0, 1024)

    hist = tl.zeros([4096], dtype=tl.int32)
    for start in range(ks, ke, BLOCK):
        key, m = _eligible_keys(x_row, start + lane, ke, FINITE_ONLY)
        hist += tl.histogram((key >> 20).to(tl.int32), 4096, mask=m)
    total = tl.sum(hist, axis=0)

    if total <= K:
        # every eligible column is selected; pad the rest with -1
        n_out = 0
        for start in range(ks, ke, BLOCK):
            c = start + lane
            key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
            pos = n_out + tl.cumsum(m.to(tl.int32), axis=0) - 1
            tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, m), mask=m)
            n_out += tl.sum(m.to(tl.int32), axis=0)
        for start in range(total, K, BLOCK):
            j = start + lane
            tl.store(out_row + j, tl.full([BLOCK], -1, tl.int32), mask=j < K)
    else:
        digit, above, cnt = _threshold_digit(hist, bins12, K)
        k_rem = K - above
        prefix = digit.to(tl.uint32)
        shift = 20
        # rare: the threshold bin does not fit the scratch; refine over the whole row
        while (cnt > CAP) & (shift > 0):
            h10 = tl.zeros([1024], dtype=tl.int32)
            for start in range(ks, ke, BLOCK):
                key, m = _eligible_keys(x_row, start + lane, ke, FINITE_ONLY)
                m = m & ((key >> shift) == prefix)
                h10 += tl.histogram(((key >> (shift - 10)) & 1023).to(tl.int32), 1024, mask=m)
            digit, above, cnt = _threshold_digit(h10, bins10, k_rem)
            k_rem -= above
            prefix = (prefix << 10) | digit.to(tl.uint32)
            shift -= 10

        # one pass: write what lies above the prefix; keep the bin (or, all bits fixed, its ties)
        n_out = 0
        n_scr = 0
        n_tie = 0
        for start in range(ks, ke, BLOCK):
            c = start + lane
            key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
            top = key >> shift
            hi = m & (top > prefix)
            match = m & (top == prefix)
            if shift == 0:
                rank = n_tie + tl.cumsum(match.to(tl.int32), axis=0)
                n_tie += tl.sum(match.to(tl.int32), axis=0)
                hi = hi | (match & (rank <= k_rem))
            else:
                spos = n_scr + tl.cumsum(match.to(tl.int32), axis=0) - 1
                tl.store(scr_key + spos, key.to(tl.int32, bitcast=True), mask=match)
                tl.store(scr_col + spos, c, mask=match)
                n_scr += tl.sum(match.to(tl.int32), axis=0)
            pos = n_out + tl.cumsum(hi.to(tl.int32), axis=0) - 1
            tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, hi), mask=hi)
            n_out += tl.sum(hi.to(tl.int32), axis=0)

        # finish the threshold on the scratch, then write its winners
        if shift > 0:
            while shift > 0:
                h10 = tl.zeros([1024], dtype=tl.int32)
                for start in range(0, n_scr, BLOCK):
                    j = start + lane
                    m = j < n_scr
                    key = tl.load(scr_key + j, mask=m, other=0).to(tl.uint32, bitcast=True)
                    m = m & ((key >> shift) == prefix)
                    h10 += tl.histogram(((key >> (shift - 10)) & 1023).to(tl.int32), 1024, mask=m)
                digit, above, cnt = _threshold_digit(h10, bins10, k_rem)
                k_rem -= above
                prefix = (prefix << 10) | digit.to(tl.uint32)
                shift -= 10
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
         config: tuple[int, int] | None = None) -> torch.Tensor:
    """Top-``k`` columns of ``x [T, W]`` f32 per row, among columns ``[ks - ks_offset, ke - ks_offset)``.

    Returns ``[T, k]`` int32: ``cmap[row, col]`` when ``cmap`` is given, else ``col + out_offset``;
    -1 padded. ``finite_only`` also skips -inf entries (candidate lists with holes). ``config``:
    (elements per step, num_warps).
    """
    t, w = x.shape
    out = torch.empty(t, k, dtype=torch.int32, device=x.device)
    if t == 0:
        return out
    block, warps = config or DEFAULT_CONFIG
    cap = max(1, min(MAX_SCRATCH, w))
    scr_key = torch.empty(t, cap, dtype=torch.int32, device=x.device)
    scr_col = torch.empty(t, cap, dtype=torch.int32, device=x.device)
    _topk_kernel[(t,)](
        x, ks, ke, out, cmap if cmap is not None else out, scr_key, scr_col,
        x.stride(0), out.stride(0), cmap.stride(0) if cmap is not None else 0, scr_key.stride(0),
        ks_offset, out_offset, k, cap,
        BLOCK=block, HAS_CMAP=cmap is not None, FINITE_ONLY=finite_only, num_warps=warps,
    )
    return out


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int) -> torch.Tensor:
    return topk(logits, ks, ke, k)
