"""Dispatch and chunking: validated inputs -> the Triton kernels or the PyTorch references.

``use_kernels`` is the one place that decides, from an explicit ``backend``:

    "auto"       kernels for CUDA tensors of fp8 / bf16 whose head count and head dim are powers of
                 two (what the kernels tile); the reference for everything else (float32, CPU)
    "triton"     the kernels, or a ValueError saying why they cannot run these inputs. CPU tensors
                 run them through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
                 before Triton is imported (the tests do this)
    "reference"  the PyTorch reference

``backend=None`` (every function's default) means ``"auto"``, unless the environment variable
``MISA_BACKEND`` (one of the three) is set: a documented override, for running a whole program on
the reference, or the tests on the kernels. An explicit argument wins over it.

The references work on a chunk of queries against the window of keys the chunk can see
(``[min ks, max ke)``), so nothing of size ``[T, H, S]`` or ``[T, S]`` is built for a whole input:
chunks are sized so that the largest intermediate stays under ``workspace_bytes``.

The kernel paths of ``dsa_select``, ``misa_select`` and ``hisa_select`` are the pipeline of
``misa.PrefillSelector`` (misa/prefill.py), run through a selector kept per shape
(``misa.prefill.cached_selector``): one implementation for the checked functions and for engines
that capture it in a CUDA graph.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from . import quant, reference
from .ops import power_of_two
from .ops.dsa import reference as dsa_ref
from .ops.router import reference as router_ref
from .ops.router.reference import DEFAULT_ROUTER
from .ops.topk import reference as topk_ref
from .validate import Inputs, finish_checks, logits_dtype_for

DEFAULT_WORKSPACE_BYTES = 1 << 30        # CPU references
DEFAULT_GPU_WORKSPACE_BYTES = 4 << 30    # kernels: a 4096 x 131072 selection in one chunk

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (quant.FP8, torch.bfloat16)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def check_backend_arg(backend):
    """A public function's ``backend`` argument: None or one of ``BACKENDS``."""
    return None if backend is None else check_backend(backend)


def _requested(backend: str | None) -> str:
    if backend is None:
        override = os.environ.get("MISA_BACKEND")
        if override is not None:
            if override not in BACKENDS:
                raise ValueError(f"MISA_BACKEND: expected one of {BACKENDS}, got {override!r}")
            return override
        return "auto"
    return check_backend(backend)


def use_kernels(backend: str | None, x: torch.Tensor, dtypes=(), shape_ok: bool = True, why: str = "") -> bool:
    """True to run the kernels, False for the reference (see the module docstring).

    ``x``: the tensor whose device decides; ``dtypes``: the operands' dtypes; ``shape_ok``: the
    kernels tile these shapes (``why`` says what is wrong otherwise)."""
    backend = _requested(backend)
    if backend == "reference":
        return False
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    from .ops import kernels_available
    reasons = []
    if not kernels_available():
        reasons.append("Triton is not installed")
    if not x.is_cuda and not interpreting:
        reasons.append(f"tensors on {x.device} (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
    bad = [str(dt).replace("torch.", "") for dt in dtypes if dt not in KERNEL_DTYPES]
    if bad:
        reasons.append(f"dtype {bad[0]} (the kernels take float8_e4m3fn and bfloat16)")
    if not shape_ok:
        reasons.append(why or "a shape the kernels do not tile")
    if backend == "auto":
        return not reasons and x.is_cuda
    if reasons:
        raise ValueError(f"backend: 'triton' cannot run these inputs: {reasons[0]}")
    return True


def _use_kernels(inp: Inputs, backend: str | None) -> bool:
    return use_kernels(backend, inp.q, (inp.q.dtype, inp.k.dtype),
                       power_of_two(inp.num_heads) and power_of_two(inp.q.shape[2]),
                       f"head count {inp.num_heads} and head dim {inp.q.shape[2]} must be powers of two")


def _contiguous(inp: Inputs) -> Inputs:
    """Kernels take contiguous tensors."""
    return Inputs(*(x.contiguous() if x is not None else None
                    for x in (inp.q, inp.k, inp.k_scale, inp.weights, inp.ks, inp.ke)), extent=inp.extent,
                  pending=inp.pending)


# ---------------------------------------------------------------------------------------------
# Reference path helpers
# ---------------------------------------------------------------------------------------------

def float_keys(inp: Inputs) -> torch.Tensor:
    """The dequantised keys ``[S, D]`` float32 the logit uses."""
    if inp.k_scale is not None:
        return quant.dequantize_keys(inp.k, inp.k_scale)
    return inp.k.float()


def query_chunks(inp: Inputs, bytes_per_key: int, workspace_bytes: int | None, align: int = 1,
                 bytes_per_query: int = 0) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(t0, t1, lo, hi)``: queries ``[t0, t1)`` and the key window ``[lo, hi)`` they see.

    A query costs ``bytes_per_key`` per key plus ``bytes_per_query`` of workspace; chunks stay
    under ``workspace_bytes``. ``lo`` is aligned down to ``align`` (pooled blocks must be whole).
    """
    budget = workspace_bytes or (DEFAULT_GPU_WORKSPACE_BYTES if inp.q.is_cuda else DEFAULT_WORKSPACE_BYTES)
    t = inp.num_queries
    per_query = max(1, bytes_per_key * max(inp.num_keys, 1) + bytes_per_query)
    step = max(1, min(t, budget // per_query))
    if step >= t and inp.extent is not None:     # one chunk, window known from validation: no sync
        lo, hi = inp.extent
        if hi <= lo:
            lo = hi = min(lo, hi)
        yield 0, t, lo - lo % align, hi
        return
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
# Operations: each takes validated inputs and a backend (None: "auto", see the module docstring)
# ---------------------------------------------------------------------------------------------

def dsa_logits(inp: Inputs, workspace_bytes: int | None = None, backend: str | None = None) -> torch.Tensor:
    inp = finish_checks(inp)
    if _use_kernels(inp, backend):
        from .ops.dsa import triton as dsa_triton
        return dsa_triton.dsa_logits(_contiguous(inp))
    out = torch.full((inp.num_queries, inp.num_keys), float("-inf"), device=inp.q.device)
    kf = float_keys(inp)
    for t0, t1, lo, hi in query_chunks(inp, 4 * inp.num_heads, workspace_bytes):
        q, k, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        out[t0:t1, lo:hi] = dsa_ref.dsa_logits(q, k, w, ks, ke, lo)
    return out


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int,
                 backend: str | None = None) -> torch.Tensor:
    if use_kernels(backend, logits):
        from .ops.topk import triton as topk_triton
        return topk_triton.topk_indices(logits.contiguous(), ks.contiguous(), ke.contiguous(), k)
    return topk_ref.topk_indices(logits, ks.long(), ke.long(), k)


def _prefill_kernels(variant: str, inp: Inputs, k: int, workspace_bytes: int | None, heads=None,
                     **options) -> torch.Tensor:
    """The kernel pipeline: ``misa.PrefillSelector``'s, through a selector kept per shape
    (``misa.prefill.cached_selector``), written into a new tensor (the caller's to keep).
    ``heads``: routed heads computed outside the selector.

    Value checks still queued (``inp.pending``) are launched first and read back once the
    selection is queued, waiting for the checks only: the host returns while the GPU still
    selects, and the next call's host work overlaps it. The kernels run on ranges clamped into
    ``[0, S]``, where any values keep their memory accesses in bounds, and a failed check discards
    the result. (A CUDA graph of the selector, its inputs copied in, measured slower than these
    launches once the host no longer waits for them.)"""
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    if inp.num_queries:
        from .prefill import cached_selector
        sel = cached_selector(variant, inp, k, workspace_bytes, **options)
        run = _contiguous(inp)
        if run.pending is not None:
            run.pending.launch()
            run = sel._clamped_ranges(run)
        sel._select(run, heads=heads, out=out)
    finish_checks(inp)                 # raises on bad input
    return out


def _logits_option(variant: str, logits_dtype: torch.dtype | None) -> dict:
    """The selector option for ``logits_dtype``: none for the variant's default, so a call finds the
    same cached selector whether it names the default dtype or not."""
    if logits_dtype_for(variant, logits_dtype) == logits_dtype_for(variant):
        return {}
    return {"logits_dtype": logits_dtype}


def dsa_select(inp: Inputs, k: int, workspace_bytes: int | None = None, backend: str | None = None,
               logits_dtype: torch.dtype | None = None) -> torch.Tensor:
    if _use_kernels(inp, backend):
        return _prefill_kernels("dsa", inp, k, workspace_bytes, **_logits_option("dsa", logits_dtype))
    # the reference selects as float32 whatever the logits dtype (the kernels break bf16 ties)
    inp = finish_checks(inp)
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    kf = float_keys(inp)
    for t0, t1, lo, hi in query_chunks(inp, 4 * inp.num_heads + 16, workspace_bytes):
        q, kc, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        out[t0:t1] = _to_absolute(reference.dsa_select_chunk(q, kc, w, ks, ke, k, lo), lo)
    return out


def _router_kernel_ok(inp: Inputs, router: str) -> tuple[bool, str]:
    from .ops.router.triton import STATISTICS
    if router not in STATISTICS:
        return False, f"router {router!r} has no kernel (kernels: {STATISTICS})"
    if inp.num_heads > 128:
        return False, f"the router kernel takes at most 128 heads, got {inp.num_heads}"
    return True, ""


def route_heads(inp: Inputs, active_heads: int, block_size: int, router: str = DEFAULT_ROUTER,
                workspace_bytes: int | None = None, backend: str | None = None) -> torch.Tensor:
    inp = finish_checks(inp)
    if use_kernels(backend, inp.q, (inp.q.dtype, inp.k.dtype)):
        ok, why = _router_kernel_ok(inp, router)
        if ok and power_of_two(inp.num_heads) and power_of_two(inp.q.shape[2]):
            from .ops.router import triton as router_triton
            return router_triton.route_heads(_contiguous(inp), active_heads, block_size, router=router)
        use_kernels(backend, inp.q, (), False, why or "head count and head dim must be powers of two")
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
                router: str = DEFAULT_ROUTER, workspace_bytes: int | None = None,
                backend: str | None = None, logits_dtype: torch.dtype | None = None) -> torch.Tensor:
    kernels = _use_kernels(inp, backend)
    variant = "misa" if stage1_k is None else "misa-dagger"
    if kernels and power_of_two(active_heads) and inp.num_heads <= 128:
        # a statistic without a router kernel: the heads come from the reference router (or the
        # "triton" backend refuses, in route_heads), then the selector's kernels score with them
        routed_here = _router_kernel_ok(inp, router)[0]
        heads = None
        if not routed_here:
            inp = finish_checks(inp)
            heads = route_heads(inp, active_heads, block_size, router, workspace_bytes, backend)
        return _prefill_kernels(variant, inp, k, workspace_bytes, heads=heads, active_heads=active_heads,
                                block_size=block_size, stage1_k=stage1_k,
                                router=router if routed_here else "abs-sum", **_logits_option(variant, logits_dtype))
    inp = finish_checks(inp)
    logits_dtype = logits_dtype_for(variant, logits_dtype)
    heads = route_heads(inp, active_heads, block_size, router, workspace_bytes, backend)
    if kernels:
        use_kernels(backend, inp.q, (), False, f"active_heads must be a power of two, got {active_heads}"
                    if not power_of_two(active_heads) else f"the router kernel takes at most 128 heads, got "
                                                           f"{inp.num_heads}")
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    kf = float_keys(inp)
    heads_per_pair = inp.num_heads if stage1_k is not None else active_heads
    for t0, t1, lo, hi in query_chunks(inp, 4 * heads_per_pair + 24, workspace_bytes):
        q, kc, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        cols = reference.misa_select_chunk(q, kc, w, heads[t0:t1], ks, ke, k, stage1_k, lo, logits_dtype)
        out[t0:t1] = _to_absolute(cols, lo)
    return out


def hisa_select(inp: Inputs, k: int, block_size: int, block_k: int,
                workspace_bytes: int | None = None, backend: str | None = None) -> torch.Tensor:
    from .ops.blocks.reference import kept_blocks
    if _use_kernels(inp, backend):
        return _prefill_kernels("hisa", inp, k, workspace_bytes, hisa_block_size=block_size, hisa_block_k=block_k)
    inp = finish_checks(inp)
    block_k = kept_blocks(k, block_size, block_k)
    out = torch.empty(inp.num_queries, k, dtype=torch.int32, device=inp.q.device)
    kf = float_keys(inp)
    kbar = router_ref.pool_keys(kf, block_size)
    for t0, t1, lo, hi in query_chunks(inp, 4 * inp.num_heads + 24, workspace_bytes, align=block_size):
        q, kc, w, ks, ke = _chunk_tensors(inp, kf, t0, t1, lo, hi)
        blocks = kbar[lo // block_size: -(-hi // block_size)]
        cols = reference.hisa_select_chunk(q, kc, blocks, w, ks, ke, k, block_size, block_k, lo)
        out[t0:t1] = _to_absolute(cols, lo)
    return out
