"""The selections in plain PyTorch, built from the operations' references (``misa/ops/*/reference.py``).

Each function works on one chunk of queries against a window of dequantised keys ``k [W, D]`` at
absolute positions ``[key_offset, key_offset + W)`` and returns columns relative to ``key_offset``
(``[T, k_top]`` int64, -1 padded, ascending). ``misa.select`` sizes the chunks by memory.

    DSA    top-k of the DSA logits
    MISA   top-k of the routed logits (each query's routed heads only)
    MISA†  top ``stage1_k`` by the routed logits, re-scored with all heads, their top-k
    HISA   keys mean-pooled in blocks of B; blocks scored with the DSA formula on pooled keys; the
           first and the last visible block always kept; the best ``block_k`` blocks' tokens scored
           exactly with DSA; their top-k

Re-scoring here reads the dense DSA logits at the candidates, so a candidate set holding every
visible key reproduces DSA exactly, and ties go to the lowest position (``select_topk``).

``logits_dtype`` (MISA†'s first stage): the dtype the kernels store the logits in before its
top-k; bfloat16 rounds the float32 logits to it (nearest even) here too. DSA and MISA with bfloat16
logits select what float32 logits select: rounding keeps order, so only keys tied at the k-th
bfloat16 value can differ, and the kernels rank those by their float32 scores (``misa.ops.ties``).
"""
from __future__ import annotations

import torch

from .ops.dsa.reference import dsa_logits, routed_logits, visible_mask
from .ops.router.reference import visible_blocks
from .ops.topk.reference import select_topk


def stored_logits(logits: torch.Tensor, logits_dtype: torch.dtype | None) -> torch.Tensor:
    """float32 ``logits`` as the kernels store them in ``logits_dtype`` (None: float32), read back
    as float32."""
    if logits_dtype is None or logits_dtype == torch.float32:
        return logits
    return logits.to(logits_dtype).float()


def dsa_select_chunk(q, k, weights, ks, ke, k_top: int, key_offset: int = 0) -> torch.Tensor:
    """DSA's selection, whatever dtype the kernels store its logits in (see the module docstring)."""
    logits = dsa_logits(q, k, weights, ks, ke, key_offset)
    return select_topk(logits, visible_mask(ks, ke, k.shape[0], key_offset), k_top)


def rerank_mask(candidates: torch.Tensor, q, k, weights, ks, ke, k_top: int, key_offset: int = 0) -> torch.Tensor:
    """Top-``k_top`` columns among ``candidates [T, W]`` (bool), scored with the full DSA formula."""
    full = dsa_logits(q, k, weights, ks, ke, key_offset)
    return select_topk(full, candidates & visible_mask(ks, ke, k.shape[0], key_offset), k_top)


def _mask_of(cols: torch.Tensor, width: int) -> torch.Tensor:
    """``[T, n]`` columns (-1 = none) -> ``[T, width]`` bool."""
    mask = torch.zeros(cols.shape[0], width, dtype=torch.bool, device=cols.device)
    rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)
    keep = cols >= 0
    mask[rows[keep], cols[keep]] = True
    return mask


def misa_select_chunk(q, k, weights, heads, ks, ke, k_top: int, stage1_k: int | None,
                      key_offset: int = 0, logits_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MISA (``stage1_k`` None) or MISA† for routed ``heads [T, h]``; ``logits_dtype`` rounds MISA†'s
    stage-1 logits (MISA selects as float32 whatever it is, see the module docstring)."""
    ihat = routed_logits(q, k, weights, heads, ks, ke, key_offset)
    visible = visible_mask(ks, ke, k.shape[0], key_offset)
    if stage1_k is None:
        return select_topk(ihat, visible, k_top)
    stage1 = select_topk(stored_logits(ihat, logits_dtype), visible, stage1_k)
    return rerank_mask(_mask_of(stage1, k.shape[0]), q, k, weights, ks, ke, k_top, key_offset)


def block_logits(q, kbar, weights, visible_blk: torch.Tensor) -> torch.Tensor:
    """DSA formula on pooled keys ``kbar [NB, D]``: ``[T, NB]``, -inf on hidden blocks."""
    scores = torch.bmm(weights[:, None, :], torch.matmul(q, kbar.t()).relu_()).squeeze(1)
    return scores.masked_fill_(~visible_blk, float("-inf"))


def hisa_blocks(q, kbar, weights, ks, ke, block_size: int, block_k: int, first_block: int = 0) -> torch.Tensor:
    """HISA's kept blocks: ``[T, block_k]`` block ids relative to ``first_block`` (-1 padded), the
    first and the last visible block always among them."""
    vis = visible_blocks(ks, ke, kbar.shape[0], block_size, first_block)
    scores = block_logits(q, kbar, weights, vis)
    lo = torch.div(ks, block_size, rounding_mode="floor") - first_block
    hi = torch.div(ke + block_size - 1, block_size, rounding_mode="floor") - 1 - first_block
    nonempty = ke > ks
    rows = torch.arange(q.shape[0], device=q.device)[nonempty]
    scores[rows, lo[nonempty]] = float("inf")
    scores[rows, hi[nonempty]] = float("inf")
    return select_topk(scores, vis, block_k)


def hisa_select_chunk(q, k, kbar, weights, ks, ke, k_top: int, block_size: int, block_k: int,
                      key_offset: int = 0) -> torch.Tensor:
    """``key_offset`` a multiple of ``block_size``; ``kbar`` the pooled blocks of the window."""
    kept = hisa_blocks(q, kbar, weights, ks, ke, block_size, block_k, key_offset // block_size)
    candidates = _mask_of(kept, kbar.shape[0]).repeat_interleave(block_size, dim=1)[:, : k.shape[0]]
    return rerank_mask(candidates, q, k, weights, ks, ke, k_top, key_offset)
