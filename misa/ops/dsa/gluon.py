"""Hopper (sm_90) Gluon kernel for MISA's routed scoring: ``triton.py``'s math, warp-specialized.

Why a second kernel: in routed scoring the epilogue (relu, head weights, head sum, key scale, a
float32 store per (query, key)) is as long as the MMA, and Triton 3.6 waits for every
``warp_group_dot`` right after issuing it, so a program alternates between the two; the overlap
that exists comes from the two programs an SM holds (docs/benchmarks.md). Here one program per SM
(persistent) runs three partitions: a loader warp streams key tiles by TMA into a ring of shared
buffers, and two consumer warpgroups, each with its own half of the block's queries, score every
tile. The warpgroups share the tensor cores, so one's epilogue runs while the other's MMA does, and
each key tile is read from L2 once for both halves. Interior tiles' logits go out through shared
memory by TMA (whole 256-byte rows per query) when the output rows are 16-byte aligned.

Layout as in ``triton.py``: keys on M (the TMA'd tile is the A operand), (query, head) pairs on N
in head-major order (pair ``p`` = head slot ``p // BQ``, query ``p % BQ``), so a query's heads sit
in one thread and the head sum needs no shuffles. ``triton.py``'s kernel stays the reference: the
interpreter runs it in CI, and tests/test_gluon_kernel.py compares the two on a Hopper GPU.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..triton_common import sm_count


@gluon.jit
def _block_tiles(KS, KE, T, block, split, n_split, BQ2: gl.constexpr, BN: gl.constexpr):
    """The key tiles of a block of ``BQ2`` queries that split ``split`` of ``n_split`` walks:
    ``first + j * n_split`` for ``j < n``. Every partition computes it alike."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    rows = block * BQ2 + gl.arange(0, BQ2, layout=layout)
    ok = rows < T
    first = gl.min(gl.load(KS + rows, mask=ok, other=2147483647), axis=0) // BN + split
    n = gl.cdiv(gl.maximum(gl.cdiv(gl.max(gl.load(KE + rows, mask=ok, other=0), axis=0), BN) - first, 0), n_split)
    return first, n


@gluon.jit
def _loader(k_desc, o_desc, KS, KE, k_bufs, ready, empty, T, n_items, n_blocks, n_split,
            BQ: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    it = 0                                      # tiles loaded so far: ring slot and phase
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        first, n = _block_tiles(KS, KE, T, item % n_blocks, item // n_blocks, n_split, 2 * BQ, BN)
        for j in range(n):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [(first + j * n_split) * BN, 0], ready.index(s), k_bufs.index(s))
            it += 1


@gluon.jit
def _consume(k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_buf, c_bufs, ready, empty,
             T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
             n_items, n_blocks, n_split, HALF: gl.constexpr, NH: gl.constexpr, BQ: gl.constexpr,
             BN: gl.constexpr, STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, TMA_STORE: gl.constexpr):
    """One consumer warpgroup: queries ``[HALF * BQ, HALF * BQ + BQ)`` of each block, every key
    tile the loader brings in for it."""
    NP: gl.constexpr = BQ * NH
    D: gl.constexpr = k_desc.block_type.shape[1]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, NP, 32])
    zero = gl.zeros([BN, NP], gl.float32, layout=acc_layout)
    out_layout: gl.constexpr = gl.sum(gl.reshape(zero, [BN, NH, BQ]), axis=1).type.layout    # [BN, BQ] logits
    out_rows: gl.constexpr = gl.SliceLayout(0, out_layout)
    out_keys: gl.constexpr = gl.SliceLayout(1, out_layout)
    q_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // D, D // 16], [4, 1], [1, 0])
    Q_PARTS: gl.constexpr = 4
    pair_q = gl.arange(0, NP // Q_PARTS, layout=gl.SliceLayout(1, q_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    pair_w = gl.arange(0, NP, layout=gl.SliceLayout(0, acc_layout))
    qt = q_buf.permute((1, 0))                  # [D, NP]: the B operand, K-major
    it = 0
    n_stored = 0
    for item in range(gl.program_id(0), n_items, gl.num_programs(0)):
        block = item % n_blocks
        first, n = _block_tiles(KS, KE, T, block, item // n_blocks, n_split, 2 * BQ, BN)
        q0 = (2 * block + HALF) * BQ
        rows = q0 + gl.arange(0, BQ, layout=out_rows)
        row_ok = rows < T
        ks = gl.load(KS + rows, mask=row_ok, other=2147483647)
        ke = gl.load(KE + rows, mask=row_ok, other=0)
        # key tiles every query of this half sees, inside the output window: no masks
        fast_lo = gl.maximum(gl.max(ks, axis=0), col0)
        fast_hi = gl.minimum(gl.min(ke, axis=0), col0 + out_width)
        if q0 + BQ > T:
            fast_hi = -1
        # this half's (query, head) rows of q, gathered by head, and their weights; the previous
        # item's MMAs are complete (each tile waits for its own), so q_buf is free
        for part in gl.static_range(Q_PARTS):            # in parts: fewer registers held at once
            pair = part * (NP // Q_PARTS) + pair_q
            pq = q0 + pair % BQ
            head = gl.load(HEADS + pq * stride_ht + pair // BQ, mask=pq < T, other=0)
            q = gl.load(Q + pq[:, None].to(gl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=(pq < T)[:, None], other=0.0)
            q_buf.slice(part * (NP // Q_PARTS), NP // Q_PARTS).store(q)
        fence_async_shared()
        gl.thread_barrier()
        wq = q0 + pair_w % BQ
        w_head = gl.load(HEADS + wq * stride_ht + pair_w // BQ, mask=wq < T, other=0)
        w_pairs = gl.load(W + wq * stride_wt + w_head, mask=wq < T, other=0.0)
        for j in range(n):
            s = it % STAGES
            tile = first + j * n_split
            keys = tile * BN + gl.arange(0, BN, layout=out_keys)
            if HAS_SCALE:
                scale = gl.load(KSCALE + keys, mask=keys < S, other=0.0)    # in flight during the MMA
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            acc = warpgroup_mma(k_bufs.index(s), qt, zero, use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(s), count=1)
            it += 1
            x = gl.maximum(acc, 0.0) * w_pairs[None, :]
            logits = gl.sum(gl.reshape(x, [BN, NH, BQ]), axis=1)       # [BN, BQ]
            if HAS_SCALE:
                logits = logits * scale[:, None]
            col = keys - col0
            if (tile * BN >= fast_lo) & (tile * BN + BN <= fast_hi):
                if TMA_STORE:
                    buf = c_bufs.index(2 * HALF + n_stored % 2)
                    tma.store_wait(1)               # the store from this buffer two tiles ago is out
                    buf.store(gl.permute(logits, (1, 0)))
                    fence_async_shared()
                    gl.thread_barrier()
                    tma.async_copy_shared_to_global(o_desc, [q0, tile * BN - col0], buf)
                    n_stored += 1
                else:
                    # streaming stores: the logits are read once, much later, by the top-k
                    gl.store(OUT + rows[None, :].to(gl.int64) * stride_out + col[:, None], logits,
                             cache_modifier=".cs")
            else:
                inside = (keys[:, None] >= ks[None, :]) & (keys[:, None] < ke[None, :])
                in_out = (keys < S) & (col >= 0) & (col < out_width)
                gl.store(OUT + rows[None, :].to(gl.int64) * stride_out + col[:, None],
                         gl.where(inside, logits, float("-inf")), mask=row_ok[None, :] & in_out[:, None])
    if TMA_STORE:
        tma.store_wait(0)


@gluon.jit
def _consume_first(k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs, c_bufs, ready, empty,
                   T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
                   n_items, n_blocks, n_split, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                   STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, TMA_STORE: gl.constexpr):
    _consume(k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs.index(0), c_bufs, ready,
             empty, T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
             n_items, n_blocks, n_split, 0, NH, BQ, BN, STAGES, HAS_SCALE, TMA_STORE)


@gluon.jit
def _consume_second(k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs, c_bufs, ready, empty,
                    T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
                    n_items, n_blocks, n_split, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                    STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, TMA_STORE: gl.constexpr):
    _consume(k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs.index(1), c_bufs, ready,
             empty, T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
             n_items, n_blocks, n_split, 1, NH, BQ, BN, STAGES, HAS_SCALE, TMA_STORE)


@gluon.jit
def _load_first(k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs, c_bufs, ready, empty,
                T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
                n_items, n_blocks, n_split, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, TMA_STORE: gl.constexpr):
    _loader(k_desc, o_desc, KS, KE, k_bufs, ready, empty, T, n_items, n_blocks, n_split, BQ, BN, STAGES)


@gluon.jit(do_not_specialize=["T", "S", "col0", "out_width", "n_items", "n_blocks", "n_split"])
def _routed_logits_kernel(
    k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT,
    T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
    n_items, n_blocks, n_split,
    NH: gl.constexpr, D: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    HAS_SCALE: gl.constexpr, TMA_STORE: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Persistent: program ``p`` takes work items ``p, p + programs, ...``; item ``i`` is block
    ``i % n_blocks`` of ``2 * BQ`` queries and split ``i // n_blocks`` of its key tiles, so the
    programs running at once share key tiles in L2."""
    NP: gl.constexpr = BQ * NH
    q_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, NP, D],
                                       gl.NVMMASharedLayout.get_default_for([NP, D], gl.float8e4nv))
    k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, D], k_desc.layout)
    if TMA_STORE:
        c_bufs = gl.allocate_shared_memory(gl.float32, [4, BQ, BN], o_desc.layout)      # two per consumer
    else:
        c_bufs = gl.allocate_shared_memory(gl.float32, [4, 1, 16],
                                           gl.NVMMASharedLayout.get_default_for([1, 16], gl.float32))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)          # both consumers release a tile
    fence_async_shared()
    gl.warp_specialize([
        (_consume_first, (k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs, c_bufs, ready, empty,
                          T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
                          n_items, n_blocks, n_split, NH, BQ, BN, STAGES, HAS_SCALE, TMA_STORE)),
        (_consume_second, (k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs, c_bufs, ready, empty,
                           T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
                           n_items, n_blocks, n_split, NH, BQ, BN, STAGES, HAS_SCALE, TMA_STORE)),
        (_load_first, (k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT, k_bufs, q_bufs, c_bufs, ready, empty,
                       T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
                       n_items, n_blocks, n_split, NH, BQ, BN, STAGES, HAS_SCALE, TMA_STORE)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# (pairs per consumer warpgroup, keys per tile, TMA ring depth, key tiles per work item, TMA
# stores, consumer registers)
GLUON_CONFIG = (256, 64, 4, 64, True, 240)
LOADER_REGS = 24


def gluon_supported(q, k, heads) -> bool:
    """Routed fp8 scoring with a power-of-two number of heads per query on a Hopper GPU: the
    case this kernel covers."""
    if heads is None:
        return False
    nh = heads.shape[1]
    return (q.is_cuda and torch.version.hip is None and nh & (nh - 1) == 0 and nh <= GLUON_CONFIG[0] // 8
            and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype == torch.float8_e4m3fn and k.dtype == torch.float8_e4m3fn
            and q.shape[2] in (64, 128) and q.stride(2) == 1 and k.stride(1) == 1
            and (k.stride(0) * k.element_size()) % 16 == 0 and k.data_ptr() % 16 == 0)


def launch_routed_logits(q, w, k, k_scale, ks, ke, out, heads, col_offset: int = 0, config=None,
                         splits: int | None = None) -> torch.Tensor:
    """``triton.launch_logits``' contract for routed fp8 scoring on Hopper (``gluon_supported``)."""
    t, _, d = q.shape
    nh = heads.shape[1]
    if t == 0:
        return out
    pairs, bn, stages, tiles_per_item, tma_store, consumer_regs = config or GLUON_CONFIG
    bq = max(1, pairs // nh)
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [bn, d],
                              gl.NVMMASharedLayout.get_default_for([bn, d], gl.float8e4nv))
    # TMA writes 16-byte aligned rows only; otherwise every tile stores from registers
    tma_store = bool(tma_store) and out.stride(1) == 1 and out.stride(0) % 4 == 0 and out.data_ptr() % 16 == 0
    o_desc = k_desc
    if tma_store:
        o_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), [bq, bn],
                                  gl.NVMMASharedLayout.get_default_for([bq, bn], gl.float32))
    n_blocks = triton.cdiv(t, 2 * bq)
    if splits is None:
        splits = max(1, triton.cdiv(triton.cdiv(k.shape[0], bn), tiles_per_item))
    n_items = n_blocks * splits
    # three warpgroups share the register file: the loader's gives most of its share to the consumers
    maxnreg = (2 * consumer_regs + LOADER_REGS) // 3 // 8 * 8
    _routed_logits_kernel[(min(n_items, sm_count(q)),)](
        k_desc, o_desc, q, w, heads, k_scale if k_scale is not None else w, ks, ke, out,
        t, k.shape[0], col_offset, out.shape[1], q.stride(0), q.stride(1), w.stride(0), heads.stride(0),
        out.stride(0), n_items, n_blocks, splits,
        NH=nh, D=d, BQ=bq, BN=bn, STAGES=stages, HAS_SCALE=k_scale is not None, TMA_STORE=tma_store,
        CONSUMER_REGS=consumer_regs, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=maxnreg,
    )
    return out
