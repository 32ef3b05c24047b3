"""Pieces the Triton kernels of several operations share."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, read at import). The kernel
# logic is the same there; what the launches change is said where they decide it: bf16 widened to
# float32 (dsa.triton.mma_cast), a smaller top-k sample (topk.triton.DEFAULT_CONFIG), float32 router
# products (router.triton._launch_config), no inline-PTX stores (dsa.triton._PTX_OK).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def sm_count(t: torch.Tensor) -> int:
    """Multiprocessors of ``t``'s GPU (1 off the GPU): launches size their key splits by it."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 1


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """``x`` (float32) in ``dtype``, rounded to nearest even. For bfloat16 the rounding is done on
    the bits: Triton's interpreter truncates in its float32 -> bfloat16 cast, the GPU does not."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def ordered_key(x):
    """float32 -> uint32 with the same order (-inf smallest)."""
    u = x.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) == 1, ~u, u | 0x80000000)


@triton.jit
def load_pair_queries(Q, W, HEADS, b, q0, stride_qb, stride_qn, stride_qh, stride_wt, stride_ht,
                      N: tl.constexpr, QB: tl.constexpr, NH: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                      ROUTED: tl.constexpr, CAST: tl.constexpr):
    """The paged scoring kernels' operands for sequence ``b``'s queries ``[q0, q0 + QB)``: ``(qt [D,
    HS * QB], w [HS * QB])`` over (head slot, query) pairs, head-major (pair ``p`` is slot ``p // QB``
    of query ``q0 + p % QB``), so that all heads of a query sit in one thread of the MMA accumulator
    and the weighted head sum needs no shuffles. Slots past ``NH`` and queries past ``N`` load 0.
    ``ROUTED``: slot ``s`` of row ``r`` is head ``HEADS[r, s]``, else head ``s``."""
    d = tl.arange(0, D)
    p = tl.arange(0, HS * QB)
    qi = q0 + p % QB
    slot = p // QB
    ok = (slot < NH) & (qi < N)
    row = b * N + qi
    if ROUTED:
        head = tl.load(HEADS + row.to(tl.int64) * stride_ht + slot, mask=ok, other=0)
    else:
        head = slot
    q = tl.load(Q + b.to(tl.int64) * stride_qb + qi[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=ok[:, None], other=0.0)
    w = tl.load(W + row.to(tl.int64) * stride_wt + head, mask=ok, other=0.0)
    if CAST is not None:
        q = q.to(CAST)
    return tl.trans(q), w


@triton.jit
def load_row_queries(Q, W, r, stride_qb, stride_qn, stride_qh, stride_wt, N: tl.constexpr, H: tl.constexpr,
                     HS: tl.constexpr, D: tl.constexpr, CAST: tl.constexpr):
    """Row ``r``'s query (query ``r % N`` of sequence ``r // N``) with all heads: ``(qt [D, HS], w
    [HS])``, head slots past ``H`` 0."""
    d = tl.arange(0, D)
    h = tl.arange(0, HS)
    h_ok = h < H
    q = tl.load(Q + (r // N).to(tl.int64) * stride_qb + (r % N) * stride_qn + h[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None], other=0.0)
    w = tl.load(W + r.to(tl.int64) * stride_wt + h, mask=h_ok, other=0.0)
    qt = tl.trans(q)
    if CAST is not None:
        qt = qt.to(CAST)
    return qt, w
