"""How close one selection is to another."""
from __future__ import annotations

import torch


def recall(selected: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per query, the fraction of ``reference``'s tokens that ``selected`` also picked.

    Both ``[T, k]`` int, ``-1`` padded (widths may differ). Queries whose reference is empty get
    recall 1. Returns ``[T]`` float32.
    """
    if selected.shape[0] != reference.shape[0]:
        raise ValueError(f"selected: {selected.shape[0]} rows, reference has {reference.shape[0]}")
    ref = reference.long()
    sel = selected.long().to(ref.device)
    # membership by sorting: a reference token is found when it equals its insertion point's value
    sorted_sel = torch.sort(torch.where(sel >= 0, sel, torch.full_like(sel, -2)), dim=1).values
    pos = torch.searchsorted(sorted_sel, ref.clamp_min(0)).clamp_max(sorted_sel.shape[1] - 1)
    found = (torch.gather(sorted_sel, 1, pos) == ref) & (ref >= 0)
    total = (ref >= 0).sum(dim=1)
    out = found.sum(dim=1).float() / total.clamp_min(1).float()
    return torch.where(total > 0, out, torch.ones_like(out))


def page_recall_bound(reference: torch.Tensor, pages: int, page_size: int = 64) -> torch.Tensor:
    """Per query, the most of ``reference``'s tokens that any choice of ``pages`` pages (aligned
    runs of ``page_size`` positions) holds: the recall an oracle page pruner would reach, a bound
    for block-pruned selection keeping that many pages. ``reference [T, k]`` int positions, ``-1``
    padded; returns ``[T]`` float32 (1 for an empty row)."""
    if pages < 0:
        raise ValueError(f"pages: must be >= 0, got {pages}")
    ref = reference.long()
    valid = ref >= 0
    width = int(ref.max()) // page_size + 1 if bool(valid.any()) else 1
    counts = torch.zeros(ref.shape[0], width, dtype=torch.float32, device=ref.device)
    counts.scatter_add_(1, torch.where(valid, ref // page_size, 0), valid.float())
    best = counts.topk(min(pages, width), dim=1).values.sum(dim=1)
    total = valid.sum(dim=1)
    return torch.where(total > 0, best / total.clamp_min(1).float(), torch.ones_like(best))
