"""The public functions of SPEC section 3: validate, then hand over to ``misa.select``.

Shapes: ``q [T, H, D]`` (float8_e4m3fn, bfloat16 or float32); ``kv`` either ``(k_fp8 [S, D],
k_scale [S] float32)`` or one bfloat16/float32 tensor ``[S, D]``; ``weights [T, H]`` float32;
``ks, ke [T]`` int32, query ``t`` seeing keys ``[ks[t], ke[t])``. Selections are ``[T, k]`` int32
absolute key positions, ``-1`` padded where fewer than ``k`` keys are visible; their order within a
row is unspecified (the references return ascending positions).

Every function runs on the CPU (PyTorch references) and on CUDA (Triton kernels where present);
results agree up to floating-point rounding. Bad input raises ``ValueError`` naming the argument.
``workspace_bytes`` bounds the largest intermediate of the chunked computation (default 1 GiB).
"""
from __future__ import annotations

import torch

from . import select
from .ops.router.reference import ROUTER_STATISTICS
from .validate import DeferredChecks, check_inputs, check_int, check_ranges, check_stage1_k, check_tensor


def _check_router(router: str) -> str:
    if router not in ROUTER_STATISTICS:
        raise ValueError(f"router: expected one of {ROUTER_STATISTICS}, got {router!r}")
    return router


def _check_workspace(workspace_bytes):
    if workspace_bytes is not None:
        check_int("workspace_bytes", workspace_bytes)
    return workspace_bytes


def dsa_logits(q, kv, weights, ks, ke) -> torch.Tensor:
    """DSA indexer logits ``[T, S]`` float32: ``sum_j w[t,j] relu(q[t,j] . k[s])``, -inf outside ``[ks, ke)``."""
    return select.dsa_logits(check_inputs(q, kv, weights, ks, ke))


def topk_indices(logits, ks, ke, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``logits [T, S]`` inside ``[ks, ke)``: ``[T, k]`` int32, -1 padded.

    Exactly ``min(k, ke - ks)`` positions per row; ties at the k-th value may go either way.
    """
    check_tensor("logits", logits, 2, (torch.float32,))
    check_int("k", k)
    checks = DeferredChecks()
    check_ranges(ks, ke, logits.shape[0], logits.shape[1], logits.device, checks)
    checks.add("logits", "contains NaN", torch.isnan(logits))
    checks.run()
    return select.topk_indices(logits, ks, ke, k)


def dsa_select(q, kv, weights, ks, ke, k: int = 2048, *, workspace_bytes: int | None = None) -> torch.Tensor:
    """The tokens DSA's lightning indexer keeps: top-``k`` of ``dsa_logits`` per query."""
    inp = check_inputs(q, kv, weights, ks, ke)
    return select.dsa_select(inp, check_int("k", k), _check_workspace(workspace_bytes))


def route_heads(q, kv, weights, ks, ke, active_heads: int = 8, block_size: int = 1024, *,
                router: str = "abs-sum", workspace_bytes: int | None = None) -> torch.Tensor:
    """MISA's router: the ``active_heads`` heads per query with the largest router score over the
    visible mean-pooled key blocks. ``[T, h]`` int32, ascending head ids."""
    inp = check_inputs(q, kv, weights, ks, ke)
    check_int("active_heads", active_heads, 1, inp.num_heads)
    check_int("block_size", block_size)
    return select.route_heads(inp, active_heads, block_size, _check_router(router),
                              _check_workspace(workspace_bytes))


def misa_select(q, kv, weights, ks, ke, k: int = 2048, active_heads: int = 8, block_size: int = 1024,
                stage1_k: int | None = None, *, router: str = "abs-sum",
                workspace_bytes: int | None = None) -> torch.Tensor:
    """MISA: score keys with each query's ``active_heads`` routed heads, keep the top ``k``.

    With ``stage1_k`` set this is MISA-dagger: keep the top ``stage1_k`` by the routed score,
    re-score them with all heads and return their top ``k``.
    """
    inp = check_inputs(q, kv, weights, ks, ke)
    check_int("k", k)
    check_int("active_heads", active_heads, 1, inp.num_heads)
    check_int("block_size", block_size)
    stage1_k = check_stage1_k(stage1_k, k)
    return select.misa_select(inp, k, active_heads, block_size, stage1_k, _check_router(router),
                              _check_workspace(workspace_bytes))


def hisa_select(q, kv, weights, ks, ke, k: int = 2048, block_size: int = 128, block_k: int = 64, *,
                workspace_bytes: int | None = None) -> torch.Tensor:
    """HISA: keep the ``block_k`` best key blocks (first and last visible always kept) by the DSA
    formula on mean-pooled keys, then the top ``k`` of their tokens by exact DSA scores."""
    inp = check_inputs(q, kv, weights, ks, ke)
    check_int("k", k)
    check_int("block_size", block_size)
    check_int("block_k", block_k, 2)
    return select.hisa_select(inp, k, block_size, block_k, _check_workspace(workspace_bytes))


__all__ = ["dsa_logits", "topk_indices", "dsa_select", "route_heads", "misa_select", "hisa_select"]
