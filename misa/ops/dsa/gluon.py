"""Hopper (sm_90) Gluon kernel for MISA's routed scoring: the Triton kernel's math, with each key
tile's MMA running while the previous tile's epilogue does.

Why a second kernel: in the routed scoring the epilogue (relu, head weights, head sum, key scale,
float32 stores) takes as long as the MMA, and Triton 3.6 waits for every ``warp_group_dot`` right
after issuing it, so each program alternates between the two (docs/benchmarks.md, fifth and sixth
sessions). Gluon exposes the asynchronous ``warpgroup_mma`` and its wait: here the key tiles come
in by TMA into a ring of shared-memory buffers, and each iteration issues tile ``j + 1``'s MMA,
waits only for tile ``j``'s (one MMA left in flight), then runs tile ``j``'s epilogue on the CUDA
cores while the tensor cores work.

Layout as in ``triton.py``: keys on M (the TMA'd tile is the A operand), (query, head) pairs on N
in head-major order (pair ``p`` = head slot ``p // BQ``, query ``p % BQ``), so a query's heads
sit in one thread and the head sum needs no shuffles. ``triton.py``'s kernel stays the reference:
the interpreter runs it in CI and the GPU test compares the two.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _tile_epilogue(acc, w_pairs, tile, scale, rows, row_ok, row_ks, row_ke, fast_lo, fast_hi, OUT, S, col0,
                   out_width, stride_out, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                   HAS_SCALE: gl.constexpr):
    """relu, head weights and head sum of one ``[BN, NH * BQ]`` accumulator, then the key scale
    (loaded an iteration ahead) and the store of ``[BN, BQ]`` logits (masked only on tiles at the
    edges of the ranges); the row vectors come in the logits' column layout."""
    x = gl.maximum(acc, 0.0) * w_pairs[None, :]
    logits = gl.sum(gl.reshape(x, [BN, NH, BQ]), axis=1)           # [BN, BQ]
    keys = tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, logits.type.layout))
    col = keys - col0
    ptrs = OUT + rows[None, :].to(gl.int64) * stride_out + col[:, None]
    if HAS_SCALE:
        logits = logits * scale[:, None]
    if (tile * BN >= fast_lo) & (tile * BN + BN <= fast_hi):
        # streaming stores: the logits are read once, much later, by the top-k
        gl.store(ptrs, logits, cache_modifier=".cs")
    else:
        key_ok = keys < S
        inside = (keys[:, None] >= row_ks[None, :]) & (keys[:, None] < row_ke[None, :])
        logits = gl.where(inside, logits, float("-inf"))
        in_out = key_ok & (col >= 0) & (col < out_width)
        gl.store(ptrs, logits, mask=row_ok[None, :] & in_out[:, None])


@gluon.jit
def _key_scales(KSCALE, tile, S, layout: gl.constexpr, BN: gl.constexpr, HAS_SCALE: gl.constexpr):
    """A key tile's scales (zero past the last key; ones, unused, without scales)."""
    keys = tile * BN + gl.arange(0, BN, layout=layout)
    if HAS_SCALE:
        scale = gl.load(KSCALE + keys, mask=keys < S, other=0.0)
    else:
        scale = gl.full([BN], 1.0, gl.float32, layout=layout)
    return scale


@gluon.jit(do_not_specialize=["T", "S", "col0", "out_width"])
def _routed_logits_kernel(
    k_desc, Q, W, HEADS, KSCALE, KS, KE, OUT,
    T, S, col0, out_width,
    stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
    NH: gl.constexpr, D: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    HAS_SCALE: gl.constexpr, num_warps: gl.constexpr,
):
    NP: gl.constexpr = BQ * NH
    pid_q = gl.program_id(0)
    pid_s = gl.program_id(1)
    n_split = gl.num_programs(1)

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, NP, 32])
    pair_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
    row_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    q_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // D, D // 16], [num_warps, 1], [1, 0])

    # the block's queries and the key tiles any of them can see
    rows = pid_q * BQ + gl.arange(0, BQ, layout=row_layout)
    row_ok = rows < T
    ks = gl.load(KS + rows, mask=row_ok, other=2147483647)
    ke = gl.load(KE + rows, mask=row_ok, other=0)
    fast_lo = gl.maximum(gl.max(ks, axis=0), col0)
    fast_hi = gl.minimum(gl.min(ke, axis=0), col0 + out_width)
    if pid_q * BQ + BQ > T:
        fast_hi = -1                                   # a partial block of queries: every tile masked
    first = gl.min(ks, axis=0) // BN + pid_s
    n_tiles = gl.maximum(gl.cdiv(gl.max(ke, axis=0), BN) - first, 0)
    n_mine = gl.cdiv(n_tiles, n_split)

    # the (query, head) pairs' query rows (gathered by head) into shared memory, once
    p = gl.arange(0, NP, layout=gl.SliceLayout(1, q_layout))
    pq = pid_q * BQ + p % BQ
    pq_ok = pq < T
    head = gl.load(HEADS + pq * stride_ht + p // BQ, mask=pq_ok, other=0)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(Q + pq[:, None].to(gl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=pq_ok[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [NP, D], gl.NVMMASharedLayout.get_default_for([NP, D],
                                                                                               gl.float8e4nv), q)
    qt = q_smem.permute((1, 0))                        # [D, NP]: the B operand, K-major
    wp = gl.arange(0, NP, layout=pair_layout)
    wq = pid_q * BQ + wp % BQ
    w_head = gl.load(HEADS + wq * stride_ht + wp // BQ, mask=wq < T, other=0)
    w_pairs = gl.load(W + wq * stride_wt + w_head, mask=wq < T, other=0.0)

    k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, D], k_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    zero = gl.zeros([BN, NP], gl.float32, layout=acc_layout)
    # the block's row vectors in the layout of the epilogue's [BN, BQ] logits (the head sum's)
    out_layout: gl.constexpr = gl.sum(gl.reshape(zero, [BN, NH, BQ]), axis=1).type.layout
    out_rows: gl.constexpr = gl.SliceLayout(0, out_layout)
    out_keys: gl.constexpr = gl.SliceLayout(1, out_layout)
    o_rows = gl.convert_layout(rows, out_rows)
    o_ok = gl.convert_layout(row_ok, out_rows)
    o_ks = gl.convert_layout(ks, out_rows)
    o_ke = gl.convert_layout(ke, out_rows)
    if n_mine > 0:
        for i in gl.static_range(STAGES):
            ok = i < n_mine
            mbarrier.expect(bars.index(i), k_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(k_desc, [(first + i * n_split) * BN, 0], bars.index(i), k_bufs.index(i),
                                            pred=ok)
        mbarrier.wait(bars.index(0), 0)
        pending = warpgroup_mma(k_bufs.index(0), qt, zero, use_acc=False, is_async=True)
        scale = _key_scales(KSCALE, first, S, out_keys, BN, HAS_SCALE)
        for j in range(n_mine - 1):
            nxt = (j + 1) % STAGES
            mbarrier.wait(bars.index(nxt), ((j + 1) // STAGES) & 1)
            in_flight = warpgroup_mma(k_bufs.index(nxt), qt, zero, use_acc=False, is_async=True)
            # the next tile's key scales, a tile ahead: their load latency hides behind this epilogue
            scale_next = _key_scales(KSCALE, first + (j + 1) * n_split, S, out_keys, BN, HAS_SCALE)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(pending, ))
            # tile j's buffer is free: refill it with tile j + STAGES
            refill = j + STAGES < n_mine
            cur = j % STAGES
            mbarrier.expect(bars.index(cur), k_desc.block_type.nbytes, pred=refill)
            tma.async_copy_global_to_shared(k_desc, [(first + (j + STAGES) * n_split) * BN, 0], bars.index(cur),
                                            k_bufs.index(cur), pred=refill)
            _tile_epilogue(acc, w_pairs, first + j * n_split, scale, o_rows, o_ok, o_ks, o_ke, fast_lo, fast_hi, OUT,
                           S, col0, out_width, stride_out, NH, BQ, BN, HAS_SCALE)
            pending = in_flight
            scale = scale_next
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(pending, ))
        _tile_epilogue(acc, w_pairs, first + (n_mine - 1) * n_split, scale, o_rows, o_ok, o_ks, o_ke, fast_lo,
                       fast_hi, OUT, S, col0, out_width, stride_out, NH, BQ, BN, HAS_SCALE)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


# (pairs on N, keys per tile on M, warps, TMA ring depth, key tiles per program)
GLUON_CONFIG = (128, 64, 4, 4, 32)


def gluon_supported(q, k, heads) -> bool:
    """Routed fp8 scoring on a Hopper GPU: the only case this kernel covers."""
    if heads is None:
        return False
    nh = heads.shape[1]
    return (q.is_cuda and torch.version.hip is None and nh & (nh - 1) == 0 and nh <= GLUON_CONFIG[0] // 8
            and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype == torch.float8_e4m3fn and k.dtype == torch.float8_e4m3fn
            and q.shape[2] in (64, 128) and k.stride(1) == 1 and (k.stride(0) * k.element_size()) % 16 == 0
            and k.data_ptr() % 16 == 0 and q.stride(2) == 1)


def launch_routed_logits(q, w, k, k_scale, ks, ke, out, heads, col_offset: int = 0, config=None,
                         splits: int | None = None) -> torch.Tensor:
    """``launch_logits``' contract (``triton.py``) for routed fp8 scoring on Hopper."""
    from .triton import key_splits
    t, _, d = q.shape
    nh = heads.shape[1]
    if t == 0:
        return out
    pairs, bn, warps, stages, tiles_per_program = config or GLUON_CONFIG
    bq = max(1, pairs // nh)
    layout = gl.NVMMASharedLayout.get_default_for([bn, d], gl.float8e4nv)
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [bn, d], layout)
    n_blocks = triton.cdiv(t, bq)
    if splits is None:
        splits = key_splits(n_blocks, triton.cdiv(k.shape[0], bn), tiles_per_program, q)
    _routed_logits_kernel[(n_blocks, splits)](
        k_desc, q, w, heads, k_scale if k_scale is not None else w, ks, ke, out,
        t, k.shape[0], col_offset, out.shape[1],
        q.stride(0), q.stride(1), w.stride(0), heads.stride(0), out.stride(0),
        NH=nh, D=d, BQ=bq, BN=bn, STAGES=stages, HAS_SCALE=k_scale is not None, num_warps=warps,
    )
    return out


# ---- warp-specialized variant: one loader warp, two consumer warpgroups sharing each key tile ----

@gluon.jit
def _ws_loader(descs, ptrs, smem, dims, prog, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
               STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, STORE_MODE: gl.constexpr):
    k_desc, o_desc = descs
    k_bufs, q_bufs, c_bufs, ready, empty = smem
    pid_q, first, n_split, n_mine, fast_lo, fast_hi = prog
    for j in range(n_mine):
        s = j % STAGES
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [(first + j * n_split) * BN, 0], ready.index(s), k_bufs.index(s))


@gluon.jit
def _ws_consume(descs, ptrs, smem, dims, prog, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, STORE_MODE: gl.constexpr, HALF: gl.constexpr):
    """One consumer warpgroup: queries ``[HALF * BQ, HALF * BQ + BQ)`` of the program's block,
    every key tile the loader brings in."""
    k_desc, o_desc = descs
    Q, W, HEADS, KSCALE, KS, KE, OUT = ptrs
    k_bufs, q_bufs, c_bufs, ready, empty = smem
    T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out = dims
    pid_q, first, n_split, n_mine, fast_lo, fast_hi = prog
    NP: gl.constexpr = BQ * NH
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, NP, 32])
    zero = gl.zeros([BN, NP], gl.float32, layout=acc_layout)
    out_layout: gl.constexpr = gl.sum(gl.reshape(zero, [BN, NH, BQ]), axis=1).type.layout
    out_rows: gl.constexpr = gl.SliceLayout(0, out_layout)
    out_keys: gl.constexpr = gl.SliceLayout(1, out_layout)
    q0 = (2 * pid_q + HALF) * BQ
    rows = q0 + gl.arange(0, BQ, layout=out_rows)
    row_ok = rows < T
    ks = gl.load(KS + rows, mask=row_ok, other=2147483647)
    ke = gl.load(KE + rows, mask=row_ok, other=0)
    wp = gl.arange(0, NP, layout=gl.SliceLayout(0, acc_layout))
    wq = q0 + wp % BQ
    w_head = gl.load(HEADS + wq * stride_ht + wp // BQ, mask=wq < T, other=0)
    w_pairs = gl.load(W + wq * stride_wt + w_head, mask=wq < T, other=0.0)
    qt = q_bufs.index(HALF).permute((1, 0))
    for j in range(n_mine):
        s = j % STAGES
        tile = first + j * n_split
        scale = _key_scales(KSCALE, tile, S, out_keys, BN, HAS_SCALE)    # in flight during the MMA
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        acc = warpgroup_mma(k_bufs.index(s), qt, zero, use_acc=False, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(s), count=1)
        if STORE_MODE == 0:
            _tile_epilogue(acc, w_pairs, tile, scale, rows, row_ok, ks, ke, fast_lo, fast_hi, OUT, S, col0,
                           out_width, stride_out, NH, BQ, BN, HAS_SCALE)
        elif (tile * BN >= fast_lo) & (tile * BN + BN <= fast_hi):
            x = gl.maximum(acc, 0.0) * w_pairs[None, :]
            logits = gl.sum(gl.reshape(x, [BN, NH, BQ]), axis=1)
            if HAS_SCALE:
                logits = logits * scale[:, None]
            if STORE_MODE == 1:
                # diagnostic: the same stores, predicated off (no memory traffic)
                col = tile * BN + gl.arange(0, BN, layout=out_keys) - col0
                gl.store(OUT + rows[None, :].to(gl.int64) * stride_out + col[:, None], logits,
                         mask=logits == 12345.0, cache_modifier=".cs")
            else:
                # through shared memory, written out by TMA in whole 256-byte rows per query
                buf = c_bufs.index(2 * HALF + j % 2)
                tma.store_wait(1)
                buf.store(gl.permute(logits, (1, 0)))
                fence_async_shared()
                tma.async_copy_shared_to_global(o_desc, [q0, tile * BN - col0], buf)
        else:
            _tile_epilogue(acc, w_pairs, tile, scale, rows, row_ok, ks, ke, fast_lo, fast_hi, OUT, S, col0,
                           out_width, stride_out, NH, BQ, BN, HAS_SCALE)
    if STORE_MODE == 2:
        tma.store_wait(0)


@gluon.jit
def _ws_consume_first(descs, ptrs, smem, dims, prog, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                      STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, STORE_MODE: gl.constexpr):
    _ws_consume(descs, ptrs, smem, dims, prog, NH, BQ, BN, STAGES, HAS_SCALE, STORE_MODE, 0)


@gluon.jit
def _ws_consume_second(descs, ptrs, smem, dims, prog, NH: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr,
                       STAGES: gl.constexpr, HAS_SCALE: gl.constexpr, STORE_MODE: gl.constexpr):
    _ws_consume(descs, ptrs, smem, dims, prog, NH, BQ, BN, STAGES, HAS_SCALE, STORE_MODE, 1)


@gluon.jit(do_not_specialize=["T", "S", "col0", "out_width"])
def _routed_logits_ws_kernel(
    k_desc, o_desc, Q, W, HEADS, KSCALE, KS, KE, OUT,
    T, S, col0, out_width,
    stride_qt, stride_qh, stride_wt, stride_ht, stride_out,
    NH: gl.constexpr, D: gl.constexpr, BQ: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    HAS_SCALE: gl.constexpr, STORE_MODE: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """2 * BQ queries per program: two consumer warpgroups (BQ queries each) score every key tile
    one loader warp brings in by TMA, so each tile is read from L2 once for 2 * BQ queries."""
    NP: gl.constexpr = BQ * NH
    pid_q = gl.program_id(0)
    pid_s = gl.program_id(1)
    n_split = gl.num_programs(1)
    row_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    q_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // D, D // 16], [num_warps, 1], [1, 0])

    rows = pid_q * 2 * BQ + gl.arange(0, 2 * BQ, layout=row_layout)
    row_ok = rows < T
    ks = gl.load(KS + rows, mask=row_ok, other=2147483647)
    ke = gl.load(KE + rows, mask=row_ok, other=0)
    fast_lo = gl.maximum(gl.max(ks, axis=0), col0)
    fast_hi = gl.minimum(gl.min(ke, axis=0), col0 + out_width)
    if pid_q * 2 * BQ + 2 * BQ > T:
        fast_hi = -1
    first = gl.min(ks, axis=0) // BN + pid_s
    n_tiles = gl.maximum(gl.cdiv(gl.max(ke, axis=0), BN) - first, 0)
    n_mine = gl.cdiv(n_tiles, n_split)

    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([NP, D], gl.float8e4nv)
    q_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, NP, D], q_smem_layout)
    p = gl.arange(0, NP, layout=gl.SliceLayout(1, q_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    for half in gl.static_range(2):
        pq = (2 * pid_q + half) * BQ + p % BQ
        pq_ok = pq < T
        head = gl.load(HEADS + pq * stride_ht + p // BQ, mask=pq_ok, other=0)
        q = gl.load(Q + pq[:, None].to(gl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=pq_ok[:, None], other=0.0)
        q_bufs.index(half).store(q)
    k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, D], k_desc.layout)
    if STORE_MODE == 2:
        c_bufs = gl.allocate_shared_memory(gl.float32, [4, BQ, BN], o_desc.layout)
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
        (_ws_consume_first, ((k_desc, o_desc), (Q, W, HEADS, KSCALE, KS, KE, OUT), (k_bufs, q_bufs, c_bufs, ready, empty),
                             (T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out),
                             (pid_q, first, n_split, n_mine, fast_lo, fast_hi), NH, BQ, BN, STAGES, HAS_SCALE, STORE_MODE)),
        (_ws_consume_second, ((k_desc, o_desc), (Q, W, HEADS, KSCALE, KS, KE, OUT), (k_bufs, q_bufs, c_bufs, ready, empty),
                              (T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out),
                              (pid_q, first, n_split, n_mine, fast_lo, fast_hi), NH, BQ, BN, STAGES, HAS_SCALE,
                              STORE_MODE)),
        (_ws_loader, ((k_desc, o_desc), (Q, W, HEADS, KSCALE, KS, KE, OUT), (k_bufs, q_bufs, c_bufs, ready, empty),
                      (T, S, col0, out_width, stride_qt, stride_qh, stride_wt, stride_ht, stride_out),
                      (pid_q, first, n_split, n_mine, fast_lo, fast_hi), NH, BQ, BN, STAGES, HAS_SCALE, STORE_MODE)),
    ], [4, 1], [CONSUMER_REGS, 24])


def launch_routed_logits_ws(q, w, k, k_scale, ks, ke, out, heads, col_offset: int = 0, config=None,
                            splits: int | None = None) -> torch.Tensor:
    """``launch_routed_logits`` by the warp-specialized kernel; config (pairs per consumer, keys
    per tile, TMA ring depth, key tiles per program, consumer registers[, store mode: 0 st.global,
    1 none (a diagnostic: wrong output), 2 TMA])."""
    from .triton import key_splits
    t, _, d = q.shape
    nh = heads.shape[1]
    if t == 0:
        return out
    pairs, bn, stages, tiles_per_program, consumer_regs, *rest = config or (256, 64, 4, 32, 240)
    store_mode = rest[0] if rest else 0
    if store_mode == 2 and not (out.stride(1) == 1 and out.stride(0) % 4 == 0 and out.data_ptr() % 16 == 0):
        store_mode = 0          # TMA needs 16-byte aligned rows
    bq = max(1, pairs // nh)
    layout = gl.NVMMASharedLayout.get_default_for([bn, d], gl.float8e4nv)
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [bn, d], layout)
    o_desc = k_desc
    if store_mode == 2:
        o_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), [bq, bn],
                                  gl.NVMMASharedLayout.get_default_for([bq, bn], gl.float32))
    n_blocks = triton.cdiv(t, 2 * bq)
    if splits is None:
        splits = key_splits(n_blocks, triton.cdiv(k.shape[0], bn), tiles_per_program, q)
    # registers: three warpgroups share the file; the loader's gives its share to the consumers
    maxnreg = (2 * consumer_regs + 24) // 3 // 8 * 8
    _routed_logits_ws_kernel[(n_blocks, splits)](
        k_desc, o_desc, q, w, heads, k_scale if k_scale is not None else w, ks, ke, out,
        t, k.shape[0], col_offset, out.shape[1],
        q.stride(0), q.stride(1), w.stride(0), heads.stride(0), out.stride(0),
        NH=nh, D=d, BQ=bq, BN=bn, STAGES=stages, HAS_SCALE=k_scale is not None, STORE_MODE=store_mode,
        CONSUMER_REGS=consumer_regs, num_warps=4, maxnreg=maxnreg,
    )
    return out
