"""Dispatch and chunking: validated inputs -> GPU kernels (CUDA tensors) or PyTorch references.

The references work on a chunk of queries against the window of keys the chunk can see
(``[min ks, max ke)``), so nothing of size ``[T, H, S]`` or ``[T, S]`` is built for a whole input:
chunks are sized so that the largest intermediate stays under ``workspace_bytes``.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from . import quant
from .ops.dsa import reference as dsa_ref
from .ops.hisa import reference as hisa_ref
from .ops.misa import reference as misa_ref
from .ops.router import reference as router_ref
from .ops.topk import reference as topk_ref
from .validate import Inputs

DEFAULT_WORKSPACE_BYTES = 1 << 30


def kernels_enabled(x: torch.Tensor) -> bool:
    """Use the Triton kernels for CUDA tensors, unless ``MISA_DISABLE_KERNELS=1``."""
    if not x.is_cuda or os.environ.get("MISA_DISABLE_KERNELS") == "1":
        return False
    from .ops import kernels_available
    return kernels_available()


# ---------------------------------------------------------------------------------------------
# Reference path helpers
# ---------------------------------------------------------------------------------------------

def float_keys(inp: Inputs) -> torch.Tensor:
    """The dequantised keys ``[S, D]`` float32 the logit uses."""
    if inp.k_scale is not None:
        return quant.dequantize_keys(inp.k, inp.k_scale)
    return inp.k.float()


def query_chunks(inp: Inputs, bytes_per_key: int, workspace_bytes: int | None, align: int = 1
                 ) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(t0, t1, lo, hi)``: queries ``[t0, t1)`` and the key window ``[lo, hi)`` they see.

    ``bytes_per_key`` is the reference's workspace per (query, key) pair; ``lo`` is aligned down to
    ``align`` (block-pooled methods need whole blocks).
    """
    budget = workspace_bytes or DEFAULT_WORKSPACE_BYTES
    t = inp.num_queries
    per_query = max(1, bytes_per_key * max(inp.num_keys, 1))
    step = max(1, min(t, budget // per_query))
    ks, ke = inp.ks.tolist(), inp.ke.tolist()
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        lo, hi = min(ks[t0:t1]), max(ke[t0:t1])
        if hi <= lo:
            lo = hi = min(lo, hi)
        lo -= lo % align
        yield t0, t1, lo, hi


def _chunk_tensors(inp: Inputs, kf: torch.Tensor, t0: int, t1: int, lo: int, hi: int):
    q = inp.q[t0:t1].float()
    return q, kf[lo:hi], inp.weights[t0:t1], inp.ks[t0:t1].long(), inp.ke[t0:t1].long()


def _to_absolute(cols: torch.Tensor, lo: int) -> torch.Tensor:
    return torch.where(cols >= 0, cols + lo, cols).int()


# ---------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------

def dsa_logits(inp: Inputs, workspace_bytes: int | None = None) -> torch.Tensor:
    if kernels_enabled(inp.q):
        from .ops.dsa import triton as dsa_triton
        return dsa_triton.dsa_logits(inp)
    out = torch.full((inp.num_queries, inp.num_keys), float("-inf"), device=inp.q.device)
    kf = float_keys(inp)
    for t0, t1, lo, hi in query_chunks(inp, 4 * inp.num_heads, workspace_bytes):
        q, k, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        out[t0:t1, lo:hi] = dsa_ref.dsa_logits(q, k, w, ks, ke, lo)
    return out


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int) -> torch.Tensor:
    if kernels_enabled(logits):
        from .ops.topk import triton as topk_triton
        return topk_triton.topk_indices(logits, ks, ke, k)
    return topk_ref.topk_indices(logits, ks.long(), ke.long(), k)


def dsa_select(inp: Inputs, k: int, workspace_bytes: int | None = None) -> torch.Tensor:
    if kernels_enabled(inp.q):
        from .ops.dsa import triton as dsa_triton
        return dsa_triton.dsa_select(inp, k, workspace_bytes)
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    kf = float_keys(inp)
    for t0, t1, lo, hi in query_chunks(inp, 4 * inp.num_heads + 16, workspace_bytes):
        q, kc, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        logits = dsa_ref.dsa_logits(q, kc, w, ks, ke, lo)
        out[t0:t1] = _to_absolute(topk_ref.select_topk(logits, dsa_ref.visible_mask(ks, ke, hi - lo, lo), k), lo)
    return out


def route_heads(inp: Inputs, active_heads: int, block_size: int, router: str = "abs-sum",
                workspace_bytes: int | None = None) -> torch.Tensor:
    if kernels_enabled(inp.q) and router == "abs-sum":
        from .ops.router import triton as router_triton
        return router_triton.route_heads(inp, active_heads, block_size)
    kbar = router_ref.pool_keys(float_keys(inp), block_size)
    nb = kbar.shape[0]
    out = torch.empty(inp.num_queries, active_heads, dtype=torch.int32, device=inp.q.device)
    per_query = max(1, 4 * inp.num_heads * nb)
    step = max(1, (workspace_bytes or DEFAULT_WORKSPACE_BYTES) // per_query)
    for t0 in range(0, inp.num_queries, step):
        t1 = min(inp.num_queries, t0 + step)
        vis = router_ref.visible_blocks(inp.ks[t0:t1].long(), inp.ke[t0:t1].long(), nb, block_size)
        r = router_ref.head_router_scores(inp.q[t0:t1].float(), kbar, inp.weights[t0:t1], vis, router)
        out[t0:t1] = router_ref.top_heads(r, active_heads).int()
    return out


def misa_select(inp: Inputs, k: int, active_heads: int, block_size: int, stage1_k: int | None,
                router: str = "abs-sum", workspace_bytes: int | None = None) -> torch.Tensor:
    heads = route_heads(inp, active_heads, block_size, router, workspace_bytes)
    if kernels_enabled(inp.q):
        from .ops.misa import triton as misa_triton
        return misa_triton.misa_select(inp, heads, k, stage1_k, workspace_bytes)
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    kf = float_keys(inp)
    heads_per_pair = inp.num_heads if stage1_k is not None else active_heads
    for t0, t1, lo, hi in query_chunks(inp, 4 * heads_per_pair + 24, workspace_bytes):
        q, kc, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        cols = misa_ref.misa_select_chunk(q, kc, w, heads[t0:t1], ks, ke, k, stage1_k, lo)
        out[t0:t1] = _to_absolute(cols, lo)
    return out


def hisa_select(inp: Inputs, k: int, block_size: int, block_k: int,
                workspace_bytes: int | None = None) -> torch.Tensor:
    if kernels_enabled(inp.q):
        from .ops.hisa import triton as hisa_triton
        return hisa_triton.hisa_select(inp, k, block_size, block_k, workspace_bytes)
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    kf = float_keys(inp)
    kbar = router_ref.pool_keys(kf, block_size)
    for t0, t1, lo, hi in query_chunks(inp, 4 * inp.num_heads + 24, workspace_bytes, align=block_size):
        q, kc, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        blocks = kbar[lo // block_size: -(-hi // block_size)]
        cols = hisa_ref.hisa_select_chunk(q, kc, blocks, w, ks, ke, k, block_size, block_k, lo)
        out[t0:t1] = _to_absolute(cols, lo)
    return out
