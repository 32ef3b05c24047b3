import pytest
import torch

import misa
from helpers import as_sets, check_pick_from, dsa_logits64, keys64, make_inputs
from misa.ops.blocks import kept_blocks


def _hisa64(q, kv, w, ks, ke, k, bs, m):
    """HISA by the letter, float64: returns per-row candidate sets and the full DSA scores."""
    k64 = keys64(kv)
    s = k64.shape[0]
    nb = -(-s // bs)
    kbar = torch.stack([k64[b * bs:(b + 1) * bs].mean(0) for b in range(nb)])
    blk = torch.einsum("th,thb->tb", w.double(), torch.einsum("thd,bd->thb", q.double(), kbar).clamp_min(0))
    cands = []
    for t in range(q.shape[0]):
        lo, hi = int(ks[t]) // bs, -(-int(ke[t]) // bs)
        if hi <= lo or ke[t] == ks[t]:
            cands.append(set())
            continue
        scores = {b: float(blk[t, b]) for b in range(lo, hi)}
        scores[lo] = scores[hi - 1] = float("inf")
        kept = sorted(scores, key=lambda b: (-scores[b], b))[:m]
        cands.append({p for b in kept for p in range(b * bs, min((b + 1) * bs, s)) if ks[t] <= p < ke[t]})
    return cands


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("bs,m", [(16, 2), (32, 3), (8, 7)])
def test_hisa_matches_the_method(kind, bs, m):
    q, kv, w, ks, ke = make_inputs(30, 333, 8, 32, kind, seed=bs + m)
    idx = misa.hisa_select(q, kv, w, ks, ke, k=20, block_size=bs, block_k=m)
    full = dsa_logits64(q, kv, w, ks, ke)
    # the documented count of kept blocks (more than m where partial edge blocks could leave < k)
    cands = _hisa64(q, kv, w, ks, ke, 20, bs, kept_blocks(20, bs, m))
    for t, (got, cand) in enumerate(zip(as_sets(idx), cands)):
        check_pick_from(got, cand, 20, full[t])


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
def test_hisa_keeping_all_blocks_is_dsa(kind):
    q, kv, w, ks, ke = make_inputs(40, 300, 8, 32, kind, seed=31)
    dsa = misa.dsa_select(q, kv, w, ks, ke, k=37)
    h = misa.hisa_select(q, kv, w, ks, ke, k=37, block_size=16, block_k=19)
    assert as_sets(h) == as_sets(dsa)


@pytest.mark.parametrize("kind", ["causal", "ragged"])
def test_hisa_never_returns_short(kind):
    # m * B == k with partial first and last blocks: the kept blocks alone would hold fewer than k
    # tokens; every row still gets exactly min(k, ke - ks) positions, all visible and distinct
    q, kv, w, ks, ke = make_inputs(20, 512, 8, 32, kind, seed=32)
    k = 64
    idx = misa.hisa_select(q, kv, w, ks, ke, k=k, block_size=32, block_k=2)
    for t, got in enumerate(as_sets(idx)):
        assert len(got) == min(k, int(ke[t]) - int(ks[t]))
        assert all(int(ks[t]) <= p < int(ke[t]) for p in got)
    assert kept_blocks(64, 32, 2) == 4 and kept_blocks(2048, 128, 64) == 64
