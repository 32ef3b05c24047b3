"""The pooled-key cache: one bfloat16 row per page of the paged index-K cache, the sum of the page's
dequantised keys (layout and upkeep in misa/quant.py: ``new_pooled_kcache``, ``write_paged_kcache``).

``pool_paged_kcache`` builds it from a cache; ``repool_written_pages`` keeps it current as
``write_paged_kcache`` writes; ``pool_blocks`` turns it into the router's block means (what
``misa.ops.router.triton.paged_pool_keys`` computes from the raw cache, reading ``2 D`` bytes a
page instead of ``64 (D + 4)``: 33x fewer at D = 128). Both check their arguments (``ValueError`` naming the argument; the value
checks are read back with one synchronisation) and run the Triton kernel (``triton.py``) or the
PyTorch reference (``reference.py``) as ``misa.select.use_kernels`` decides from ``backend``
(None: ``"auto"``, or the ``MISA_BACKEND`` override). The unchecked ``triton`` / ``reference``
functions take the same arguments, for callers that have checked them already.
"""
from __future__ import annotations

import torch

from ...quant import PAGE_SIZE, POOLED_DTYPE, POOLED_DTYPES, _page_views, check_pooled_dtype
from . import reference

__all__ = ["pool_paged_kcache", "pool_blocks", "repool_written_pages"]


def _check_table(block_table, context_lens, num_pages: int, device, tokens_cap: int | None = None) -> None:
    """Table and lengths: shapes, dtypes, device, then (one sync) lengths >= 0, enough columns,
    page ids of the used columns inside ``[0, num_pages)``; ``tokens_cap``: read no further."""
    from ...validate import DeferredChecks, check_tensor
    check_tensor("block_table", block_table, 2, (torch.int32,))
    check_tensor("context_lens", context_lens, 1, (torch.int32,))
    b = block_table.shape[0]
    if context_lens.shape[0] != b:
        raise ValueError(f"context_lens: expected [{b}] (one per block_table row), got {tuple(context_lens.shape)}")
    for name, x in (("block_table", block_table), ("context_lens", context_lens)):
        if x.device != device:
            raise ValueError(f"{name}: on {x.device}, the cache on {device}")
    if not b:
        return
    checks = DeferredChecks()
    checks.add("context_lens", "must be >= 0", context_lens < 0)
    lens = context_lens.long()
    if tokens_cap is not None:
        lens = lens.clamp(max=tokens_cap)
    pages = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    checks.add("block_table", "too few columns for the longest context", pages > block_table.shape[1])
    used = torch.arange(block_table.shape[1], device=device)[None, :] < pages[:, None]
    checks.add("block_table", "page id outside the cache", used & ((block_table < 0) | (block_table >= num_pages)))
    checks.run()


def pool_paged_kcache(kv_cache: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor, *,
                      dtype: torch.dtype = POOLED_DTYPE, backend: str | None = None) -> torch.Tensor:
    """A pooled-key cache built from scratch: ``[num_pages, D]`` ``dtype`` (bfloat16 or float32) where page
    ``block_table[b, j]`` (``j < ceil(context_lens[b] / 64)``) holds the sum of the dequantised keys of
    its first ``min(64, context_lens[b] - 64 j)`` tokens, and pages no sequence uses are 0. A page
    several sequences list (a shared prefix) must hold as many tokens for each (full pages do).

    ``kv_cache [num_pages, 64, 1, D + 4]`` uint8; ``block_table [B, max_pages]`` int32;
    ``context_lens [B]`` int32; ``backend`` None / "auto" / "triton" / "reference"."""
    from ... import select
    select.check_backend_arg(backend)
    check_pooled_dtype(dtype)
    values, _, _ = _page_views(kv_cache)
    _check_table(block_table, context_lens, values.shape[0], kv_cache.device)
    if select.use_kernels(backend, kv_cache):
        from . import triton as pool_triton
        return pool_triton.pool_paged_kcache(kv_cache, block_table, context_lens, dtype)
    return reference.pool_paged_kcache(kv_cache, block_table, context_lens, dtype)


def repool_written_pages(kv_cache: torch.Tensor, pooled: torch.Tensor, slots: torch.Tensor) -> None:
    """Re-sum into ``pooled`` each page the int64 cache ``slots`` touch, over its tokens up to the
    highest offset written there. Unchecked: ``misa.write_paged_kcache`` checks and calls it after
    writing the tokens (kernels as ``misa.select.use_kernels`` decides for the cache's device)."""
    from ... import select
    if select.use_kernels(None, kv_cache):
        from . import triton as pool_triton
        return pool_triton.repool_written_pages(kv_cache, pooled, slots)
    return reference.repool_written_pages(kv_cache, pooled, slots)


def pool_blocks(pooled: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                max_blocks: int, *, backend: str | None = None) -> torch.Tensor:
    """The router's pooled blocks from the pooled-key cache: ``kbar [B, max_blocks, D]`` float32, block
    ``j`` of sequence ``b`` the mean dequantised key of its tokens ``[j * block_size,
    min((j + 1) * block_size, context_lens[b]))``, 0 past the sequence; a sequence longer than
    ``max_blocks * block_size`` is cut there (as ``paged_pool_keys``). ``block_size`` a multiple of 64.

    ``pooled [num_pages, D]`` bfloat16 or float32 (``misa.new_pooled_kcache``); ``block_table``, ``context_lens``
    as for ``pool_paged_kcache``."""
    from ... import select
    from ...validate import check_int, check_tensor
    select.check_backend_arg(backend)
    check_tensor("pooled", pooled, 2, POOLED_DTYPES)
    check_int("block_size", block_size)
    if block_size % PAGE_SIZE:
        raise ValueError(f"block_size: must be a multiple of the page size {PAGE_SIZE}, got {block_size}")
    check_int("max_blocks", max_blocks, 0)
    _check_table(block_table, context_lens, pooled.shape[0], pooled.device, max_blocks * block_size)
    if select.use_kernels(backend, pooled):
        from . import triton as pool_triton
        return pool_triton.pool_blocks(pooled, block_table, context_lens, block_size, max_blocks)
    return reference.pool_blocks(pooled, block_table, context_lens, block_size, max_blocks)
