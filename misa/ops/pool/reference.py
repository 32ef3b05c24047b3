"""The pooled-key cache's math in plain PyTorch (loops over sequences): the kernels' reference.

    pooled[p]      = sum of the dequantised keys of the tokens page p holds (misa/quant.py),
                     summed in float32, stored in the pooled cache's dtype (bfloat16 by default)
    kbar[b, j]     = (sum of the rows of block j's pages) / (tokens of sequence b in block j)

Inputs as ``misa.ops.pool`` checks them (page ids inside the cache, enough table columns).
"""
from __future__ import annotations

import torch

from ...quant import FP8, PAGE_SIZE, POOLED_DTYPE, _page_views


def _page_sums(kv_cache: torch.Tensor, pages: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """float32 ``[len(pages), D]``: the sum of each page's first ``counts`` dequantised keys."""
    values, scales, _ = _page_views(kv_cache)
    k = values[pages].view(FP8).float() * scales[pages][..., None]
    real = torch.arange(PAGE_SIZE, device=kv_cache.device)[None, :] < counts[:, None]
    # slots past the page's tokens hold garbage (NaN included): where, not a multiply by 0
    return torch.where(real[..., None], k, torch.zeros((), device=k.device)).sum(dim=1)


def repool_written_pages(kv_cache: torch.Tensor, pooled: torch.Tensor, slots: torch.Tensor) -> None:
    """Re-sum into ``pooled`` each page that ``slots`` (int64 ``[N]``) touch, over its tokens up to
    the highest offset written there (``misa.write_paged_kcache``)."""
    page, offset = slots // PAGE_SIZE, slots % PAGE_SIZE
    last = torch.full((pooled.shape[0],), -1, dtype=torch.long, device=slots.device)
    last.scatter_reduce_(0, page, offset, "amax")
    touched = torch.nonzero(last >= 0).flatten()
    pooled[touched] = _page_sums(kv_cache, touched, last[touched] + 1).to(pooled.dtype)


def pool_paged_kcache(kv_cache: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                      dtype: torch.dtype = POOLED_DTYPE) -> torch.Tensor:
    """``pooled [num_pages, D]`` (``dtype``): page ``block_table[b, j]`` (``j < ceil(context_lens[b] / 64)``)
    holds the sum of its first ``min(64, context_lens[b] - 64 j)`` dequantised keys; other pages 0."""
    values, scales, d = _page_views(kv_cache)
    out = torch.zeros(values.shape[0], d, dtype=dtype, device=kv_cache.device)
    for b, n in enumerate(context_lens.tolist()):
        pages = -(-n // PAGE_SIZE)
        if pages <= 0:
            continue
        ids = block_table[b, :pages].long()
        counts = (n - torch.arange(pages, device=kv_cache.device) * PAGE_SIZE).clamp(max=PAGE_SIZE)
        out[ids] = _page_sums(kv_cache, ids, counts).to(dtype)
    return out


def pool_blocks(pooled: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                block_size: int, max_blocks: int) -> torch.Tensor:
    """``kbar [B, max_blocks, D]`` float32: block ``j`` of sequence ``b`` is the mean dequantised key
    (the pooled rows taken as float32) of its tokens ``[j * block_size, min((j + 1) * block_size, context_lens[b]))``, from the page
    sums; blocks past the sequence are 0 (blocks past ``max_blocks`` are not computed).
    ``block_size`` a multiple of the page size."""
    per_block = block_size // PAGE_SIZE
    b_count, d = context_lens.shape[0], pooled.shape[1]
    out = torch.zeros(b_count, max_blocks, d, dtype=torch.float32, device=pooled.device)
    for b, n in enumerate(context_lens.tolist()):
        n = min(n, max_blocks * block_size)
        if n <= 0:
            continue
        pages, nb = -(-n // PAGE_SIZE), -(-n // block_size)
        rows = torch.zeros(nb * per_block, d, dtype=torch.float32, device=pooled.device)
        rows[:pages] = pooled[block_table[b, :pages].long()]
        sums = rows.view(nb, per_block, d).sum(dim=1)
        counts = torch.clamp(n - torch.arange(nb, device=pooled.device) * block_size, max=block_size)
        out[b, :nb] = sums / counts[:, None].float()
    return out
