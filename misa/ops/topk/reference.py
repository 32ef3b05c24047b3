"""Top-k selection inside each query's visible range, by value, with a canonical tie-break.

Ties at the k-th value go to the lowest key position, so two selectors that see the same scores
pick the same tokens whatever order they computed them in (this is what makes "MISA with h = H
selects exactly what DSA selects" testable bit for bit).
"""
from __future__ import annotations

import torch


def select_topk(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the ``k`` largest eligible scores per row, ascending, ``-1`` padded: ``[T, k]`` int64.

    ``scores [T, W]`` float (finite where eligible), ``eligible [T, W]`` bool. Exactly
    ``min(k, eligible.sum(row))`` columns are returned per row.
    """
    t, w = scores.shape
    out = torch.full((t, k), -1, dtype=torch.int64, device=scores.device)
    if t == 0 or w == 0:
        return out
    lowest = torch.finfo(scores.dtype).min
    masked = torch.where(eligible, scores.clamp_min(lowest), torch.full_like(scores, float("-inf")))
    kk = min(k, w)
    kth = torch.topk(masked, kk, dim=1, sorted=True).values[:, kk - 1 : kk]   # k-th largest value
    above = (masked > kth) & eligible
    room = kk - above.sum(dim=1, keepdim=True)
    at = (masked == kth) & eligible
    chosen = above | (at & (torch.cumsum(at, dim=1) <= room))   # ties: lowest positions first
    slot = torch.cumsum(chosen, dim=1) - 1
    rows, cols = chosen.nonzero(as_tuple=True)
    out[rows, slot[rows, cols]] = cols
    return out


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int,
                 key_offset: int = 0) -> torch.Tensor:
    """Absolute key positions of the top-``k`` logits inside ``[ks, ke)``: ``[T, k]`` int32, -1 padded.

    ``logits [T, W]`` covers absolute positions ``[key_offset, key_offset + W)``.
    """
    pos = torch.arange(key_offset, key_offset + logits.shape[1], device=logits.device)
    eligible = (pos[None, :] >= ks[:, None]) & (pos[None, :] < ke[:, None])
    cols = select_topk(logits, eligible, k)
    return torch.where(cols >= 0, cols + key_offset, cols).int()
