"""The pooled-key cache's math in plain PyTorch (loops over sequences): the kernels' reference.

    pooled[p]      = sum of the dequantised keys of the tokens page p holds (misa/quant.py)
    kbar[b, j]     = (sum of the rows of block j's pages) / (tokens of sequence b in block j)

Inputs as ``misa.ops.pool`` checks them (page ids inside the cache, enough table columns).
"""
from __future__ import annotations

import torch

from ...quant import FP8, PAGE_SIZE, _page_views


def pool_paged_kcache(kv_cache: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """``pooled [num_pages, D]`` float32: page ``block_table[b, j]`` (``j < ceil(context_lens[b] / 64)``)
    holds the sum of its first ``min(64, context_lens[b] - 64 j)`` dequantised keys; other pages 0."""
    values, scales, d = _page_views(kv_cache)
    out = torch.zeros(values.shape[0], d, dtype=torch.float32, device=kv_cache.device)
    off = torch.arange(PAGE_SIZE, device=kv_cache.device)
    for b, n in enumerate(context_lens.tolist()):
        pages = -(-n // PAGE_SIZE)
        if pages <= 0:
            continue
        ids = block_table[b, :pages].long()
        pos = torch.arange(pages, device=kv_cache.device)[:, None] * PAGE_SIZE + off     # [pages, 64]
        k = values[ids].view(FP8).float() * scales[ids][..., None]
        # unused slots of the last page hold garbage (NaN included): where, not a multiply by 0
        k = torch.where((pos < n)[..., None], k, torch.zeros((), device=k.device))
        out[ids] = k.sum(dim=1)
    return out


def pool_blocks(pooled: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                block_size: int, max_blocks: int) -> torch.Tensor:
    """``kbar [B, max_blocks, D]`` float32: block ``j`` of sequence ``b`` is the mean dequantised key
    of its tokens ``[j * block_size, min((j + 1) * block_size, context_lens[b]))``, from the page
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
