"""HISA, the peer method MISA is compared with: prune key blocks, keep every head.

Keys are mean-pooled in blocks of ``B``; blocks are scored with the full DSA formula on the pooled
keys; the first and the last visible block are always kept; the top ``m`` blocks survive, and their
tokens are scored exactly with DSA for the final top-k.
"""
from __future__ import annotations

import torch

from ..dsa.reference import dsa_logits
from ..misa.reference import rerank
from ..router.reference import visible_blocks
from ..topk.reference import select_topk


def block_logits(q, kbar, weights, visible_blk: torch.Tensor) -> torch.Tensor:
    """DSA formula on pooled keys, ``[T, NB]``, -inf on hidden blocks."""
    scores = torch.bmm(weights[:, None, :], torch.matmul(q, kbar.t()).relu_()).squeeze(1)
    return scores.masked_fill_(~visible_blk, float("-inf"))


def hisa_select_chunk(q, k, kbar, weights, ks, ke, k_top: int, block_size: int, block_k: int,
                      key_offset: int = 0) -> torch.Tensor:
    """``k`` covers absolute positions ``[key_offset, key_offset + W)``, ``key_offset`` a multiple of
    ``block_size``; ``kbar`` the pooled blocks of that window. Returns columns ``[T, k_top]``, -1 padded."""
    first_block = key_offset // block_size
    vis = visible_blocks(ks, ke, kbar.shape[0], block_size, first_block)
    scores = block_logits(q, kbar, weights, vis)
    lo = torch.div(ks, block_size, rounding_mode="floor") - first_block
    hi = torch.div(ke + block_size - 1, block_size, rounding_mode="floor") - 1 - first_block
    nonempty = ke > ks
    rows = torch.arange(q.shape[0], device=q.device)[nonempty]
    scores[rows, lo[nonempty]] = float("inf")     # always keep the first and the last visible block
    scores[rows, hi[nonempty]] = float("inf")
    kept = select_topk(scores, vis, block_k)
    keep_blk = torch.zeros_like(vis)
    r = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(kept)
    ok = kept >= 0
    keep_blk[r[ok], kept[ok]] = True
    candidates = keep_blk.repeat_interleave(block_size, dim=1)[:, : k.shape[0]]
    return rerank(candidates, q, k, weights, ks, ke, k_top, key_offset)
