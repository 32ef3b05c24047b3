"""Fused Triton kernels for TRAINING the indexer: ``I = sum_j w_j relu(q_j . k)`` and its gradients
without the ``[T, H, S]`` intermediate that the eager path writes and reads ~10 times.

    forward   I[t, s]   = sum_h w[t, h] relu(q[t, h] . k[s])          (causal: -inf for s > t)
    backward  dq[t, h]  = w[t, h] sum_s G[t, s] [q[t, h] . k[s] > 0] k[s]
              dw[t, h]  = sum_s G[t, s] relu(q[t, h] . k[s])
              dk[s]     = sum_t sum_h G[t, s] w[t, h] [q[t, h] . k[s] > 0] q[t, h]

The logits are recomputed in the backward (as flash attention does). Blocks above the diagonal are
skipped. ``dk`` is accumulated per (key block, head group) and the groups summed afterwards, which
keeps enough programs busy. The warm-up checks these kernels against the eager formula on its first
batch and falls back to eager if they fail or disagree (``warmup._FusedCheck``): a GPU run must not
be lost to a kernel that was only tested in Triton's CPU interpreter.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:       # CPU-only installs: the eager path is used
    triton = None

BT, BS = 64, 64           # query and key block sizes


def available(device: torch.device) -> bool:
    import os
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # row offsets in int64: rows * T overflows int32 from T = 46,341, rows * H * D once T*H*D >= 2**31
    @triton.jit
    def _fwd(q_ptr, k_ptr, w_ptr, out_ptr, T, H, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        i = tl.program_id(0)
        j = tl.program_id(1)
        if j * BLOCK_S > i * BLOCK_T + BLOCK_T - 1:
            return                                    # above the diagonal: the output stays -inf
        rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = j * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        kb = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + d[None, :], mask=cols[:, None] < T, other=0.0)
        acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for h in range(0, H):
            qh = tl.load(q_ptr + rows[:, None].to(tl.int64) * (H * D) + h * D + d[None, :], mask=rows[:, None] < T, other=0.0)
            wh = tl.load(w_ptr + rows.to(tl.int64) * H + h, mask=rows < T, other=0.0)
            s = tl.dot(qh, tl.trans(kb))
            acc += wh[:, None] * tl.maximum(s, 0.0)
        keep = (cols[None, :] <= rows[:, None]) & (rows[:, None] < T) & (cols[None, :] < T)
        acc = tl.where(keep, acc, float("-inf"))
        tl.store(out_ptr + rows[:, None].to(tl.int64) * T + cols[None, :], acc, mask=(rows[:, None] < T) & (cols[None, :] < T))

    @triton.jit
    def _bwd_q(q_ptr, k_ptr, w_ptr, g_ptr, dq_ptr, dw_ptr, T, H, D: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        h = tl.program_id(0)                          # heads vary fastest: programs of one query block
        i = tl.program_id(1)                          # run together and share its G rows in L2
        rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, D)
        rmask = rows < T
        qh = tl.load(q_ptr + rows[:, None].to(tl.int64) * (H * D) + h * D + d[None, :], mask=rmask[:, None], other=0.0)
        wh = tl.load(w_ptr + rows.to(tl.int64) * H + h, mask=rmask, other=0.0)
        dq = tl.zeros((BLOCK_T, D), dtype=tl.float32)
        dw = tl.zeros((BLOCK_T,), dtype=tl.float32)
        last = tl.minimum(i * BLOCK_T + BLOCK_T, T)
        for s0 in range(0, last, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            cmask = cols < T
            kb = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + d[None, :], mask=cmask[:, None], other=0.0)
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * T + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g = tl.where(cols[None, :] <= rows[:, None], g, 0.0)
            s = tl.dot(qh, tl.trans(kb))
            dw += tl.sum(g * tl.maximum(s, 0.0), axis=1)
            p = tl.where(s > 0, g * wh[:, None], 0.0)
            dq += tl.dot(p.to(kb.dtype), kb)
        tl.store(dq_ptr + rows[:, None].to(tl.int64) * (H * D) + h * D + d[None, :], dq, mask=rmask[:, None])
        tl.store(dw_ptr + rows.to(tl.int64) * H + h, dw, mask=rmask)

    @triton.jit
    def _bwd_k(q_ptr, k_ptr, w_ptr, g_ptr, dk_ptr, T, H, HG, D: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
        j = tl.program_id(0)
        grp = tl.program_id(1)
        cols = j * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        cmask = cols < T
        kb = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + d[None, :], mask=cmask[:, None], other=0.0)
        dk = tl.zeros((BLOCK_S, D), dtype=tl.float32)
        first = (j * BLOCK_S) // BLOCK_T * BLOCK_T
        for t0 in range(first, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < T
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * T + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g = tl.where(cols[None, :] <= rows[:, None], g, 0.0)
            for hh in range(0, HG):
                h = grp * HG + hh
                qh = tl.load(q_ptr + rows[:, None].to(tl.int64) * (H * D) + h * D + d[None, :], mask=rmask[:, None], other=0.0)
                wh = tl.load(w_ptr + rows.to(tl.int64) * H + h, mask=rmask, other=0.0)
                s = tl.dot(qh, tl.trans(kb))
                p = tl.where(s > 0, g * wh[:, None], 0.0)
                dk += tl.dot(tl.trans(p.to(qh.dtype)), qh)
        tl.store(dk_ptr + grp.to(tl.int64) * T * D + cols[:, None].to(tl.int64) * D + d[None, :], dk, mask=cmask[:, None])


def _groups(h: int) -> int:
    for g in (8, 4, 2, 1):
        if h % g == 0:
            return g
    return 1


class FusedIndexerLogits(torch.autograd.Function):
    """Causal ``I [T, T]`` float32 from ``q [T, H, D]``, ``k [T, D]`` (same dtype), ``w [T, H]`` float32."""

    @staticmethod
    def forward(ctx, q, k, w):
        q, k, w = q.contiguous(), k.contiguous(), w.float().contiguous()
        t, h, d = q.shape
        out = torch.full((t, t), float("-inf"), device=q.device, dtype=torch.float32)
        _fwd[(triton.cdiv(t, BT), triton.cdiv(t, BS))](q, k, w, out, t, h, D=d, BLOCK_T=BT, BLOCK_S=BS)
        ctx.save_for_backward(q, k, w)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, w = ctx.saved_tensors
        t, h, d = q.shape
        g = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0).contiguous()
        dq = torch.empty(t, h, d, device=q.device, dtype=torch.float32)
        dw = torch.empty(t, h, device=q.device, dtype=torch.float32)
        _bwd_q[(h, triton.cdiv(t, BT))](q, k, w, g, dq, dw, t, h, D=d, BLOCK_T=BT, BLOCK_S=BS)
        groups = _groups(h)
        dk = torch.empty(groups, t, d, device=q.device, dtype=torch.float32)
        _bwd_k[(triton.cdiv(t, BS), groups)](q, k, w, g, dk, t, h, h // groups, D=d, BLOCK_T=BT, BLOCK_S=BS)
        return dq.to(q.dtype), dk.sum(0).to(k.dtype), dw


def fused_logits(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return FusedIndexerLogits.apply(q, k, w)
