"""Triton kernel for the tie break (``reference.py`` is the math): one program per row reads the
row's tie record, scores the class's keys in tiles of ``BT`` (one MMA of ``[BT, D] x [D, heads]``
each, relu, weights, the head sum, the key scale, as the logits kernel scores them, in float32),
keeps the scores in the record's scratch, then sorts the class once by (score, -position) and
writes its best into the row's last ``k_rem`` slots. Rows with nothing to break return at once."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dsa.triton import mma_cast
from ..topk.triton import TIE_CAP, TIE_WIDTH
from ..triton_common import load_pair_queries, ordered_key

# keys of the class scored per MMA
TILE = 32


@triton.jit
def _break_ties_kernel(Q, W, HEADS, K, KSCALE, OUT, TIES, stride_qt, stride_qh, stride_wt, stride_ht, stride_k,
                       stride_out, stride_ties, K_TOP,
                       NH: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, CAP: tl.constexpr,
                       ROUTED: tl.constexpr, HAS_SCALE: tl.constexpr, CAST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    rec = TIES + t * stride_ties
    n = tl.load(rec + CAP)
    taken = tl.load(rec + CAP + 1)
    if (taken > 0) & (taken < n) & (n <= CAP):
        d = tl.arange(0, D)
        # the row's query as the paged kernels load one: padded head slots weigh 0
        qt, w = load_pair_queries(Q, W, HEADS, t, 0, stride_qt, 0, stride_qh, stride_wt, stride_ht,
                                  N=1, QB=1, NH=NH, HS=HS, D=D, ROUTED=ROUTED, CAST=CAST)
        scores = rec + CAP + 2
        for c0 in range(0, n, BT):
            j = c0 + tl.arange(0, BT)
            ok = j < n
            pos = tl.load(rec + j, mask=ok, other=0)
            k = tl.load(K + pos[:, None].to(tl.int64) * stride_k + d[None, :], mask=ok[:, None], other=0.0)
            if CAST is not None:
                k = k.to(CAST)
            s = tl.sum(tl.maximum(tl.dot(k, qt), 0.0) * w[None, :], axis=1)
            if HAS_SCALE:
                s = s * tl.load(KSCALE + pos, mask=ok, other=0.0)
            tl.store(scores + j, s.to(tl.int32, bitcast=True), mask=ok)
        tl.debug_barrier()                   # the scores, stored above, read back whole
        i = tl.arange(0, CAP)
        in_class = i < n
        s = tl.load(scores + i, mask=in_class, other=0).to(tl.float32, bitcast=True)
        pos = tl.load(rec + i, mask=in_class, other=0)
        # one sort: the score's order-preserving key above the position's complement (equal scores:
        # the lower position first); entries past the class sort last
        sort_key = (ordered_key(s).to(tl.uint64) << 32) | (~pos.to(tl.uint32)).to(tl.uint64)
        ranked = tl.sort(tl.where(in_class, sort_key, 0), descending=True)
        best = ~((ranked & 0xFFFFFFFF).to(tl.uint32))
        tl.store(OUT + t * stride_out + K_TOP - taken + i, best.to(tl.int32), mask=i < taken)


def break_ties(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
               out: torch.Tensor, ties: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Rewrite each row's last ``k_rem`` slots of ``out [T, K]`` int32 (positions into ``k``, as a
    ``topk(..., record_ties=True)`` call wrote them with the record ``ties [T, TIE_WIDTH]``) with the
    best of the row's tie class by the DSA score over its heads: ``q [T, H, D]`` and ``k [S, D]``
    fp8 or bf16, ``k_scale [S]`` f32 (None: bf16 keys), ``weights [T, H]``, ``heads [T, h]`` int32
    routed heads (None: all H). Reads nothing back and allocates nothing; returns ``out``."""
    t, h, d = q.shape
    if ties.shape != (out.shape[0], TIE_WIDTH):
        raise ValueError(f"ties: expected [{out.shape[0]}, {TIE_WIDTH}], got {tuple(ties.shape)}")
    if t == 0:
        return out
    nh = heads.shape[1] if heads is not None else h
    _break_ties_kernel[(t,)](
        q, weights, heads if heads is not None else ties, k, k_scale if k_scale is not None else weights, out,
        ties, q.stride(0), q.stride(1), weights.stride(0), heads.stride(0) if heads is not None else 0,
        k.stride(0), out.stride(0), ties.stride(0), out.shape[1],
        NH=nh, HS=max(16, triton.next_power_of_2(nh)), D=d, BT=TILE, CAP=TIE_CAP, ROUTED=heads is not None,
        HAS_SCALE=k_scale is not None, CAST=mma_cast(q.dtype, k.dtype), num_warps=4)
    return out
