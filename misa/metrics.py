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
