"""Triton kernels for re-scoring candidate tokens with all heads (MISA-dagger's second stage, HISA's
exact stage). MISA's routed scoring is the logits kernel's (``misa/ops/dsa/triton.py``, ``heads=``).

Each program takes one query and walks its candidate list in tiles of ``BN`` gathered keys: one
MMA of ``[BN, D] x [D, H]`` per tile, relu, weights and the head sum, exactly as the dense
kernel does, so scores agree with dense DSA up to summation order. ``gather_logits`` gathers from
contiguous keys (prefill); ``paged_rescore`` from the paged cache through the block table (decode:
MISA-dagger's second stage in ``misa.DecodeSelector``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import quant
from . import MAX_RESCORE_HEADS
from ..dsa.triton import mma_cast
from ..triton_common import load_row_queries, sm_count
from ..topk.triton import sample_step, topk


@triton.jit(do_not_specialize=["C"])
def _gather_logits_kernel(Q, W, K, KSCALE, CAND, KS, KE, OUT, SMP, C, stride_qt, stride_wt, stride_k,
                          stride_cand, stride_out, stride_smp,
                          H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                          HAS_SCALE: tl.constexpr, CAST: tl.constexpr, SAMPLE_EVERY: tl.constexpr,
                          OFFSETS32: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    d = tl.arange(0, D)
    h = tl.arange(0, H)
    q = tl.load(Q + t * stride_qt + h[:, None] * D + d[None, :])
    w = tl.load(W + t * stride_wt + h)
    if CAST is not None:
        q = q.to(CAST)
    qt = tl.trans(q)
    ks = tl.load(KS + t)
    ke = tl.load(KE + t)
    for c0 in range(split * BN, C, n_split * BN):
        cols = c0 + tl.arange(0, BN)
        in_list = cols < C
        pos = tl.load(CAND + t * stride_cand + cols, mask=in_list, other=-1)
        ok = in_list & (pos >= ks) & (pos < ke)
        if OFFSETS32:       # the whole key tensor lies within 2**31 elements: cheaper address math
            k = tl.load(K + (pos[:, None] * stride_k + d[None, :]), mask=ok[:, None], other=0.0)
        else:
            k = tl.load(K + pos[:, None].to(tl.int64) * stride_k + d[None, :], mask=ok[:, None], other=0.0)
        if CAST is not None:
            k = k.to(CAST)
        acc = tl.maximum(tl.dot(k, qt), 0.0) * w[None, :]          # [BN, H]
        s = tl.sum(acc, axis=1)
        if HAS_SCALE:
            s = s * tl.load(KSCALE + pos, mask=ok, other=0.0)
        s = tl.where(ok, s, float("-inf"))
        tl.store(OUT + t * stride_out + cols, s, mask=in_list)
        if SAMPLE_EVERY > 0:
            # every SAMPLE_EVERY-th score again, packed: the top-k's cut reads these instead of
            # scattered sectors of the scores
            tl.store(SMP + t * stride_smp + cols // SAMPLE_EVERY, s, mask=in_list & (cols % SAMPLE_EVERY == 0))


class GatherConfig(NamedTuple):
    """A launch of the gathered re-scoring kernel."""
    bn: int = 128               # candidates per tile
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = 96    # register cap (ptxas .maxnreg); None: the compiler's choice
    offsets32: bool = True      # int32 key offsets where the keys allow them (False: always int64)


# The kernel is latency-bound (ncu: L2, issue slots and the ALU each about half busy), so more
# programs per SM help: capped at 96 registers five fit instead of four, without spills, and int32
# key offsets cut the address math: 0.878 ms against 0.940 (4096 x 8192 candidates of 128K keys,
# H200). At 80 registers it spills.
DEFAULT_CONFIG = GatherConfig()


class RerankBuffers(NamedTuple):
    """Preallocated buffers of one ``rerank`` call of ``T`` queries and ``C`` candidates each."""
    scores: torch.Tensor        # [T, C] float32
    sample: torch.Tensor | None  # [T, ceil(C / sample_step(C))] float32, None where the step is 1
    zeros: torch.Tensor         # [T] int32 zeros
    width: torch.Tensor         # [T] int32, each C
    topk: object                # the top-k's scratch (``TopkWorkspace.buffers(T, C)``)


def gather_logits(inp, cand: torch.Tensor, rows: slice = slice(None), config=None,
                  sample_every: int = 0, splits: int | None = None, out: torch.Tensor | None = None,
                  sample_out: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DSA scores of each query's candidates: ``cand [T, C]`` int32 positions (negative = hole) ->
    ``[T, C]`` f32, -inf at holes and outside ``[ks, ke)``. With ``sample_every`` also
    ``[T, ceil(C / sample_every)]``: every ``sample_every``-th score (a ``topk`` sample). ``out`` /
    ``sample_out``: written into instead of allocated."""
    q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
    t, h, d = q.shape
    c = cand.shape[1]
    if out is None:
        out = torch.empty(t, c, dtype=torch.float32, device=q.device)
    smp = out
    if sample_every:
        smp = sample_out if sample_out is not None else \
            torch.empty(t, triton.cdiv(c, sample_every), dtype=torch.float32, device=q.device)
    if t == 0 or c == 0:
        return (out, smp) if sample_every else out
    cfg = config or DEFAULT_CONFIG
    # int32 offsets where every key's elements lie within 2**31 of the first
    offsets32 = cfg.offsets32 and inp.k.shape[0] * inp.k.stride(0) < 2 ** 31
    if splits is None:      # programs per query: enough to fill the GPU
        splits = max(1, min(triton.cdiv(c, cfg.bn), (4 * sm_count(q)) // t))
    _gather_logits_kernel[(t, splits)](
        q, w, inp.k, inp.k_scale if inp.k_scale is not None else w, cand, ks, ke, out, smp, c,
        q.stride(0), w.stride(0), inp.k.stride(0), cand.stride(0), out.stride(0), smp.stride(0),
        H=h, D=d, BN=cfg.bn, HAS_SCALE=inp.k_scale is not None, CAST=mma_cast(q.dtype, inp.k.dtype),
        SAMPLE_EVERY=sample_every, OFFSETS32=offsets32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )
    return (out, smp) if sample_every else out


def rerank(inp, cand: torch.Tensor, k: int, rows: slice = slice(None), out: torch.Tensor | None = None,
           buffers: RerankBuffers | None = None) -> torch.Tensor:
    """Top-``k`` of the candidates by the full DSA formula, as absolute positions. ``out`` (``[T,
    k]`` int32) and ``buffers``: written into, nothing allocated (``misa.PrefillSelector``)."""
    step = sample_step(cand.shape[1])
    sample = None
    b = buffers
    if step > 1:
        scores, values = gather_logits(inp, cand, rows, sample_every=step, out=b and b.scores,
                                       sample_out=b and b.sample)
        sample = (values, step)
    else:
        scores = gather_logits(inp, cand, rows, out=b and b.scores)
    if b is None:
        zeros = torch.zeros(scores.shape[0], dtype=torch.int32, device=scores.device)
        width = torch.full_like(zeros, scores.shape[1])
    else:
        zeros, width = b.zeros, b.width
    return topk(scores, zeros, width, k, cmap=cand, finite_only=True, sample=sample, out=out,
                buffers=b and b.topk)

@triton.jit(do_not_specialize=["C"])
def _paged_rescore_kernel(Q, W, VALUES, SCALES, TABLE, CTX, CAND, OUT, C,
                          stride_qb, stride_qn, stride_qh, stride_wt, stride_table, stride_cand, stride_out,
                          N: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                          PAGE: tl.constexpr, BN: tl.constexpr, CAST: tl.constexpr):
    r = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = r // N
    ke = tl.load(CTX + b) - N + r % N + 1                     # the row's visible end
    d = tl.arange(0, D)
    qt, w = load_row_queries(Q, W, r, stride_qb, stride_qn, stride_qh, stride_wt, N, H, HS, D, CAST)
    page_bytes = PAGE * (D + 4)
    cand_row = CAND + r.to(tl.int64) * stride_cand
    out_row = OUT + r.to(tl.int64) * stride_out
    for c0 in range(split * BN, C, n_split * BN):
        cols = c0 + tl.arange(0, BN)
        in_list = cols < C
        pos = tl.load(cand_row + cols, mask=in_list, other=-1)
        ok = (pos >= 0) & (pos < ke)                          # holes and invisible positions read nothing
        page = tl.load(TABLE + b.to(tl.int64) * stride_table + pos // PAGE, mask=ok, other=0).to(tl.int64)
        slot = pos % PAGE
        k = tl.load(VALUES + page[:, None] * page_bytes + slot[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        if CAST is not None:
            k = k.to(CAST)
        acc = tl.maximum(tl.dot(k, qt), 0.0) * w[None, :]     # [BN, HS]
        s = tl.sum(acc, axis=1)
        scale = tl.load(SCALES + page * (page_bytes // 4) + (PAGE * D) // 4 + slot, mask=ok, other=0.0)
        tl.store(out_row + cols, tl.where(ok, s * scale, float("-inf")), mask=in_list)


def paged_rescore(q, kv_cache, weights, context_lens, block_table, cand, out, bn: int = 64,
                  splits: int | None = None) -> torch.Tensor:
    """Write ``out [B * N, C]`` float32: each row's candidates ``cand [B * N, C]`` int32 (positions
    inside the sequence, -1 = hole) scored with all heads, their keys read from the paged cache
    through the block table; -inf at holes and past the row's visible end (``reference.paged_rescore``
    is the math). ``q [B, N, H, D]`` fp8/bf16 (H <= 64, D a power of two), ``weights [B * N, H]``;
    inputs as ``misa.paged_*`` checks them. Nothing is read back: capturable in a CUDA graph."""
    b, n, h, d = q.shape
    rows, c = cand.shape
    if h > MAX_RESCORE_HEADS:
        raise ValueError(f"q: the paged re-scoring kernel takes at most {MAX_RESCORE_HEADS} heads, got {h}")
    if rows == 0 or c == 0:
        return out
    q, weights = q.contiguous(), weights.contiguous()
    hs = max(triton.next_power_of_2(h), 16)                  # the MMA's smallest N
    flat = kv_cache.reshape(-1)
    if splits is None:      # programs per row: enough to fill the GPU
        splits = max(1, min(triton.cdiv(c, bn), triton.cdiv(4 * sm_count(q), rows)))
    _paged_rescore_kernel[(rows, splits)](
        q, weights, flat.view(quant.FP8), flat.view(torch.float32), block_table, context_lens, cand, out, c,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), block_table.stride(0), cand.stride(0),
        out.stride(0), N=n, H=h, HS=hs, D=d, PAGE=quant.PAGE_SIZE, BN=bn, CAST=mma_cast(q.dtype, quant.FP8),
        num_warps=4, num_stages=3)
    return out
