"""Block-pruned decode in plain PyTorch, the math the kernels in ``triton.py`` follow.

Inputs as ``misa.paged_*`` takes them (``q [B, N, H, D]``, ``weights [B * N, H]``, ``context_lens
[B]``, ``block_table [B, P]``) plus the pooled-key cache ``pooled [num_pages, D]`` (bfloat16 or float32), row
``p`` the sum of the dequantised keys written to page ``p``. A block is ``G = block_size / 64``
consecutive pages of a sequence; its mean key is the sum of its pages' rows over the number of
cached tokens it holds (``min(block_size, context_len - start)``). Query ``i`` of sequence ``b``
(row ``b * N + i``) sees positions ``[0, context_lens[b] - N + i + 1)``.

    score[row, j] = sum_h w[row, h] relu(q[row, h] . mean_key(block j))   +inf for the first and
                    the last visible block, -inf for blocks starting at or past the visible end
"""
from __future__ import annotations

import torch

from ... import quant


def kept_blocks(k: int, block_size: int, block_k: int) -> int:
    """Blocks HISA keeps per query: ``block_k``, or more where a partial first and last block
    could otherwise leave fewer than ``k`` candidate tokens (every row must return
    ``min(k, visible)`` positions): ``max(block_k, ceil(k / block_size) + 2)``."""
    return max(block_k, -(-k // block_size) + 2)


def _visible_ends(context_lens: torch.Tensor, n: int) -> torch.Tensor:
    return (context_lens.long()[:, None] - n + 1 + torch.arange(n, device=context_lens.device)).reshape(-1)


def block_scores(q, pooled, weights, context_lens, block_table, block_size: int, max_blocks: int) -> torch.Tensor:
    """``[B * N, max_blocks]`` float32 block scores (see the module docstring)."""
    b, n, h, d = q.shape
    g = block_size // quant.PAGE_SIZE
    ends = _visible_ends(context_lens, n)
    out = torch.full((b * n, max_blocks), float("-inf"), dtype=torch.float32, device=q.device)
    for s in range(b):
        ctx = int(context_lens[s])
        nblk = -(-ctx // block_size)
        pages = block_table[s, : -(-ctx // quant.PAGE_SIZE)].long()
        sums = pooled[pages].double()
        sums = torch.cat([sums, sums.new_zeros(nblk * g - sums.shape[0], d)]).view(nblk, g, d).sum(1)
        counts = (ctx - torch.arange(nblk, device=q.device) * block_size).clamp(max=block_size)
        kbar = sums / counts[:, None].double()
        for i in range(n):
            row = s * n + i
            scores = (weights[row].double()[:, None] * (q[s, i].double() @ kbar.t()).relu()).sum(0)
            ke = int(ends[row])
            last = (ke - 1) // block_size
            scores[last + 1:] = float("-inf")
            scores[0] = scores[last] = float("inf")
            out[row, :nblk] = scores.float()
    return out


def chosen_block_logits(q, kv_cache, weights, context_lens, block_table, blocks, block_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact DSA scores of each row's chosen ``blocks [B * N, m]`` (block ids, -1 = none):
    ``(scores [B * N, m * block_size] float32, positions [B * N, m * block_size] int32)``, block
    slot j's tokens in columns ``[j * block_size, (j + 1) * block_size)``; -inf / -1 where the slot
    is empty or the position is not visible."""
    b, n, h, d = q.shape
    m = blocks.shape[1]
    ends = _visible_ends(context_lens, n)
    scores = torch.full((b * n, m * block_size), float("-inf"), dtype=torch.float32, device=q.device)
    pos = torch.full((b * n, m * block_size), -1, dtype=torch.int32, device=q.device)
    for s in range(b):
        k_fp8, k_scale = quant.read_paged_kcache(kv_cache, block_table[s], int(context_lens[s]))
        keys = quant.dequantize_keys(k_fp8, k_scale).double()
        for i in range(n):
            row = s * n + i
            ke = int(ends[row])
            for j, blk in enumerate(blocks[row].tolist()):
                if blk < 0:
                    continue
                p = torch.arange(blk * block_size, min((blk + 1) * block_size, ke), device=q.device)
                if p.numel() == 0:
                    continue
                sc = (weights[row].double()[:, None] * (q[s, i].double() @ keys[p].t()).relu()).sum(0)
                scores[row, j * block_size: j * block_size + p.numel()] = sc.float()
                pos[row, j * block_size: j * block_size + p.numel()] = p.int()
    return scores, pos


def prefill_block_ranges(ks: torch.Tensor, ke: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill HISA: each query's visible blocks of ``block_size`` keys, ``[bks, bke)`` int32, from its
    keys ``[ks, ke)``: ``bks = ks // B`` and ``bke = ceil(ke / B)``, or ``bke = bks`` (no block) when
    ``ks == ke``."""
    ks, ke = ks.long(), ke.long()
    bks = ks // block_size
    bke = torch.where(ke > ks, (ke + block_size - 1) // block_size, bks)
    return bks.int(), bke.int()


def force_edge_blocks(scores: torch.Tensor, bks: torch.Tensor, bke: torch.Tensor) -> torch.Tensor:
    """Prefill HISA keeps each query's first and last visible block: ``scores [T, >= max bke]`` get
    +inf at columns ``bks`` and ``bke - 1`` of every row with a visible block (in place)."""
    rows = (bke > bks).nonzero().flatten()
    scores[rows, bks[rows].long()] = float("inf")
    scores[rows, bke[rows].long() - 1] = float("inf")
    return scores


def block_positions(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Prefill HISA's candidates: the key positions of each kept block, ``[T, m * block_size]``
    int32, block ``j`` of ``blocks [T, m]`` at columns ``[j * B, (j + 1) * B)``; an empty slot
    (block -1) gives -1s."""
    pos = blocks.long()[:, :, None] * block_size + torch.arange(block_size)
    return torch.where(blocks[:, :, None] >= 0, pos, -1).flatten(1).int()
