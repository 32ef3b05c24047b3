"""MISA's head router: block mean-pooled keys, per-head scores over the visible blocks, top-h heads.

    kbar[b]  = mean of the dequantised keys of block b (a partial last block averages its real tokens)
    r[t, j]  = sum_b | w[t, j] * relu(q[t, j] . kbar[b]) |    over blocks [floor(ks/B), ceil(ke/B))

``abs-sum`` is the paper's statistic; ``gap`` (below) is the library's default (``DEFAULT_ROUTER``:
on trained indexers of a real model it keeps far more of DSA's quality, see docs/results.md,
"The default router"); the others are named options for studying the router: ``sum`` (signed),
``max`` (largest block), ``qnorm`` (``|w| * ||q||``, keys ignored), ``top-blocks`` (only the query's ``TOP_BLOCKS`` best pooled blocks by the DSA formula
vote, each with abs-sum: blocks the query will not read cannot pull a head in), ``gap`` (see below).

``gap`` keeps the heads that most separate, in DSA's direction, the block DSA would rank first
from the rest. With ``P[t, j, b] = relu(q[t, j] . kbar[b])`` on the visible blocks and
``b*(t) = argmax_b sum_j w[t, j] P[t, j, b]`` (the all-head pooled DSA score: the products abs-sum
already needs, ties to the lower block):

    r[t, j] = w[t, j] * ( P[t, j, b*] - mean_{visible b != b*} P[t, j, b] )     (the mean is 0 when b* is
                                                                                  the only visible block)

Signed: a head with w < 0 scores high when it is quieter on b* than elsewhere (it suppresses the
rest), a head with w > 0 when it is louder on b*. Unlike abs-sum it does not reward heads that are
large everywhere (near-constant offsets that cancel between heads of opposite sign and do not
discriminate); see docs/results.md, "Why MISA's router falls short here".
"""
from __future__ import annotations

import torch

from ..dsa.reference import head_scores

ROUTER_STATISTICS = ("abs-sum", "sum", "max", "qnorm", "top-blocks", "gap")
DEFAULT_ROUTER = "gap"
TOP_BLOCKS = 8


def pool_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """``k [S, D]`` f32 -> ``kbar [ceil(S / B), D]`` f32."""
    s, d = k.shape
    nb = -(-s // block_size)
    padded = torch.zeros(nb * block_size, d, dtype=k.dtype, device=k.device)
    padded[:s] = k
    sums = padded.view(nb, block_size, d).sum(dim=1)
    counts = torch.clamp(s - torch.arange(nb, device=k.device) * block_size, max=block_size)
    return sums / counts[:, None].to(k.dtype)


def visible_blocks(ks: torch.Tensor, ke: torch.Tensor, num_blocks: int, block_size: int,
                   block_offset: int = 0) -> torch.Tensor:
    """``[T, NB]`` bool: block ``block_offset + c`` lies in ``[floor(ks/B), ceil(ke/B))``."""
    b = torch.arange(block_offset, block_offset + num_blocks, device=ks.device)
    lo = torch.div(ks, block_size, rounding_mode="floor")
    hi = torch.div(ke + block_size - 1, block_size, rounding_mode="floor")
    return (b[None, :] >= lo[:, None]) & (b[None, :] < hi[:, None])


def head_router_scores(q: torch.Tensor, kbar: torch.Tensor, weights: torch.Tensor,
                       visible: torch.Tensor, statistic: str = "abs-sum") -> torch.Tensor:
    """``r [T, H]`` f32 from ``q [T, H, D]``, ``kbar [NB, D]``, ``weights [T, H]``, ``visible [T, NB]``."""
    if statistic == "qnorm":
        return weights.abs() * q.norm(dim=-1)
    scores = head_scores(q, kbar) * visible[:, None, :]          # [T, H, NB], 0 on hidden blocks
    if statistic == "abs-sum":
        return weights.abs() * scores.sum(dim=-1)
    if statistic == "sum":
        return weights * scores.sum(dim=-1)
    if statistic == "top-blocks":
        per = weights[:, :, None] * scores                       # [T, H, NB] signed contributions
        nb = per.shape[-1]
        if nb == 0:
            return torch.zeros_like(weights)
        block = per.sum(dim=1).masked_fill(~visible, float("-inf"))
        keep = torch.zeros_like(visible).scatter_(1, block.topk(min(TOP_BLOCKS, nb), dim=1).indices, True)
        return (per.abs() * (keep & visible)[:, None, :]).sum(dim=-1)
    if statistic == "gap":
        if scores.shape[-1] == 0:
            return torch.zeros_like(weights)
        block = (weights[:, :, None] * scores).sum(dim=1).masked_fill(~visible, float("-inf"))
        best = torch.zeros_like(visible).scatter_(1, block.argmax(dim=1, keepdim=True), True) & visible
        rest = visible & ~best
        at_best = (scores * best[:, None, :]).sum(dim=-1)
        rest_mean = (scores * rest[:, None, :]).sum(dim=-1) / rest.sum(dim=1).clamp_min(1)[:, None]
        return weights * (at_best - rest_mean)
    if statistic == "max":
        return weights.abs() * scores.amax(dim=-1) if scores.shape[-1] else torch.zeros_like(weights)
    raise ValueError(f"router: unknown statistic {statistic!r}, expected one of {ROUTER_STATISTICS}")


def top_heads(r: torch.Tensor, active_heads: int) -> torch.Tensor:
    """The ``active_heads`` largest router scores per query, ties to the lower head, returned in
    ascending head order (so ``h = H`` reproduces DSA's head order exactly): ``[T, h]`` int64."""
    order = torch.sort(r, dim=1, descending=True, stable=True).indices[:, :active_heads]
    return torch.sort(order, dim=1).values
