"""DSA lightning-indexer logits, the math of SPEC section 1 in plain PyTorch.

    I[t, s] = sum_j w[t, j] * relu(q[t, j, :] . k[s, :])     for s in [ks[t], ke[t]), -inf elsewhere

Works on one chunk of queries against a window of keys: ``k`` holds the dequantised keys at absolute
positions ``[key_offset, key_offset + W)``. The caller (``misa.select``) sizes the chunks so that
the ``[T, H, W]`` intermediate stays inside a memory budget.
"""
from __future__ import annotations

import torch


def visible_mask(ks: torch.Tensor, ke: torch.Tensor, width: int, key_offset: int = 0) -> torch.Tensor:
    """``[T, width]`` bool: column ``c`` (absolute ``key_offset + c``) lies in ``[ks, ke)``."""
    pos = torch.arange(key_offset, key_offset + width, device=ks.device)
    return (pos[None, :] >= ks[:, None]) & (pos[None, :] < ke[:, None])


def head_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``relu(q . k)`` per head: ``[T, H, D] x [W, D] -> [T, H, W]`` float32."""
    return torch.matmul(q, k.t()).relu_()


def dsa_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
               ke: torch.Tensor, key_offset: int = 0) -> torch.Tensor:
    """``q [T, H, D]`` f32, ``k [W, D]`` f32 (dequantised), ``weights [T, H]`` f32 -> ``[T, W]`` f32."""
    scores = head_scores(q, k)                                   # [T, H, W]
    logits = torch.bmm(weights[:, None, :], scores).squeeze(1)   # sum_j w[t, j] * scores[t, j, :]
    return logits.masked_fill_(~visible_mask(ks, ke, k.shape[0], key_offset), float("-inf"))


def gather_heads(q: torch.Tensor, weights: torch.Tensor, heads: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's routed ``q [T, h, D]`` and ``weights [T, h]`` (``heads [T, h]`` head ids)."""
    idx = heads.long()
    q_r = torch.gather(q, 1, idx[:, :, None].expand(-1, -1, q.shape[2]))
    return q_r, torch.gather(weights, 1, idx)


def routed_logits(q, k, weights, heads, ks, ke, key_offset: int = 0) -> torch.Tensor:
    """MISA's routed scoring: the DSA formula over each query's ``heads [T, h]`` only,

        Ihat[t, s] = sum_{j in heads[t]} w[t, j] * relu(q[t, j] . k[s])     (weights not renormalised)
    """
    q_r, w_r = gather_heads(q, weights, heads)
    return dsa_logits(q_r, k, w_r, ks, ke, key_offset)
