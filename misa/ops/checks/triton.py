"""The value checks of ``reference.py`` in one launch: each program scans a stretch of one input
(q, the keys, their scales, the weights, or the query ranges) and folds its result into the flag
vector with an atomic max (min for ``min(ks)``). Running them as PyTorch ops took ~20 launches and
their intermediates; here a call costs one launch and one read of each input. fp8 inputs are read
four bytes to a word, by enough programs to keep many loads in flight."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant import FP8
from .reference import FLAGS

BLOCK = 4096                # elements (fp8 inputs: 4-byte words) per program and step
MAX_PROGRAMS = 1024         # per input: ~8 per SM on an H100, enough loads in flight to stream at full bandwidth
NUM_FLAGS = len(FLAGS)

# how ``_scan`` reads an input: float elements, fp8 bytes, fp8 in int32 words (constexpr: the kernels compare them)
FLOAT, FP8_BYTES, FP8_WORDS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _bad(x, FMT: tl.constexpr):
    if FMT == FP8_WORDS:                                 # four float8_e4m3fn in a word: any byte S.1111.111
        return (((x & 0x7F) == 0x7F) | (((x >> 8) & 0x7F) == 0x7F) | (((x >> 16) & 0x7F) == 0x7F)
                | (((x >> 24) & 0x7F) == 0x7F))
    if FMT == FP8_BYTES:
        return (x & 0x7F) == 0x7F                        # uint8 view of float8_e4m3fn: NaN
    xf = x.to(tl.float32)
    return (xf != xf) | (tl.abs(xf) == float("inf"))


@triton.jit
def _scan(X, n, prog, nprog, OUT, slot, FMT: tl.constexpr, POSITIVE: tl.constexpr, BLOCK: tl.constexpr):
    """Programs ``prog`` of ``nprog`` scan ``X[:n]`` with a grid stride; ``OUT[slot] = 1`` on a bad
    value. (Masked loads throughout: loading whole blocks unmasked, vectorised, measured slower.)"""
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    for start in range(prog * BLOCK, n, nprog * BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(X + i, mask=m, other=1)
        b = _bad(x, FMT)
        if POSITIVE:
            b = b | (x.to(tl.float32) <= 0.0)
        bad = bad | (b & m)
    tl.atomic_max(OUT + slot, tl.max(bad.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["n_q", "n_k", "n_s", "n_w", "n_t", "num_keys"])
def _checks_kernel(Q, n_q, K, n_k, KSCALE, n_s, W, n_w, KS, KE, n_t, num_keys, OUT,
                   P_Q: tl.constexpr, P_K: tl.constexpr, P_S: tl.constexpr, P_W: tl.constexpr,
                   Q_FMT: tl.constexpr, K_FMT: tl.constexpr, BLOCK: tl.constexpr,
                   NF: tl.constexpr):
    pid = tl.program_id(0)
    if pid < P_Q:
        _scan(Q, n_q, pid, P_Q, OUT, 0, Q_FMT, False, BLOCK)
    elif pid < P_Q + P_K:
        _scan(K, n_k, pid - P_Q, P_K, OUT, 1, K_FMT, False, BLOCK)
    elif pid < P_Q + P_K + P_S:
        _scan(KSCALE, n_s, pid - P_Q - P_K, P_S, OUT, 2, FLOAT, True, BLOCK)
    elif pid < P_Q + P_K + P_S + P_W:
        _scan(W, n_w, pid - P_Q - P_K - P_S, P_W, OUT, 3, FLOAT, False, BLOCK)
    else:
        neg = tl.zeros([BLOCK], dtype=tl.int1)
        order = tl.zeros([BLOCK], dtype=tl.int1)
        past = tl.zeros([BLOCK], dtype=tl.int1)
        lo = tl.full([BLOCK], 2147483647, dtype=tl.int32)
        hi = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, n_t, BLOCK):
            i = start + tl.arange(0, BLOCK)
            m = i < n_t
            ks = tl.load(KS + i, mask=m, other=0)
            ke = tl.load(KE + i, mask=m, other=0)
            neg = neg | (m & (ks < 0))
            order = order | (m & (ks > ke))
            past = past | (m & (ke > num_keys))
            lo = tl.minimum(lo, tl.where(m, ks, 2147483647))
            hi = tl.maximum(hi, tl.where(m, ke, 0))
        tl.store(OUT + 4, tl.max(neg.to(tl.int64), axis=0))
        tl.store(OUT + 5, tl.max(order.to(tl.int64), axis=0))
        tl.store(OUT + 6, tl.max(past.to(tl.int64), axis=0))
        tl.store(OUT + NF, tl.min(lo, axis=0).to(tl.int64))
        tl.store(OUT + NF + 1, tl.max(hi, axis=0).to(tl.int64))


def _programs(n: int) -> int:
    """Programs for an input of ``n`` elements: ~4 blocks each, at most ``MAX_PROGRAMS``."""
    return max(1, min(MAX_PROGRAMS, triton.cdiv(n, 4 * BLOCK)))


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as the flat vector ``_scan`` reads and its format: fp8 as int32 words where its bytes
    fill whole aligned words (four bytes per load and compare), else as bytes."""
    x = x.reshape(-1)
    if x.dtype != FP8:
        return x, FLOAT.value
    x = x.view(torch.uint8)
    if x.numel() % 4 == 0 and x.data_ptr() % 4 == 0:
        return x.view(torch.int32), FP8_WORDS.value
    return x, FP8_BYTES.value


def input_flags(q, k, k_scale, weights, ks, ke, num_keys: int) -> torch.Tensor:
    out = torch.zeros(NUM_FLAGS + 2, dtype=torch.int64, device=q.device)
    (qf, q_fmt), (kf, k_fmt), (wf, _) = _flat(q), _flat(k), _flat(weights)
    sf = k_scale.reshape(-1) if k_scale is not None else wf[:0]
    p_q, p_k, p_s, p_w = _programs(qf.numel()), _programs(kf.numel()), _programs(sf.numel()), _programs(wf.numel())
    _checks_kernel[(p_q + p_k + p_s + p_w + 1,)](
        qf, qf.numel(), kf, kf.numel(), sf, sf.numel(), wf, wf.numel(), ks, ke, ks.numel(), num_keys, out,
        P_Q=p_q, P_K=p_k, P_S=p_s, P_W=p_w, Q_FMT=q_fmt, K_FMT=k_fmt, BLOCK=BLOCK, NF=NUM_FLAGS)
    return out


@triton.jit(do_not_specialize=["n_q", "n_w", "B", "P", "num_pages"])
def _paged_checks_kernel(Q, n_q, W, n_w, CTX, TABLE, B, P, stride_table, num_pages, OUT,
                         P_Q: tl.constexpr, P_W: tl.constexpr, N: tl.constexpr, PAGE: tl.constexpr,
                         Q_FMT: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr,
                         SANITIZE: tl.constexpr):
    pid = tl.program_id(0)
    if pid < P_Q:
        _scan(Q, n_q, pid, P_Q, OUT, 0, Q_FMT, False, BLOCK)
    elif pid < P_Q + P_W:
        _scan(W, n_w, pid - P_Q, P_W, OUT, 1, FLOAT, False, BLOCK)
    else:
        b = pid - P_Q - P_W                                  # one program per sequence
        ctx = tl.load(CTX + b)
        pages = (ctx + PAGE - 1) // PAGE
        tl.atomic_max(OUT + 2, (ctx < N).to(tl.int64))
        tl.atomic_max(OUT + 3, (pages > P).to(tl.int64))
        bad = tl.zeros([COLS], dtype=tl.int1)
        for c0 in range(0, tl.minimum(pages, P), COLS):
            c = c0 + tl.arange(0, COLS)
            m = c < tl.minimum(pages, P)
            page = tl.load(TABLE + b.to(tl.int64) * stride_table + c, mask=m, other=0)
            bad = bad | (m & ((page < 0) | (page >= num_pages)))
        tl.atomic_max(OUT + 4, tl.max(bad.to(tl.int64), axis=0))
        tl.atomic_max(OUT + 5, ctx.to(tl.int64))
        if SANITIZE:            # after the checks: what the selection reads now stays inside the cache
            ctx = tl.minimum(tl.maximum(ctx, N), P * PAGE)
            tl.store(CTX + b, ctx)
            pages = (ctx + PAGE - 1) // PAGE
            for c0 in range(0, pages, COLS):
                c = c0 + tl.arange(0, COLS)
                m = c < pages
                page = tl.load(TABLE + b.to(tl.int64) * stride_table + c, mask=m, other=0)
                page = tl.where((page < 0) | (page >= num_pages), 0, page)
                tl.store(TABLE + b.to(tl.int64) * stride_table + c, page, mask=m)


def paged_flags(q, weights, context_lens, block_table, num_pages: int, page_size: int, *,
                out: torch.Tensor | None = None, sanitize: bool = False) -> torch.Tensor:
    """As ``reference.paged_flags`` (``out`` and ``sanitize`` included), in one launch: with ``out``
    given it allocates nothing and can be captured in a CUDA graph."""
    from .reference import PAGED_FLAGS
    if out is None:
        out = torch.zeros(len(PAGED_FLAGS) + 1, dtype=torch.int64, device=q.device)
    else:
        out.zero_()
    (qf, q_fmt), wf = _flat(q), weights.reshape(-1)
    p_q, p_w = _programs(qf.numel()), _programs(wf.numel())
    b = context_lens.shape[0]
    _paged_checks_kernel[(p_q + p_w + b,)](
        qf, qf.numel(), wf, wf.numel(), context_lens, block_table, b, block_table.shape[1], block_table.stride(0),
        num_pages, out, P_Q=p_q, P_W=p_w, N=q.shape[1], PAGE=page_size, Q_FMT=q_fmt, BLOCK=BLOCK,
        COLS=1024, SANITIZE=sanitize)
    return out
