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


def paged_rescore(q, kv_cache, weights, context_lens, block_table, cand) -> torch.Tensor:
    """Re-scoring of candidates read from the paged cache, in float64: ``q [B, N, H, D]``,
    ``weights [B * N, H]``, ``context_lens [B]``, ``block_table [B, P]`` (``misa.paged_*``
    conventions), ``cand [B * N, C]`` positions inside each sequence (-1 = hole) ->
    ``[B * N, C]`` float64

        score[r, c] = sum_h w[r, h] * relu(q[r, h] . k[p]) * k_scale[p],   p = cand[r, c]

    key ``p`` of sequence ``b`` read from page ``block_table[b, p // 64]``; -inf at holes and at
    positions past the row's visible end (``context_lens[b] - N + i + 1`` for query ``i``)."""
    from ... import quant
    b, n, h, d = q.shape
    out = torch.full(cand.shape, float("-inf"), dtype=torch.float64, device=cand.device)
    values, scales, _ = quant._page_views(kv_cache)
    for r in range(b * n):
        s, i = divmod(r, n)
        end = int(context_lens[s]) - n + i + 1
        pos = cand[r].long()
        ok = (pos >= 0) & (pos < end)
        p = pos[ok]
        pages = block_table[s].long()[p // quant.PAGE_SIZE]
        offs = p % quant.PAGE_SIZE
        keys = values[pages, offs].view(quant.FP8).double() * scales[pages, offs].double()[:, None]
        per_head = (q[s, i].double() @ keys.t()).relu()                     # [H, C_ok]
        out[r, ok] = weights[r].double() @ per_head
    return out
