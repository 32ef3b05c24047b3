import pytest
import torch

import misa
from misa.ops.router.reference import pool_keys
from helpers import check_routing, keys64, make_inputs, router_scores64


@pytest.mark.parametrize("s,b", [(100, 16), (64, 64), (65, 64), (7, 1024)])
def test_pool_keys_means_real_tokens(s, b):
    k = torch.randn(s, 8, dtype=torch.float64)
    got = pool_keys(k, b)
    want = torch.stack([k[i:i + b].mean(0) for i in range(0, s, b)])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("h,bs", [(1, 16), (3, 32), (8, 64)])
def test_route_heads_are_top_router_scores(kind, h, bs):
    q, kv, w, ks, ke = make_inputs(29, 333, 16, 32, kind, seed=h)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=h, block_size=bs, router="abs-sum")
    assert heads.shape == (29, h) and heads.dtype == torch.int32
    r = router_scores64(q, kv, w, ks, ke, bs)
    check_routing(heads, r, 1e-5 * r.abs().max().clamp_min(1))


def test_route_all_heads_is_identity():
    q, kv, w, ks, ke = make_inputs(9, 100, 6, 16, "ragged", seed=2)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=6, block_size=32)
    assert torch.equal(heads, torch.arange(6, dtype=torch.int32).expand(9, 6))


@pytest.mark.parametrize("router", ["sum", "max", "qnorm"])
def test_other_router_statistics(router):
    q, kv, w, ks, ke = make_inputs(20, 200, 16, 32, "causal", seed=4)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=4, block_size=32, router=router)
    k64 = keys64(kv)
    nb = -(-200 // 32)
    kbar = torch.stack([k64[i * 32:(i + 1) * 32].mean(0) for i in range(nb)])
    sc = torch.einsum("thd,bd->thb", q.double(), kbar).clamp_min(0)
    b = torch.arange(nb)
    vis = (b[None] >= (ks.long() // 32)[:, None]) & (b[None] < ((ke.long() + 31) // 32)[:, None])
    sc = sc * vis[:, None]
    w64 = w.double()
    r = {"sum": w64 * sc.sum(-1), "max": w64.abs() * sc.amax(-1),
         "qnorm": w64.abs() * q.double().norm(dim=-1)}[router]
    want = torch.sort(torch.topk(r, 4, dim=1).indices, dim=1).values
    assert torch.equal(heads.long(), want)


def test_top_blocks_router_votes_with_the_best_blocks_only():
    from misa.ops.router.reference import TOP_BLOCKS
    bs, s = 16, 16 * (TOP_BLOCKS + 6)
    q, kv, w, ks, ke = make_inputs(24, s, 16, 32, "causal", seed=5)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=4, block_size=bs, router="top-blocks")
    k64 = keys64(kv)
    nb = s // bs
    kbar = k64.view(nb, bs, -1).mean(1)
    per = w.double()[:, :, None] * torch.einsum("thd,bd->thb", q.double(), kbar).clamp_min(0)
    b = torch.arange(nb)
    vis = (b[None] >= (ks.long() // bs)[:, None]) & (b[None] < ((ke.long() + bs - 1) // bs)[:, None])
    r = torch.zeros(24, 16, dtype=torch.float64)
    for t in range(24):
        blocks = per[t].sum(0).masked_fill(~vis[t], float("-inf"))
        top = blocks.topk(min(TOP_BLOCKS, int(vis[t].sum()))).indices
        r[t] = per[t][:, top].abs().sum(-1)
    want = torch.sort(torch.topk(r, 4, dim=1).indices, dim=1).values
    assert torch.equal(heads.long(), want)


def test_top_blocks_router_with_few_blocks_is_abs_sum():
    q, kv, w, ks, ke = make_inputs(20, 100, 16, 32, "ragged", seed=6)   # 4 blocks <= TOP_BLOCKS
    a = misa.route_heads(q, kv, w, ks, ke, active_heads=5, block_size=32, router="top-blocks")
    b = misa.route_heads(q, kv, w, ks, ke, active_heads=5, block_size=32, router="abs-sum")
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
def test_gap_router_against_float64_formula(kind):
    """``gap``: w * (P at the best pooled block by the all-head DSA score - mean P over the other
    visible blocks), P = relu(q . kbar); written out per query in float64."""
    bs, s = 16, 200
    q, kv, w, ks, ke = make_inputs(24, s, 16, 32, kind, seed=7)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=4, block_size=bs, router="gap")
    k64 = keys64(kv)
    nb = -(-s // bs)
    kbar = torch.stack([k64[i * bs:(i + 1) * bs].mean(0) for i in range(nb)])
    w64 = w.double()
    r = torch.zeros(24, 16, dtype=torch.float64)
    for t in range(24):
        blocks = list(range(int(ks[t]) // bs, -(-int(ke[t]) // bs)))
        if not blocks:
            continue
        p = torch.einsum("hd,bd->hb", q[t].double(), kbar[blocks]).clamp_min(0)     # [H, visible]
        best = int((w64[t][:, None] * p).sum(0).argmax())
        others = [i for i in range(len(blocks)) if i != best]
        rest = p[:, others].mean(1) if others else torch.zeros(16, dtype=torch.float64)
        r[t] = w64[t] * (p[:, best] - rest)
    # ties (rows without a visible block: r = 0) go to the lower head, as in top_heads
    want = torch.sort(torch.sort(r, dim=1, descending=True, stable=True).indices[:, :4], dim=1).values
    assert torch.equal(heads.long(), want)


def test_gap_router_prefers_the_discriminating_head_over_a_loud_uniform_one():
    """Head 0 is large and the same on every block (a constant offset); head 1 is small but fires
    only on the last block. abs-sum routes head 0, gap routes head 1."""
    d, bs, nb = 4, 8, 6
    k = torch.zeros(nb * bs, d)
    k[:, 0] = 1.0                         # every key: head 0 sees q . k = 5 everywhere
    k[-bs:, 1] = 1.0                      # the last block only: head 1 fires
    q = torch.zeros(1, 2, d)
    q[0, 0, 0] = 5.0
    q[0, 1, 1] = 1.0
    w = torch.tensor([[-1.0, 0.5]])
    ks = torch.tensor([0], dtype=torch.int32)
    ke = torch.tensor([nb * bs], dtype=torch.int32)
    assert misa.route_heads(q, k, w, ks, ke, active_heads=1, block_size=bs, router="abs-sum").tolist() == [[0]]
    assert misa.route_heads(q, k, w, ks, ke, active_heads=1, block_size=bs, router="gap").tolist() == [[1]]
    assert misa.route_heads(q, k, w, ks, ke, active_heads=1, block_size=bs).tolist() == [[1]]     # the default
