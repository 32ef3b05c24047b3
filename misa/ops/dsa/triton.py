"""Triton kernel for indexer logits: dense DSA (all heads) and MISA's routed scoring (h heads).

Layout (measured best on Hopper, see docs/benchmarks.md): a key tile sits on the M side of the
matrix product and the (query, head) pairs on N, so one fp8 MMA scores ``BN`` keys against ``BQ``
queries times ``NH`` heads; relu, the per-head weight and the head sum run on the accumulator
before a single float32 store per (query, key). Routed scoring gathers each query's head rows of
``q`` and ``w`` straight from the full tensors (no copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import INTERPRET, ordered_key

# Lengths and offsets are not specialised (do_not_specialize): an engine calls these kernels with a
# different sequence length every step, and each new specialisation would be a compile.


def mma_cast(*dtypes):
    """The dtype both MMA operands are cast to in-kernel, or None when they already agree."""
    if INTERPRET and torch.bfloat16 in dtypes:
        return tl.float32
    if len(set(dtypes)) > 1:
        return tl.bfloat16    # fp8 meets bf16: fp8 widens to bf16 exactly
    return None



# What the kernel does with the scores (``MODE``): store them all; or, for rows with a top-k cut,
# move the scores at or above the cut into the top-k scratch (and store the rows without a cut);
# or store the rows whose cut missed (too few or too many survivors), skipping every other block.
STORE, COMPACT, REPAIR = 0, 1, 2


@triton.jit(do_not_specialize=["T", "S", "col_offset", "out_width", "TOPK", "CAP"])
def _mqa_logits_kernel(
    Q, W, HEADS, K, KSCALE, KS, KE, OUT,
    T, S, col_offset, out_width,
    stride_qt, stride_qh, stride_wt, stride_ht, stride_k, stride_out,
    CUT, COUNT, KEPT, SCR_KEY, SCR_COL, stride_scr, TOPK, CAP,
    NH: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr,
    ROUTED: tl.constexpr, HAS_SCALE: tl.constexpr, CAST: tl.constexpr, HEAD_MAJOR: tl.constexpr,
    MODE: tl.constexpr, RESERVE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    d = tl.arange(0, D)

    rows = pid_q * BQ + tl.arange(0, BQ)
    row_ok = rows < T
    ks = tl.load(KS + rows, mask=row_ok, other=2147483647)
    ke = tl.load(KE + rows, mask=row_ok, other=0)
    lo = tl.min(ks, axis=0)
    hi = tl.max(ke, axis=0)
    write_row = row_ok
    if MODE != 0:
        cut = tl.load(CUT + rows, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
        if MODE == 1:
            compact_row = row_ok & (cut != 0)
            write_row = row_ok & (cut == 0)
        else:
            n_kept = tl.load(KEPT + rows, mask=row_ok, other=0)
            n_slots = tl.load(COUNT + rows, mask=row_ok, other=0)
            write_row = row_ok & (cut != 0) & ((n_kept < TOPK) | (n_slots > CAP))
            hi = tl.where(tl.max(write_row.to(tl.int32), axis=0) > 0, hi, 0)   # nothing to redo

    # (query, head) pairs along N. Head-major order (pair p = head slot p // BQ, query p % BQ)
    # puts all heads of a query in the same thread of the MMA accumulator, so the head sum needs
    # no shuffles; query-major is kept for the sweep.
    p = tl.arange(0, BQ * NH)
    if HEAD_MAJOR:
        pq = pid_q * BQ + p % BQ
        slot = p // BQ
    else:
        pq = pid_q * BQ + p // NH
        slot = p % NH
    pq_ok = pq < T
    if ROUTED:
        head = tl.load(HEADS + pq * stride_ht + slot, mask=pq_ok, other=0)
    else:
        head = slot
    q = tl.load(Q + pq[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=pq_ok[:, None], other=0.0)
    w = tl.load(W + pq * stride_wt + head, mask=pq_ok, other=0.0)
    if CAST is not None:
        q = q.to(CAST)
    qt = tl.trans(q)                                   # [D, BQ * NH], K-major for the MMA

    first = lo // BN
    last = tl.cdiv(hi, BN)
    if MODE == 1:
        # scratch slots are taken RESERVE at a time per row (one atomic per few tiles, not one
        # blocking atomic per tile); a run left unused gets key 0, below every cut
        slot_next = tl.zeros([BQ], dtype=tl.int32)
        slot_end = tl.zeros([BQ], dtype=tl.int32)
        n_real = tl.zeros([BQ], dtype=tl.int32)
        run = tl.arange(0, RESERVE)
    for tile in range(first + pid_s, last, n_split):
        offs = tile * BN + tl.arange(0, BN)
        key_ok = offs < S
        k = tl.load(K + offs[:, None].to(tl.int64) * stride_k + d[None, :], mask=key_ok[:, None], other=0.0)
        if CAST is not None:
            k = k.to(CAST)
        acc = tl.dot(k, qt)                            # [BN, BQ * NH] float32
        acc = tl.maximum(acc, 0.0) * w[None, :]
        if HEAD_MAJOR:
            logits = tl.sum(tl.reshape(acc, (BN, NH, BQ)), axis=1)     # [BN, BQ]
        else:
            logits = tl.sum(tl.reshape(acc, (BN, BQ, NH)), axis=2)
        if HAS_SCALE:
            logits = logits * tl.load(KSCALE + offs, mask=key_ok, other=0.0)[:, None]
        inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :])
        logits = tl.where(inside, logits, float("-inf"))
        col = offs - col_offset
        in_out = key_ok[:, None] & ((col >= 0) & (col < out_width))[:, None]
        tl.store(OUT + rows[None, :].to(tl.int64) * stride_out + col[:, None], logits,
                 mask=write_row[None, :] & in_out)
        if MODE == 1:
            # the scores at or above the row's cut go to its scratch, slots from a counter
            key = ordered_key(logits)
            keep = inside & in_out & compact_row[None, :] & (key >= cut[None, :])
            keep_i = keep.to(tl.int32)
            n_keep = tl.sum(keep_i, axis=0)                                   # [BQ]
            short = n_keep > slot_end - slot_next
            if tl.max(short.to(tl.int32), axis=0) > 0:
                _fill_holes(SCR_KEY, rows, stride_scr, slot_next, slot_end, short, run, CAP)
                got = tl.atomic_add(COUNT + rows, tl.full([BQ], RESERVE, tl.int32), mask=short)
                slot_next = tl.where(short, got, slot_next)
                slot_end = tl.where(short, got + RESERVE, slot_end)
            spos = slot_next[None, :] + tl.cumsum(keep_i, axis=0) - 1
            ok = keep & (spos < CAP)
            at = rows[None, :].to(tl.int64) * stride_scr + spos
            tl.store(SCR_KEY + at, key.to(tl.int32, bitcast=True), mask=ok)
            tl.store(SCR_COL + at, col[:, None] + spos * 0, mask=ok)
            slot_next += n_keep
            n_real += n_keep
    if MODE == 1:
        _fill_holes(SCR_KEY, rows, stride_scr, slot_next, slot_end, compact_row, run, CAP)
        tl.atomic_add(KEPT + rows, n_real, mask=compact_row & (n_real > 0))


@triton.jit
def _fill_holes(SCR_KEY, rows, stride_scr, slot_next, slot_end, which, run, CAP):
    """Key 0 into the unused slots [slot_next, slot_end) of the rows in ``which``."""
    pos = slot_next[:, None] + run[None, :]
    hole = which[:, None] & (pos < slot_end[:, None]) & (pos < CAP)
    tl.store(SCR_KEY + rows[:, None].to(tl.int64) * stride_scr + pos, tl.zeros_like(pos), mask=hole)


# Tile shape: (pairs on N, BN keys on M, num_warps, num_stages, head-major pairs); BQ = pairs // NH
# queries per program. Picked by benchmarks/sweep_kernels.py on an H200 (docs/benchmarks.md).
DEFAULT_CONFIG = (256, 64, 4, 3, True)
# COMPACT mode: scratch slots a row takes per atomic (at least the key tile, whose survivors a run
# must hold)
SLOT_RUN = 128


def launch_logits(q, w, k, k_scale, ks, ke, out, col_offset: int = 0, heads=None, config=None,
                  splits: int | None = None, topk=None, mode: int = STORE) -> torch.Tensor:
    """Write ``out[t, s - col_offset]`` for the key tiles each block of queries can see.

    ``q [T, H, D]`` fp8/bf16, ``w [T, H]`` f32, ``k [S, D]`` fp8/bf16 (``k_scale [S]`` or None),
    ``heads [T, h]`` int32 for routed scoring (None: all heads), ``out [T, W]`` f32. Columns
    outside a query's ``[ks, ke)`` but inside its block's tiles get -inf; other columns are not
    touched, so readers must stay inside ``[ks, ke)``. ``k`` may be a strided view (a sample of
    the keys). ``topk`` (a ``TopkLaunches`` over ``out``) with ``mode`` COMPACT or REPAIR fuses
    the top-k's compaction into this kernel (``misa/ops/topk/fused.py``).
    """
    t, h_all, d = q.shape
    nh = heads.shape[1] if heads is not None else h_all
    if t == 0:
        return out
    pairs, bn, warps, stages, head_major = config or DEFAULT_CONFIG
    bq = max(1, pairs // nh)
    cast = mma_cast(q.dtype, k.dtype)
    n_blocks = triton.cdiv(t, bq)
    if splits is None:  # split the keys when there are too few query blocks to fill the GPU
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = max(1, min(64, (2 * sms) // n_blocks))
    if mode != STORE and topk is None:
        raise ValueError("topk: the COMPACT and REPAIR modes need the top-k's buffers")
    _mqa_logits_kernel[(n_blocks, splits)](
        q, w, heads if heads is not None else ks, k, k_scale if k_scale is not None else w, ks, ke, out,
        t, k.shape[0], col_offset, out.shape[1],
        q.stride(0), q.stride(1), w.stride(0), heads.stride(0) if heads is not None else 0, k.stride(0),
        out.stride(0),
        *((topk.cut_keys, topk.count, topk.kept, topk.scr_key, topk.scr_col, topk.scr_key.stride(0), topk.k,
           topk.cap) if topk is not None else (ks, ks, ks, ks, ks, 0, 0, 0)),
        NH=nh, D=d, BQ=bq, BN=bn, ROUTED=heads is not None, HAS_SCALE=k_scale is not None,
        CAST=cast, HEAD_MAJOR=head_major, MODE=mode, RESERVE=max(SLOT_RUN, bn), num_warps=warps, num_stages=stages,
    )
    return out


def dsa_logits(inp) -> torch.Tensor:
    out = torch.full((inp.num_queries, inp.num_keys), float("-inf"), device=inp.q.device)
    return launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, out)
