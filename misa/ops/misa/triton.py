"""Triton kernels for re-scoring candidate tokens with all heads (MISA-dagger's second stage, HISA's
exact stage). MISA's routed scoring is the logits kernel's (``misa/ops/dsa/triton.py``, ``heads=``).

Each program takes one query and walks its candidate list in tiles of ``BN`` gathered keys: one
MMA of ``[BN, D] x [D, H]`` per tile, relu, weights and the head sum, exactly as the dense
kernel does, so scores agree with dense DSA up to summation order.

``rerank`` with many queries runs one fused launch: the program that scored a query's candidates
goes on to select their top-k (cut from a sample of its scores, compaction, select: the top-k's
own pieces, ``misa/ops/topk/triton.py``), reading the row it just wrote back from L2, while the
other programs on its SM keep gathering keys. With few queries the scoring splits each row over
several programs instead, and the top-k runs as its own launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dsa.triton import mma_cast
from ..triton_common import INTERPRET, ordered_key, sm_count
from ..topk import triton as topk_triton
from ..topk.triton import sample_step, topk


@triton.jit
def _score_tile(K, KSCALE, CAND, t, cols, qt, w, ks, ke, C, stride_k, stride_cand,
                D: tl.constexpr, HAS_SCALE: tl.constexpr, CAST: tl.constexpr):
    """The DSA scores of the candidates ``cols`` of query ``t``: -inf at holes and outside [ks, ke)."""
    d = tl.arange(0, D)
    in_list = cols < C
    pos = tl.load(CAND + t * stride_cand + cols, mask=in_list, other=-1)
    ok = in_list & (pos >= ks) & (pos < ke)
    k = tl.load(K + pos[:, None].to(tl.int64) * stride_k + d[None, :], mask=ok[:, None], other=0.0)
    if CAST is not None:
        k = k.to(CAST)
    acc = tl.maximum(tl.dot(k, qt), 0.0) * w[None, :]          # [BN, H]
    s = tl.sum(acc, axis=1)
    if HAS_SCALE:
        s = s * tl.load(KSCALE + pos, mask=ok, other=0.0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _query_operands(Q, W, t, stride_qt, stride_wt, H: tl.constexpr, D: tl.constexpr, CAST: tl.constexpr):
    d = tl.arange(0, D)
    h = tl.arange(0, H)
    q = tl.load(Q + t * stride_qt + h[:, None] * D + d[None, :])
    w = tl.load(W + t * stride_wt + h)
    if CAST is not None:
        q = q.to(CAST)
    return tl.trans(q), w


@triton.jit(do_not_specialize=["C"])
def _gather_logits_kernel(Q, W, K, KSCALE, CAND, KS, KE, OUT, SMP, C, stride_qt, stride_wt, stride_k,
                          stride_cand, stride_out, stride_smp,
                          H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                          HAS_SCALE: tl.constexpr, CAST: tl.constexpr, SAMPLE_EVERY: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    qt, w = _query_operands(Q, W, t, stride_qt, stride_wt, H, D, CAST)
    ks = tl.load(KS + t)
    ke = tl.load(KE + t)
    for c0 in range(split * BN, C, n_split * BN):
        cols = c0 + tl.arange(0, BN)
        in_list = cols < C
        s = _score_tile(K, KSCALE, CAND, t, cols, qt, w, ks, ke, C, stride_k, stride_cand, D, HAS_SCALE, CAST)
        tl.store(OUT + t * stride_out + cols, s, mask=in_list)
        if SAMPLE_EVERY > 0:
            # every SAMPLE_EVERY-th score again, packed: the top-k's cut reads these instead of
            # scattered sectors of the scores
            tl.store(SMP + t * stride_smp + cols // SAMPLE_EVERY, s, mask=in_list & (cols % SAMPLE_EVERY == 0))


DEFAULT_CONFIG = (128, 4, 3)   # (BN, num_warps, num_stages): benchmarks/sweep_kernels.py on an H200


def gather_logits(inp, cand: torch.Tensor, rows: slice = slice(None), config=None,
                  sample_every: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DSA scores of each query's candidates: ``cand [T, C]`` int32 positions (-1 = hole) ->
    ``[T, C]`` f32, -inf at holes and outside ``[ks, ke)``. With ``sample_every`` also
    ``[T, ceil(C / sample_every)]``: every ``sample_every``-th score (a ``topk`` sample)."""
    q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
    t, h, d = q.shape
    c = cand.shape[1]
    out = torch.empty(t, c, dtype=torch.float32, device=q.device)
    smp = torch.empty(t, triton.cdiv(c, sample_every), dtype=torch.float32, device=q.device) if sample_every else out
    if t == 0 or c == 0:
        return (out, smp) if sample_every else out
    bn, warps, stages = config or DEFAULT_CONFIG
    splits = max(1, min(triton.cdiv(c, bn), (4 * sm_count(q)) // t))
    _gather_logits_kernel[(t, splits)](
        q, w, inp.k, inp.k_scale if inp.k_scale is not None else w, cand, ks, ke, out, smp, c,
        q.stride(0), w.stride(0), inp.k.stride(0), cand.stride(0), out.stride(0), smp.stride(0),
        H=h, D=d, BN=bn, HAS_SCALE=inp.k_scale is not None,
        CAST=mma_cast(q.dtype, inp.k.dtype), SAMPLE_EVERY=sample_every, num_warps=warps, num_stages=stages,
    )
    return (out, smp) if sample_every else out


@triton.jit(do_not_specialize=["C", "TOP", "CAP"])
def _rerank_kernel(Q, W, K, KSCALE, CAND, KS, KE, SCORES, SCR_KEY, SCR_COL, BR, OUT, C, TOP, CAP,
                   stride_qt, stride_wt, stride_k, stride_cand, stride_scores, stride_scr, stride_br, stride_out,
                   sigmas, slack, bracket_sigmas,
                   H: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, HAS_SCALE: tl.constexpr,
                   CAST: tl.constexpr, SAMPLE: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
                   WAYS: tl.constexpr, EARLY_EXIT: tl.constexpr, BRACKET: tl.constexpr,
                   BRACKET_MIN: tl.constexpr, HOLD: tl.constexpr):
    """One query per program: the scores of all its ``C`` candidates, then their top ``TOP``."""
    t = tl.program_id(0).to(tl.int64)
    qt, w = _query_operands(Q, W, t, stride_qt, stride_wt, H, D, CAST)
    ks = tl.load(KS + t)
    ke = tl.load(KE + t)
    scores = SCORES + t * stride_scores
    for c0 in range(0, C, BN):
        cols = c0 + tl.arange(0, BN)
        s = _score_tile(K, KSCALE, CAND, t, cols, qt, w, ks, ke, C, stride_k, stride_cand, D, HAS_SCALE, CAST)
        tl.store(scores + cols, s, mask=cols < C)
    tl.debug_barrier()          # the row, written by every thread, is read back by others

    # the cut: a quantile of SAMPLE scores spread over the row (as topk's _cut_kernel)
    cut = tl.zeros([], dtype=tl.uint32)
    if C >= 2 * SAMPLE:
        i = tl.arange(0, SAMPLE)
        sample = tl.load(scores + (i.to(tl.int64) * C // SAMPLE).to(tl.int32))
        cut = topk_triton._cut_of_sample(ordered_key(sample), SAMPLE, C, TOP, sigmas, slack, WAYS, EARLY_EXIT)
    # the compaction: every finite score at or above the cut, in column order, to the scratch
    scr_key = SCR_KEY + t * stride_scr
    scr_col = SCR_COL + t * stride_scr
    n_scr = 0
    if cut != 0:
        slane = tl.arange(0, SBLOCK)
        for start in range(0, C, SBLOCK):
            c = start + slane
            key, m = topk_triton._eligible_keys(scores, c, C, True)
            keep = m & (key >= cut)
            spos = n_scr + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            ok = keep & (spos < CAP)
            tl.store(scr_key + spos, key.to(tl.int32, bitcast=True), mask=ok)
            tl.store(scr_col + spos, c, mask=ok)
            n_scr += tl.sum(keep.to(tl.int32), axis=0)
        tl.debug_barrier()
    topk_triton._select_row(scores, 0, C, OUT + t * stride_out, CAND + t * stride_cand, scr_key, scr_col,
                            BR + t * stride_br, cut, n_scr, 0, TOP, CAP, bracket_sigmas, BLOCK, SBLOCK, WAYS,
                            True, True, EARLY_EXIT, BRACKET, BRACKET_MIN, HOLD)


# (BN, num_warps, num_stages, register cap) of the fused re-scoring and top-k. Uncapped, the
# compiler takes ~197 registers (the top-k's held keys on top of the MMA's), two programs per SM;
# at 128 (no spills) four fit, as for the scoring alone (110 registers)
RERANK_CONFIG = (128, 4, 3, 128)


def rerank(inp, cand: torch.Tensor, k: int, rows: slice = slice(None), fused: bool | None = None,
           config=None) -> torch.Tensor:
    """Top-``k`` of the candidates ``cand [T, C]`` (-1 = hole) by the full DSA formula, as absolute
    positions, -1 padded. ``fused`` (default: when the queries alone fill the GPU, ``T >= 4 *
    SMs``): one launch scores and selects each query's row; otherwise the scoring splits rows
    over programs and ``topk`` runs after it."""
    t, c = cand.shape
    if fused is None:
        fused = t >= 4 * sm_count(cand)
    if not fused or t == 0 or c == 0:
        return _rerank_unfused(inp, cand, k, rows)
    q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
    h, d = q.shape[1:]
    dev = q.device
    block, warps, sample = topk_triton.DEFAULT_CONFIG
    cap = topk_triton.scratch_size(k, c)
    scores = torch.empty(t, c, dtype=torch.float32, device=dev)
    scr_key = torch.empty(t, cap, dtype=torch.int32, device=dev)
    scr_col = torch.empty(t, cap, dtype=torch.int32, device=dev)
    bracket = torch.empty(t, max(topk_triton.BRACKET, 1), dtype=torch.int32, device=dev)
    out = torch.empty(t, k, dtype=torch.int32, device=dev)
    bn, warps, stages, maxnreg = config or RERANK_CONFIG
    _rerank_kernel[(t,)](
        q, w, inp.k, inp.k_scale if inp.k_scale is not None else w, cand, ks, ke, scores, scr_key, scr_col,
        bracket, out, c, k, cap,
        q.stride(0), w.stride(0), inp.k.stride(0), cand.stride(0), scores.stride(0), scr_key.stride(0),
        bracket.stride(0), out.stride(0), topk_triton.CUT_SIGMAS, topk_triton.CUT_SLACK,
        topk_triton.BRACKET_SIGMAS,
        H=h, D=d, BN=bn, HAS_SCALE=inp.k_scale is not None, CAST=mma_cast(q.dtype, inp.k.dtype),
        SAMPLE=sample, BLOCK=block, SBLOCK=topk_triton.SCRATCH_BLOCK, WAYS=topk_triton.WAYS,
        EARLY_EXIT=topk_triton.EARLY_EXIT, BRACKET=topk_triton.BRACKET, BRACKET_MIN=topk_triton.BRACKET_MIN,
        HOLD=topk_triton.HOLD, num_warps=warps, num_stages=stages,
        **({"maxnreg": maxnreg} if maxnreg and not INTERPRET else {}),
    )
    return out


def _rerank_unfused(inp, cand: torch.Tensor, k: int, rows: slice) -> torch.Tensor:
    step = sample_step(cand.shape[1])
    sample = None
    if step > 1:
        scores, values = gather_logits(inp, cand, rows, sample_every=step)
        sample = (values, step)
    else:
        scores = gather_logits(inp, cand, rows)
    zeros = torch.zeros(scores.shape[0], dtype=torch.int32, device=scores.device)
    width = torch.full_like(zeros, scores.shape[1])
    return topk(scores, zeros, width, k, cmap=cand, finite_only=True, sample=sample)
