"""Triton kernels of the pooled-key cache (misa/ops/pool/reference.py has the math).

``pool_paged_kcache``: one program per (sequence, table column), reading its page in place (fp8
values, then the page's float32 scales, DeepGEMM's layout) and storing the float32 sum of the
page's valid tokens' dequantised keys, rounded to the row's dtype; columns past a sequence's length
store nothing, so pages no sequence uses keep the zeros the output starts with. A page two
sequences share (prefix caching shares full pages) is stored by each with the same value.

``repool_written_pages``: the same sum for each page a cache write touched, up to its highest
written offset, one program per written slot (sorted, so a page's last slot is the one that stores).

``pool_blocks``: one program per (sequence, block), flattened like ``_paged_pool_keys_kernel``
(misa/ops/router/triton.py): it adds the rows of the block's pages and divides by the block's
token count, which is what that kernel computes from the raw cache, up to float32 rounding (it
sums per token slot across the pages first, then across slots; here per page, then across pages).

Grids come from shapes only: neither launch reads ``context_lens`` on the host. Inputs as
``misa.ops.pool`` checks them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import quant
from ..triton_common import rounded


@triton.jit
def _page_sum(VALUES, SCALES, page, count, D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr,
              TOK: tl.constexpr):
    """float32 ``[DP]``: the sum of page ``page``'s first ``count`` dequantised keys (fp8 values,
    then the page's float32 scales, DeepGEMM's layout)."""
    d = tl.arange(0, DP)
    dm = d < D
    page_bytes = PAGE * (D + 4)
    base = VALUES + page * page_bytes
    sbase = SCALES + page * (page_bytes // 4) + (PAGE * D) // 4
    acc = tl.zeros([TOK, DP], dtype=tl.float32)
    # TOK tokens a step (all 64 at D <= 128): the sum over tokens once, at the end
    for t0 in tl.static_range(0, PAGE, TOK):
        off = t0 + tl.arange(0, TOK)
        real = off < count          # slots past the page's tokens hold garbage
        k = tl.load(base + off[:, None] * D + d[None, :], mask=real[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        scale = tl.load(sbase + off, mask=real, other=0.0)
        acc += k * scale[:, None]
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["max_pages"])
def _pool_pages_kernel(VALUES, SCALES, TABLE, CTX, OUT, max_pages, stride_table, stride_table_col,
                       D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr, TOK: tl.constexpr):
    pid = tl.program_id(0)
    seq = pid // max_pages
    col = pid - seq * max_pages
    count = tl.minimum(tl.load(CTX + seq) - col * PAGE, PAGE)       # the page's valid tokens
    if count > 0:
        page = tl.load(TABLE + seq.to(tl.int64) * stride_table + col * stride_table_col).to(tl.int64)
        d = tl.arange(0, DP)
        total = _page_sum(VALUES, SCALES, page, count, D, DP, PAGE, TOK)
        tl.store(OUT + page * D + d, rounded(total, OUT.dtype.element_ty), mask=d < D)


def _tokens_per_step(dp: int) -> int:
    return max(1, min(quant.PAGE_SIZE, 8192 // dp))      # at most 8192 values in flight per step


def pool_paged_kcache(kv_cache: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                      dtype: torch.dtype = quant.POOLED_DTYPE) -> torch.Tensor:
    """``pooled [num_pages, D]`` built from the cache (see ``reference.pool_paged_kcache``)."""
    values, _, d = quant._page_views(kv_cache)
    out = torch.zeros(values.shape[0], d, dtype=dtype, device=kv_cache.device)
    b, max_pages = context_lens.shape[0], block_table.shape[1]
    if b * max_pages:
        dp = triton.next_power_of_2(d)
        flat = kv_cache.reshape(-1)
        _pool_pages_kernel[(b * max_pages,)](
            flat.view(quant.FP8), flat.view(torch.float32), block_table, context_lens, out, max_pages,
            block_table.stride(0), block_table.stride(1), D=d, DP=dp, PAGE=quant.PAGE_SIZE,
            TOK=_tokens_per_step(dp), num_warps=4)
    return out


@triton.jit(do_not_specialize=["n"])
def _repool_kernel(VALUES, SCALES, SLOTS, OUT, n, D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr,
                   TOK: tl.constexpr):
    # SLOTS ascending: the last slot of each page (the page's highest written offset) re-sums the
    # page's tokens up to it; the page's other slots do nothing, so no two programs race on a row
    i = tl.program_id(0)
    slot = tl.load(SLOTS + i)
    page = slot // PAGE
    following = tl.load(SLOTS + i + 1, mask=i + 1 < n, other=-1)
    if (i + 1 >= n) | (following // PAGE != page):
        d = tl.arange(0, DP)
        total = _page_sum(VALUES, SCALES, page, slot - page * PAGE + 1, D, DP, PAGE, TOK)
        tl.store(OUT + page * D + d, rounded(total, OUT.dtype.element_ty), mask=d < D)


def repool_written_pages(kv_cache: torch.Tensor, pooled: torch.Tensor, slots: torch.Tensor) -> None:
    """Re-sum into ``pooled`` every page ``slots`` (int64 ``[N]``, written to ``kv_cache``) touch, up
    to the page's highest written offset (see ``reference.repool_written_pages``). One sort and one
    launch; no host sync."""
    _, _, d = quant._page_views(kv_cache)
    if slots.numel():
        dp = triton.next_power_of_2(d)
        flat = kv_cache.reshape(-1)
        _repool_kernel[(slots.numel(),)](
            flat.view(quant.FP8), flat.view(torch.float32), torch.sort(slots).values, pooled, slots.numel(),
            D=d, DP=dp, PAGE=quant.PAGE_SIZE, TOK=_tokens_per_step(dp), num_warps=4)


@triton.jit(do_not_specialize=["block_size", "max_blocks"])
def _pool_blocks_kernel(POOLED, TABLE, CTX, OUT, block_size, max_blocks, stride_pooled, stride_pooled_col,
                        stride_table, stride_table_col,
                        D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr, PT: tl.constexpr):
    # one program per (sequence, block), flattened so that neither count meets the 65535 limit of
    # grid axes 1 and 2; blocks past a sequence's length store zeros (kbar is then fully defined)
    pid = tl.program_id(0)
    seq = pid // max_blocks
    start = (pid - seq * max_blocks) * block_size
    end = tl.minimum(start + block_size, tl.load(CTX + seq))
    d = tl.arange(0, DP)
    dm = d < D
    last = (end + PAGE - 1) // PAGE            # the block's pages: [start / PAGE, last)
    acc = tl.zeros([PT, DP], dtype=tl.float32)
    for p0 in range(start // PAGE, last, PT):  # PT pages a step (a whole block of up to 1024 tokens)
        pg = p0 + tl.arange(0, PT)
        m = pg < last
        ids = tl.load(TABLE + seq.to(tl.int64) * stride_table + pg * stride_table_col, mask=m, other=0).to(tl.int64)
        acc += tl.load(POOLED + ids[:, None] * stride_pooled + d[None, :] * stride_pooled_col,
                       mask=m[:, None] & dm[None, :], other=0.0).to(tl.float32)
    count = tl.maximum(end - start, 1)
    tl.store(OUT + pid.to(tl.int64) * D + d, tl.sum(acc, axis=0) / count.to(tl.float32), mask=dm)


def pool_blocks(pooled: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                block_size: int, max_blocks: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``kbar [B, max_blocks, D]`` float32 from the pooled-key cache (see ``reference.pool_blocks``),
    written into ``out`` when given (a contiguous buffer of that shape)."""
    d = pooled.shape[1]
    b = context_lens.shape[0]
    if out is None:
        out = torch.empty(b, max_blocks, d, dtype=torch.float32, device=pooled.device)
    if b * max_blocks * d:
        pt = min(16, triton.next_power_of_2(block_size // quant.PAGE_SIZE))
        _pool_blocks_kernel[(b * max_blocks,)](
            pooled, block_table, context_lens, out, block_size, max_blocks, pooled.stride(0), pooled.stride(1),
            block_table.stride(0), block_table.stride(1), D=d, DP=triton.next_power_of_2(d),
            PAGE=quant.PAGE_SIZE, PT=pt, num_warps=4)
    return out
