"""HISA on the kernels: pooled-block scores with all heads (the dense logits kernel on the bf16
mean keys), forced first/last visible block, radix top-m blocks, then the exact DSA scores of the
``m * B`` candidate tokens (the gathered re-scoring kernel) and their top-k."""
from __future__ import annotations

import torch

from ...select import query_chunks
from ..dsa.triton import launch_logits
from ..misa.triton import rerank
from ..router.triton import pool_keys
from ..topk.triton import topk


def hisa_select(inp, k: int, block_size: int, block_k: int, workspace_bytes: int | None = None) -> torch.Tensor:
    kbar = pool_keys(inp.k, inp.k_scale, block_size).to(torch.bfloat16)
    nb = kbar.shape[0]
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    offsets = torch.arange(block_size, dtype=torch.int32, device=inp.q.device)
    # workspace per query: block scores, candidate ids and their scores, the top-k scratch
    per_query = 4 * nb + 16 * block_k * block_size
    for t0, t1, _, _ in query_chunks(inp, 0, workspace_bytes, bytes_per_query=per_query):
        rows = slice(t0, t1)
        ks, ke = inp.ks[rows], inp.ke[rows]
        nonempty = ke > ks
        bks = torch.div(ks, block_size, rounding_mode="floor").int()
        bke = torch.where(nonempty, torch.div(ke + block_size - 1, block_size, rounding_mode="floor").int(), bks)
        scores = torch.empty(t1 - t0, max(nb, 1), dtype=torch.float32, device=inp.q.device)
        launch_logits(inp.q[rows], inp.weights[rows], kbar, None, bks, bke, scores)
        r = torch.arange(t1 - t0, device=inp.q.device)[nonempty]
        scores[r, bks[nonempty].long()] = float("inf")      # always keep the first and last visible block
        scores[r, bke[nonempty].long() - 1] = float("inf")
        blocks = topk(scores, bks, bke, block_k)             # [t, m] block ids, -1 padded
        cand = torch.where(blocks[:, :, None] >= 0, blocks[:, :, None] * block_size + offsets, -1)
        out[rows] = rerank(inp, cand.reshape(t1 - t0, -1), k, rows)
    return out
