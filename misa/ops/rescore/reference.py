"""Re-scoring of candidate lists with all heads: MISA-dagger's second stage and HISA's exact stage.

    score[t, c] = sum_j w[t, j] * relu(q[t, j] . k[cand[t, c]])    -inf where cand < 0 or outside [ks, ke)

then the top ``k`` candidates by that score, returned as key positions (``-1`` padded).
"""
from __future__ import annotations

import torch

from ..topk.reference import select_topk


def gather_logits(q, k, weights, cand, ks, ke) -> torch.Tensor:
    """``q [T, H, D]`` f32, ``k [S, D]`` f32 (dequantised), ``weights [T, H]``, ``cand [T, C]`` int
    positions (-1 = hole) -> ``[T, C]`` f32 DSA scores, -inf at holes and outside ``[ks, ke)``."""
    pos = cand.long()
    ok = (pos >= 0) & (pos >= ks[:, None].long()) & (pos < ke[:, None].long())
    keys = k[pos.clamp_min(0)]                                            # [T, C, D]
    scores = torch.einsum("thd,tcd->thc", q, keys).relu_()                # [T, H, C]
    logits = torch.bmm(weights[:, None, :], scores).squeeze(1)
    return logits.masked_fill_(~ok, float("-inf"))


def rerank(q, k, weights, cand, ks, ke, k_top: int) -> torch.Tensor:
    """The ``k_top`` best candidates by ``gather_logits``: ``[T, k_top]`` int32 positions, -1 padded."""
    scores = gather_logits(q, k, weights, cand, ks, ke)
    cols = select_topk(scores, torch.isfinite(scores), k_top)
    picked = torch.gather(cand.long(), 1, cols.clamp_min(0))
    return torch.where(cols >= 0, picked, -1).int()
