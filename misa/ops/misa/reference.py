"""MISA routed scoring and MISA-dagger (hierarchical) selection, on one chunk of queries.

    Ihat[t, s] = sum_{j in routed(t)} w[t, j] * relu(q[t, j] . k[s])      (weights not renormalised)

MISA: top-k of ``Ihat``. MISA-dagger: keep the top ``stage1_k`` tokens by ``Ihat``, re-score them with
all heads (the DSA formula) and return their top-k.
"""
from __future__ import annotations

import torch

from ..dsa.reference import dsa_logits, visible_mask
from ..topk.reference import select_topk


def gather_heads(q: torch.Tensor, weights: torch.Tensor, heads: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's routed ``q [T, h, D]`` and ``weights [T, h]``."""
    idx = heads.long()
    q_r = torch.gather(q, 1, idx[:, :, None].expand(-1, -1, q.shape[2]))
    return q_r, torch.gather(weights, 1, idx)


def misa_logits(q, k, weights, heads, ks, ke, key_offset: int = 0) -> torch.Tensor:
    q_r, w_r = gather_heads(q, weights, heads)
    return dsa_logits(q_r, k, w_r, ks, ke, key_offset)


def rerank(candidates: torch.Tensor, q, k, weights, ks, ke, k_top: int, key_offset: int = 0
           ) -> torch.Tensor:
    """Top-``k_top`` columns among ``candidates [T, W]`` (bool), scored with the full DSA formula.

    The DSA logits are computed densely for the window and read at the candidates: identical values
    to what DSA computes, so a candidate set holding every visible key reproduces DSA exactly.
    """
    full = dsa_logits(q, k, weights, ks, ke, key_offset)
    return select_topk(full, candidates & visible_mask(ks, ke, k.shape[0], key_offset), k_top)


def misa_select_chunk(q, k, weights, heads, ks, ke, k_top: int, stage1_k: int | None,
                      key_offset: int = 0) -> torch.Tensor:
    """Selected columns (relative to ``key_offset``) ``[T, k_top]`` int64, -1 padded."""
    ihat = misa_logits(q, k, weights, heads, ks, ke, key_offset)
    visible = visible_mask(ks, ke, k.shape[0], key_offset)
    if stage1_k is None:
        return select_topk(ihat, visible, k_top)
    stage1 = select_topk(ihat, visible, stage1_k)
    candidates = torch.zeros_like(visible)
    rows = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(stage1)
    keep = stage1 >= 0
    candidates[rows[keep], stage1[keep]] = True
    return rerank(candidates, q, k, weights, ks, ke, k_top, key_offset)
