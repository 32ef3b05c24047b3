"""The public prefill functions of SPEC section 3: validate, then hand over to ``misa.select``.

Shared arguments (every function):

- ``q [T, H, D]``: queries, float8_e4m3fn (its per-(token, head) scales folded into ``weights``,
  see ``misa.quantize_queries``), bfloat16 or float32.
- ``kv``: keys, either ``(k_fp8 [S, D] float8_e4m3fn, k_scale [S] float32)`` (the engines'
  index-K layout, ``misa.quantize_keys``) or one bfloat16 / float32 tensor ``[S, D]``.
- ``weights [T, H]`` float32: the indexer's per-(query, head) weights.
- ``ks, ke [T]`` int32: query ``t`` sees keys ``[ks[t], ke[t])`` (causal prefill: ``ks = 0``,
  ``ke = t + 1``; packed chunks: each sequence's own range).
- ``workspace_bytes`` (keyword, default None): an upper bound on the largest intermediate, in
  bytes; queries are processed in chunks that stay under it. None: 1 GiB for the CPU reference,
  4 GiB on the GPU (a 4096 x 131072 selection in one chunk). Smaller means less memory and more,
  smaller launches.
- ``backend`` (keyword, default None = ``"auto"``): ``"auto"`` runs the Triton kernels for CUDA
  tensors of fp8 / bf16 whose head count and head dim are powers of two, the PyTorch reference
  otherwise; ``"triton"`` insists on the kernels (ValueError if they cannot run the inputs);
  ``"reference"`` runs the reference. The environment variable ``MISA_BACKEND`` replaces ``"auto"``.

Selections are ``[T, k]`` int32 absolute key positions, ``-1`` padded where fewer than ``k`` keys
are visible (exactly ``min(k, ke - ks)`` positions per row); their order within a row is
unspecified (the references return ascending positions), ties at the k-th score may go either way.
Kernels and references agree up to floating-point rounding. Bad input raises ``ValueError`` naming
the argument; validation reads the device once per call.
"""
from __future__ import annotations

import torch

from . import select
from .ops.router.reference import DEFAULT_ROUTER, ROUTER_STATISTICS
from .validate import (LOGITS_DTYPES, DeferredChecks, check_hisa_budget, check_inputs, check_int, check_logits_dtype,
                       check_ranges, check_stage1_k, check_tensor, finish_checks)

ROUTER_DOC = "gap (the default), abs-sum (the paper's), sum, max, qnorm, top-blocks"


def check_router(router: str) -> str:
    if router not in ROUTER_STATISTICS:
        raise ValueError(f"router: expected one of {ROUTER_STATISTICS}, got {router!r}")
    return router


def check_workspace(workspace_bytes):
    if workspace_bytes is not None:
        check_int("workspace_bytes", workspace_bytes)
    return workspace_bytes


def dsa_logits(q, kv, weights, ks, ke, *, backend: str | None = None) -> torch.Tensor:
    """DSA indexer logits: ``[T, S]`` float32, ``sum_j w[t,j] relu(q[t,j] . k[s])`` (times the key's
    scale) inside ``[ks[t], ke[t])`` and -inf elsewhere. Arguments: see the module docstring."""
    inp = check_inputs(q, kv, weights, ks, ke)
    return select.dsa_logits(inp, backend=select.check_backend_arg(backend))


def topk_indices(logits, ks, ke, k: int, *, backend: str | None = None) -> torch.Tensor:
    """Positions of the ``k`` largest ``logits [T, S]`` (float32 or bfloat16, no NaN) inside ``[ks, ke)``
    (``[T]`` int32 each): ``[T, k]`` int32, -1 padded, exactly ``min(k, ke - ks)`` per row; ties
    at the k-th value may go either way. The kernel is a radix/sample top-k (one read of each row)."""
    check_tensor("logits", logits, 2, LOGITS_DTYPES)
    check_int("k", k)
    checks = DeferredChecks()
    check_ranges(ks, ke, logits.shape[0], logits.shape[1], logits.device, checks)
    checks.add("logits", "contains NaN", torch.isnan(logits))
    checks.run()
    return select.topk_indices(logits, ks, ke, k, backend=select.check_backend_arg(backend))


def _deferred(inp, run):
    """``run()`` on inputs whose value checks are still queued (``check_inputs(defer=True)``: the
    kernel path reads them back once its launches are queued). Any ``ValueError`` first reads them
    back, so a bad input is reported before a bad argument, as with checks read back at once."""
    try:
        return run()
    except ValueError:
        finish_checks(inp)
        raise


def dsa_select(q, kv, weights, ks, ke, k: int = 2048, *, workspace_bytes: int | None = None,
               backend: str | None = None, logits_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tokens DSA's lightning indexer keeps: the top ``k`` (default 2048) of ``dsa_logits`` per
    query, ``[T, k]`` int32. ``logits_dtype``: None or ``torch.float32`` (default), or
    ``torch.bfloat16``: the logits are rounded to bfloat16 (nearest even) before the top-k, which
    halves their memory and traffic on the kernels; the keys tied at the k-th bfloat16 value are
    then scored again in float32, so the selection is the float32 one (up to keys whose float32
    scores differ only in the fp8 MMAs' last bits, and classes of more than 256 tied keys). Other
    arguments: see the module docstring."""
    inp = check_inputs(q, kv, weights, ks, ke, defer=True)
    return _deferred(inp, lambda: select.dsa_select(inp, check_int("k", k), check_workspace(workspace_bytes),
                                                    backend=select.check_backend_arg(backend),
                                                    logits_dtype=check_logits_dtype(logits_dtype)))


def route_heads(q, kv, weights, ks, ke, active_heads: int = 8, block_size: int = 1024, *,
                router: str = DEFAULT_ROUTER, workspace_bytes: int | None = None,
                backend: str | None = None) -> torch.Tensor:
    """MISA's router: each query's ``active_heads`` (default 8, at most H) heads with the largest
    router score over its visible keys mean-pooled in blocks of ``block_size`` (default 1024).
    ``[T, active_heads]`` int32 head ids, ascending.

    ``router``: the statistic, one of gap (the default: the heads that best separate the block DSA
    ranks first from the rest), abs-sum (the paper's: ``sum_b |w relu(q . kbar_b)|``), sum, max,
    qnorm, top-blocks (SPEC section 2). The GPU kernel implements gap and abs-sum; the others run
    the reference. gap is the default because on trained indexers of a real model it keeps far
    more of DSA's quality (docs/results.md, "The default router"); abs-sum reproduces the paper.
    Other arguments: see the module docstring."""
    inp = check_inputs(q, kv, weights, ks, ke)
    check_int("active_heads", active_heads, 1, inp.num_heads)
    check_int("block_size", block_size)
    return select.route_heads(inp, active_heads, block_size, check_router(router),
                              check_workspace(workspace_bytes), backend=select.check_backend_arg(backend))


def misa_select(q, kv, weights, ks, ke, k: int = 2048, active_heads: int = 8, block_size: int = 1024,
                stage1_k: int | None = None, *, router: str = DEFAULT_ROUTER,
                workspace_bytes: int | None = None, backend: str | None = None,
                logits_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MISA: route each query to ``active_heads`` heads (``route_heads``, with ``block_size`` and
    ``router``), score the keys with those heads only, keep the top ``k``: ``[T, k]`` int32.

    With ``stage1_k`` (>= k; the paper uses 8192) this is MISA†: keep the top ``stage1_k`` by the
    routed score, re-score them with all heads and return their top ``k``. With ``active_heads ==
    H`` MISA selects exactly what DSA selects. ``logits_dtype``: as for ``dsa_select``, for the
    routed logits; MISA†'s stage 1 keeps either of two keys tied at its k1-th bfloat16 value (its
    re-scoring is float32). Other arguments: see the module docstring."""
    inp = check_inputs(q, kv, weights, ks, ke, defer=True)

    def run():
        check_int("k", k)
        check_int("active_heads", active_heads, 1, inp.num_heads)
        check_int("block_size", block_size)
        return select.misa_select(inp, k, active_heads, block_size, check_stage1_k(stage1_k, k),
                                  check_router(router), check_workspace(workspace_bytes),
                                  backend=select.check_backend_arg(backend),
                                  logits_dtype=check_logits_dtype(logits_dtype))
    return _deferred(inp, run)


def hisa_select(q, kv, weights, ks, ke, k: int = 2048, block_size: int = 128, block_k: int = 64, *,
                workspace_bytes: int | None = None, backend: str | None = None) -> torch.Tensor:
    """HISA (block pruning, all heads): score keys mean-pooled in blocks of ``block_size`` (default
    128) with the DSA formula, keep the ``block_k`` (default 64, >= 2) best blocks (the first and
    the last visible block always among them), score their tokens exactly with DSA and return the
    top ``k``: ``[T, k]`` int32. ``block_k * block_size`` must be >= ``k``, or fewer than ``k``
    tokens could be returned. Other arguments: see the module docstring."""
    inp = check_inputs(q, kv, weights, ks, ke, defer=True)

    def run():
        check_int("k", k)
        check_int("block_size", block_size)
        check_hisa_budget(k, block_size, block_k)
        return select.hisa_select(inp, k, block_size, block_k, check_workspace(workspace_bytes),
                                  backend=select.check_backend_arg(backend))
    return _deferred(inp, run)


__all__ = ["dsa_logits", "topk_indices", "dsa_select", "route_heads", "misa_select", "hisa_select"]
