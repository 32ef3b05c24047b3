"""The tie break in PyTorch: for each row whose top-k recorded a tie class larger than the ties it
took, the class's keys are scored with the DSA formula over the row's heads
(``rescore.reference.gather_logits``, in the inputs' dtype),

    score[c] = sum_j w[t, j] * relu(q[t, j] . k[c])        (j over ``heads[t]``, or all heads)

and the best of them (equal scores: the lower position first) fill the row's last ``k_rem`` slots.
"""
from __future__ import annotations

import torch

from ..dsa.reference import gather_heads
from ..rescore.reference import gather_logits


def break_ties(q, k, weights, out, ties, heads=None) -> torch.Tensor:
    """``q [T, H, D]``, ``k [S, D]`` (dequantised) and ``weights [T, H]`` float (float64 for exact
    scores), ``out [T, K]`` the top-k's positions (ties in each row's last slots), ``ties [T,
    TIE_WIDTH]`` its record; ``heads [T, h]``: each row's routed heads (None: all). Returns a copy
    of ``out`` with every breakable row's last ``k_rem`` slots holding the class's best (rows whose
    class is larger than the record holds, or no larger than the ties taken, unchanged)."""
    out = out.clone()
    cap = (ties.shape[1] - 2) // 2
    n, taken = ties[:, cap].long(), ties[:, cap + 1].long()
    slot = torch.arange(cap, device=ties.device)
    cand = torch.where(slot[None, :] < n[:, None], ties[:, :cap], -1)         # the class, -1 past it
    if heads is not None:
        q, weights = gather_heads(q, weights, heads)
    everywhere = torch.zeros_like(n), torch.full_like(n, k.shape[0])
    scores = gather_logits(q, k, weights, cand, *everywhere)
    kk = out.shape[1]
    for t in torch.nonzero((taken > 0) & (taken < n) & (n <= cap)).flatten().tolist():
        cols, score, r = cand[t, :n[t]].long(), scores[t, :n[t]], int(taken[t])
        # best score first, equal scores by position: sort by position, then stably by score
        by_pos = torch.argsort(cols)
        order = by_pos[torch.argsort(-score[by_pos], stable=True)]
        out[t, kk - r:] = cols[order[:r]].to(out.dtype)
    return out
