"""Triton kernel for indexer logits: dense DSA (all heads) and MISA's routed scoring (h heads).

Layout (measured best on Hopper, see docs/benchmarks.md): a key tile sits on the M side of the
matrix product and the (query, head) pairs on N, so one fp8 MMA scores ``BN`` keys against ``BQ``
queries times ``NH`` heads; relu, the per-head weight and the head sum run on the accumulator
before a single store per (query, key), float32 or (rounded to nearest even) bfloat16. Routed
scoring gathers each query's head rows of ``q`` and ``w`` straight from the full tensors (no copy).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..topk.triton import sample_step
from ..triton_common import INTERPRET, rounded, sm_count
from ...validate import LOGITS_DTYPES

# Lengths and offsets are not specialised (do_not_specialize): an engine calls these kernels with a
# different sequence length every step, and each new specialisation would be a compile.


def mma_cast(*dtypes):
    """The dtype both MMA operands are cast to in-kernel, or None when they already agree."""
    if INTERPRET and torch.bfloat16 in dtypes:
        return tl.float32     # the interpreter's bf16 arithmetic is wrong: widen (exactly) to float32
    if len(set(dtypes)) > 1:
        return tl.bfloat16    # fp8 meets bf16: fp8 widens to bf16 exactly
    return None


@triton.jit(do_not_specialize=["T", "S", "col_offset", "out_width"])
def _mqa_logits_kernel(
    Q, W, HEADS, K, KSCALE, KS, KE, OUT,
    T, S, col_offset, out_width,
    stride_qt, stride_qh, stride_wt, stride_ht, stride_k, stride_out,
    NH: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr,
    ROUTED: tl.constexpr, HAS_SCALE: tl.constexpr, CAST: tl.constexpr, COL_UNIT: tl.constexpr,
    STORE: tl.constexpr,
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
    # (head slot, query) pairs along N, head-major (pair p = slot p // BQ, query p % BQ): all heads
    # of a query land in the same thread of the MMA accumulator, so the head sum needs no shuffles
    p = tl.arange(0, BQ * NH)
    pq = pid_q * BQ + p % BQ
    slot = p // BQ
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

    col0 = col_offset * COL_UNIT       # COL_UNIT = 16: the window is 16-aligned, stores vectorise
    # keys [fast_lo, fast_hi): seen by every query of the block and inside the output window, so
    # their tiles need no masks (all but a block's last tile or two in causal prefill)
    fast_lo = tl.maximum(tl.max(ks, axis=0), col0)
    fast_hi = tl.minimum(tl.min(ke, axis=0), col0 + out_width)
    if pid_q * BQ + BQ > T:
        fast_hi = -1                                   # a partial block of queries
    out_rows = OUT + rows[None, :].to(tl.int64) * stride_out
    first = lo // BN
    last = tl.cdiv(hi, BN)
    for tile in range(first + pid_s, last, n_split):
        offs = tile * BN + tl.arange(0, BN)
        key_ok = offs < S
        k = tl.load(K + offs[:, None].to(tl.int64) * stride_k + d[None, :], mask=key_ok[:, None], other=0.0)
        if CAST is not None:
            k = k.to(CAST)
        acc = tl.dot(k, qt)                            # [BN, BQ * NH] float32
        acc = tl.maximum(acc, 0.0) * w[None, :]
        logits = tl.sum(tl.reshape(acc, (BN, NH, BQ)), axis=1)         # [BN, BQ]
        col = offs - col0
        if (tile * BN >= fast_lo) & (tile * BN + BN <= fast_hi):
            if HAS_SCALE:
                logits = logits * tl.load(KSCALE + offs)[:, None]
            if STORE == 0:
                tl.store(out_rows + col[:, None], rounded(logits, OUT.dtype.element_ty))
            elif OUT.dtype.element_ty != tl.float32:
                # bfloat16 logits: tl.store (no inline PTX), streaming where the config streams
                stored = rounded(logits, OUT.dtype.element_ty)
                if STORE == 2:
                    tl.store(out_rows + col[:, None], stored, cache_modifier=".cs")
                else:
                    tl.store(out_rows + col[:, None], stored)
            else:
                # straight from the accumulator's layout: no round trip through shared memory to
                # change layouts (tl.store's coalescing always inserts one); each warp store still
                # fills whole 32-byte sectors (8 keys of 4 queries). 2: streaming (.cs), the
                # logits are read once, by the top-k, long after this
                addr = (out_rows + col[:, None]).to(tl.int64, bitcast=True)
                if STORE == 1:
                    tl.inline_asm_elementwise("st.global.f32 [$1], $2; mov.u32 $0, 0;", "=r,l,f", [addr, logits],
                                              dtype=tl.int32, is_pure=False, pack=1)
                else:
                    tl.inline_asm_elementwise("st.global.cs.f32 [$1], $2; mov.u32 $0, 0;", "=r,l,f", [addr, logits],
                                              dtype=tl.int32, is_pure=False, pack=1)
        else:
            if HAS_SCALE:
                logits = logits * tl.load(KSCALE + offs, mask=key_ok, other=0.0)[:, None]
            inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :])
            logits = tl.where(inside, logits, float("-inf"))
            in_out = key_ok[:, None] & ((col >= 0) & (col < out_width))[:, None]
            tl.store(out_rows + col[:, None], rounded(logits, OUT.dtype.element_ty),
                     mask=row_ok[None, :] & in_out)


class LogitsConfig(NamedTuple):
    """A launch of the logits kernel."""
    pairs: int = 256            # (head, query) pairs per program, on the MMA's N side: pairs // heads queries
    bn: int = 64                # keys per tile, on M
    num_warps: int = 4
    num_stages: int = 4
    store: int = 0              # interior tiles: 0 tl.store, 1 inline PTX, 2 inline PTX streaming (.cs);
                                # bfloat16 logits: tl.store, streaming for 2
    tiles_per_program: int = 0  # key tiles per program (0: just enough programs to fill the GPU once)


# Inline PTX stores straight from the accumulator's layout, skipping tl.store's trip through shared
# memory: dense 8.63 ms against 8.80 at 4096 x 128K (H200). The interpreter (and ROCm) cannot run
# PTX: there every config stores with tl.store.
_PTX_OK = not INTERPRET and torch.version.hip is None
DEFAULT_CONFIG = LogitsConfig(store=int(_PTX_OK))
# Routed scoring: its keys split over more programs per block of queries (each walking ~32 tiles),
# and streaming stores, as the top-k reads the logits once, later (they should not push keys and
# queries out of L2): 1.33 ms against 1.41 with neither (4096 x 128K, 8 heads, H200).
ROUTED_CONFIG = LogitsConfig(store=2 * int(_PTX_OK), tiles_per_program=32)


def key_splits(n_blocks: int, key_tiles: int, tiles_per_program: int, device) -> int:
    """Programs per block of queries: enough to fill the GPU once, and with ``tiles_per_program``
    set, enough that each program walks about that many of the ``key_tiles`` (at most 64)."""
    splits = max(1, (2 * sm_count(device)) // n_blocks)
    if tiles_per_program:
        splits = max(splits, triton.cdiv(key_tiles, tiles_per_program))
    return min(64, splits)


def launch_logits(q, w, k, k_scale, ks, ke, out, col_offset: int = 0, heads=None, config=None,
                  splits: int | None = None) -> torch.Tensor:
    """Write ``out[t, s - col_offset]`` for the key tiles each block of queries can see.

    ``q [T, H, D]`` fp8/bf16, ``w [T, H]`` f32, ``k [S, D]`` fp8/bf16 (``k_scale [S]`` or None),
    ``heads [T, h]`` int32 for routed scoring (None: all heads), ``out [T, W]`` f32 or bf16 (the
    float32 values rounded to nearest even, half the bytes; stored by ``tl.store`` whatever the
    config's store mode, streaming where it streams). Columns outside a query's ``[ks, ke)`` but
    inside its block's tiles get -inf; other columns are not touched, so readers must stay inside
    ``[ks, ke)``.
    """
    t, h_all, d = q.shape
    nh = heads.shape[1] if heads is not None else h_all
    if t == 0:
        return out
    cfg = config or (ROUTED_CONFIG if heads is not None else DEFAULT_CONFIG)
    if cfg.store not in (0, 1, 2):
        raise ValueError(f"config: store mode {cfg.store} is not 0 (tl.store) or 1 or 2 (inline PTX, plain or "
                         "streaming)")
    if out.dtype not in LOGITS_DTYPES:
        raise ValueError(f"out: expected float32 or bfloat16 logits, got {out.dtype}")
    if cfg.store and not _PTX_OK and out.dtype == torch.float32:
        raise ValueError("config: the inline-PTX store needs an NVIDIA GPU (the interpreter cannot run PTX)")
    bq = max(1, cfg.pairs // nh)
    col_unit = 16 if col_offset % 16 == 0 and out.stride(0) % 16 == 0 and out.data_ptr() % 64 == 0 else 1
    cast = mma_cast(q.dtype, k.dtype)
    n_blocks = triton.cdiv(t, bq)
    if splits is None:      # programs per block of queries (key_splits)
        splits = key_splits(n_blocks, triton.cdiv(k.shape[0], cfg.bn), cfg.tiles_per_program, q)
    _mqa_logits_kernel[(n_blocks, splits)](
        q, w, heads if heads is not None else ks, k, k_scale if k_scale is not None else w, ks, ke, out,
        t, k.shape[0], col_offset // col_unit, out.shape[1],
        q.stride(0), q.stride(1), w.stride(0), heads.stride(0) if heads is not None else 0, k.stride(0),
        out.stride(0),
        NH=nh, D=d, BQ=bq, BN=cfg.bn, ROUTED=heads is not None, HAS_SCALE=k_scale is not None,
        CAST=cast, COL_UNIT=col_unit, STORE=cfg.store, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


class SampleBuffers(NamedTuple):
    """Preallocated inputs and output of ``sample_logits`` for ``T`` queries (``misa.PrefillSelector``)."""
    values: torch.Tensor        # [T, n] float32, n = ceil(width / step): the output
    scales: torch.Tensor        # [>= n] float32: the sampled keys' scales, gathered here
    starts: torch.Tensor        # [T] int32 zeros
    ends: torch.Tensor          # [T] int32, each the number of sampled keys (``sampled_keys``)


def sampled_keys(num_keys: int, col_offset: int, width: int, step: int) -> int:
    """How many keys ``sample_logits`` scores: every ``step``-th of ``[col_offset, col_offset + width)``
    that exists."""
    return max(0, min(triton.cdiv(width, step), triton.cdiv(num_keys - col_offset, step)))


def sample_logits(q, w, k, k_scale, col_offset: int, width: int, step: int, heads=None,
                  buffers: SampleBuffers | None = None) -> torch.Tensor:
    """The logits of every ``step``-th column of a ``launch_logits`` window ``[col_offset,
    col_offset + width)``: ``[T, ceil(width / step)]`` f32, column j for key ``col_offset + j *
    step`` and every query, visible or not (the top-k's cut reads only the visible ones; columns
    past the last key are left unwritten). The same kernel on a strided view of the keys: about
    1/step of the window's work, in place of the cut's scattered loads from the window.
    ``buffers``: written into, nothing allocated."""
    t = q.shape[0]
    n = triton.cdiv(width, step)
    m = sampled_keys(k.shape[0], col_offset, width, step)
    keys = k[col_offset::step][:m]
    if buffers is None:
        starts, ends = _every_key(t, m, q.device)
        out = torch.empty(t, n, dtype=torch.float32, device=q.device)
        scales = k_scale[col_offset::step][:m].contiguous() if k_scale is not None else None
    else:
        out, starts, ends = buffers.values, buffers.starts, buffers.ends
        scales = None
        if k_scale is not None:
            scales = buffers.scales[:m]
            scales.copy_(k_scale[col_offset::step][:m])
    if t == 0 or m == 0:
        return out
    return launch_logits(q, w, keys, scales, starts, ends, out, heads=heads)


@functools.lru_cache(maxsize=16)
def _every_key(t: int, n: int, device: torch.device):
    """``ks = 0, ke = n`` for ``t`` queries, kept: two launches fewer per sample (read only)."""
    return (torch.zeros(t, dtype=torch.int32, device=device),
            torch.full((t,), n, dtype=torch.int32, device=device))


# Heads per query up to which a selection computes its top-k's sample with sample_logits: 8 routed
# heads take ~0.05 ms where the cut's scattered loads take ~0.21 (4096 x 128K, H200); with all 64
# heads the sample costs about what it saves.
SAMPLE_MAX_HEADS = 16


def cut_step(width: int, n_heads: int) -> int:
    """The column step of ``cut_sample``'s sample for a window ``width`` wide scored with ``n_heads``
    heads per query, or 0 where it computes none."""
    step = sample_step(width)
    return 0 if step == 1 or n_heads > SAMPLE_MAX_HEADS else step


def cut_sample(q, w, k, k_scale, col_offset: int, width: int, heads=None, buffers: SampleBuffers | None = None):
    """The ``topk`` sample ``(values, step)`` for a ``launch_logits`` window, or None where the
    top-k's own cut is as cheap: rows too short to sample, or too many heads per query.
    ``buffers``: as for ``sample_logits``."""
    step = cut_step(width, heads.shape[1] if heads is not None else q.shape[1])
    if not step:
        return None
    return sample_logits(q, w, k, k_scale, col_offset, width, step, heads=heads, buffers=buffers), step


def dsa_logits(inp) -> torch.Tensor:
    out = torch.full((inp.num_queries, inp.num_keys), float("-inf"), device=inp.q.device)
    return launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, out)
