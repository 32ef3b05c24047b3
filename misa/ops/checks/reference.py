"""What the value checks of a selection's inputs compute, in PyTorch.

``input_flags`` returns an int64 vector: one entry per name of ``FLAGS`` (1 = that check failed),
then ``min(ks)`` and ``max(ke)``. NaN in float8_e4m3fn is S.1111.111 (it has no infinity).
"""
from __future__ import annotations

import torch

from ...quant import FP8

FLAGS = ("q", "k", "k_scale", "weights", "ks_negative", "ks_after_ke", "ke_past_keys")


def not_finite(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == FP8:
        return ((x.view(torch.uint8) & 0x7F) == 0x7F).any()
    return (~torch.isfinite(x)).any()


def input_flags(q, k, k_scale, weights, ks, ke, num_keys: int) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.bool, device=q.device)
    flags = [not_finite(q), not_finite(k),
             (~torch.isfinite(k_scale) | (k_scale <= 0)).any() if k_scale is not None else zero,
             not_finite(weights), (ks < 0).any(), (ks > ke).any(), (ke > num_keys).any()]
    big = torch.iinfo(torch.int32).max
    extent = [ks.min() if ks.numel() else torch.tensor(big, device=q.device),
              ke.max() if ke.numel() else torch.tensor(0, device=q.device)]
    return torch.stack([f.to(torch.int64) for f in flags] + [e.to(torch.int64) for e in extent])


PAGED_FLAGS = ("q", "weights", "context_lens_short", "block_table_narrow", "page_outside_cache")


def paged_flags(q, weights, context_lens, block_table, num_pages: int, page_size: int, *,
                out: torch.Tensor | None = None, sanitize: bool = False) -> torch.Tensor:
    """The decode inputs' checks: ``PAGED_FLAGS`` then ``max(context_lens)`` (0 for no sequence).
    A sequence must hold at least ``next_n`` tokens; the table must have a column for each of its
    pages, and those columns must name pages of the cache (columns past them are never read).

    ``out``: the int64 vector to write them to (else a new one). ``sanitize``: after checking, clamp
    ``context_lens`` in place into ``[next_n, columns * page_size]`` and set every page id of the
    table's columns those lengths use that lies outside ``[0, num_pages)`` to 0, so that a selection
    run on them reads only the cache whatever the input (needs ``num_pages >= 1`` and
    ``columns * page_size >= next_n``)."""
    n = q.shape[1]
    pages = (context_lens.long() + page_size - 1) // page_size
    cols = torch.arange(block_table.shape[1], device=q.device)[None, :]
    outside = (block_table < 0) | (block_table >= num_pages)
    flags = [not_finite(q), not_finite(weights), (context_lens < n).any(), (pages > block_table.shape[1]).any(),
             ((cols < pages[:, None]) & outside).any()]
    longest = context_lens.max() if context_lens.numel() else torch.tensor(0, device=q.device)
    result = torch.stack([f.to(torch.int64) for f in flags] + [longest.to(torch.int64)])
    if sanitize:
        context_lens.clamp_(n, block_table.shape[1] * page_size)
        used = cols < ((context_lens.long() + page_size - 1) // page_size)[:, None]
        block_table.masked_fill_(used & outside, 0)
    if out is None:
        return result
    return out.copy_(result)
