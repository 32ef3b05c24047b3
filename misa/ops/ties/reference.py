"""The tie break in PyTorch (float64): for each row whose top-k recorded a tie class larger than the
ties it took, the class's keys are scored with the DSA formula over the row's heads,

    score[c] = sum_j w[t, j] * relu(q[t, j] . k[c])        (j over ``heads[t]``, or all heads)

and the best of them (equal scores: the lower position first) fill the row's last ``k_rem`` slots.
"""
from __future__ import annotations

import torch


def tie_class(ties: torch.Tensor, row: int) -> tuple[torch.Tensor, int, int]:
    """A ``topk(..., record_ties=True)`` record: (the class's positions, its size, the ties taken)."""
    cap = (ties.shape[1] - 2) // 2
    n, taken = int(ties[row, cap]), int(ties[row, cap + 1])
    return ties[row, :min(n, cap)].long(), n, taken


def break_ties(q, k, weights, out, ties, heads=None) -> torch.Tensor:
    """``q [T, H, D]`` f32, ``k [S, D]`` f32 (dequantised), ``weights [T, H]``, ``out [T, K]`` the
    top-k's positions (ties in each row's last slots), ``ties [T, TIE_WIDTH]`` its record; ``heads
    [T, h]``: each row's routed heads (None: all). Returns a copy of ``out`` with every breakable
    row's last ``k_rem`` slots holding the class's best (rows whose class is larger than the record
    holds, or no larger than the ties taken, unchanged)."""
    out = out.clone()
    cap = (ties.shape[1] - 2) // 2
    kk = out.shape[1]
    for t in range(out.shape[0]):
        cols, n, taken = tie_class(ties, t)
        if not 0 < taken < n <= cap:
            continue
        j = heads[t].long() if heads is not None else torch.arange(q.shape[1], device=q.device)
        qt, wt = q[t, j].double(), weights[t, j].double()
        score = (wt[:, None] * (qt @ k[cols].double().t()).relu()).sum(0)
        # best score first, equal scores by position: sort by position, then stably by score
        by_pos = torch.argsort(cols)
        order = by_pos[torch.argsort(-score[by_pos], stable=True)]
        out[t, kk - taken:] = cols[order[:taken]].to(out.dtype)
    return out
