import pytest
import torch

import misa
from helpers import as_sets, check_pick_from, check_selection, dsa_logits64, make_inputs


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("h", [1, 4])
def test_misa_select_is_topk_of_routed_formula(kind, h):
    q, kv, w, ks, ke = make_inputs(31, 333, 16, 32, kind, seed=h)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=h, block_size=64)
    idx = misa.misa_select(q, kv, w, ks, ke, k=50, active_heads=h, block_size=64)
    check_selection(idx, dsa_logits64(q, kv, w, ks, ke, heads=heads), ks, ke, 50)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("h", [1, 4])
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_misa_dagger_reranks_stage1_candidates(kind, h, dtype):
    # stage 1 is the top stage1_k of the routed logits, stored in bfloat16 by default (MISA-dagger
    # keeping all of them returns it)
    q, kv, w, ks, ke = make_inputs(31, 333, 16, 32, kind, seed=10 + h)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=h, block_size=64)
    routed = dsa_logits64(q, kv, w, ks, ke, heads=heads)
    full = dsa_logits64(q, kv, w, ks, ke)
    stored = torch.bfloat16 if dtype is None else dtype
    stage1 = misa.misa_select(q, kv, w, ks, ke, k=90, active_heads=h, block_size=64, stage1_k=90, logits_dtype=dtype)
    idx = misa.misa_select(q, kv, w, ks, ke, k=40, active_heads=h, block_size=64, stage1_k=90, logits_dtype=dtype)
    check_selection(stage1, routed if dtype else routed.to(stored).double(), ks, ke, 90)
    # the final pick is the top 40 of the stage-1 candidates by the full formula
    for t, (cand, final) in enumerate(zip(as_sets(stage1), as_sets(idx))):
        check_pick_from(final, cand, 40, full[t])


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
def test_misa_with_all_heads_is_dsa(kind):
    q, kv, w, ks, ke = make_inputs(40, 300, 8, 32, kind, seed=21)
    dsa = misa.dsa_select(q, kv, w, ks, ke, k=37)
    m = misa.misa_select(q, kv, w, ks, ke, k=37, active_heads=8, block_size=32)
    assert as_sets(m) == as_sets(dsa)


def test_misa_all_heads_is_dsa_even_with_ties():
    # H = 2 heads: many keys score exactly 0 (both relus dead): ties must break identically
    q, kv, w, ks, ke = make_inputs(40, 300, 2, 16, "causal", seed=22)
    dsa = misa.dsa_select(q, kv, w, ks, ke, k=200)
    m = misa.misa_select(q, kv, w, ks, ke, k=200, active_heads=2, block_size=16)
    assert as_sets(m) == as_sets(dsa)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
def test_misa_dagger_with_large_stage1_is_dsa(kind):
    q, kv, w, ks, ke = make_inputs(40, 300, 8, 32, kind, seed=23)
    dsa = misa.dsa_select(q, kv, w, ks, ke, k=37)
    m = misa.misa_select(q, kv, w, ks, ke, k=37, active_heads=2, block_size=32, stage1_k=300)
    assert as_sets(m) == as_sets(dsa)


def test_misa_recall_grows_with_heads():
    q, kv, w, ks, ke = make_inputs(64, 512, 32, 32, "causal", seed=24)
    dsa = misa.dsa_select(q, kv, w, ks, ke, k=64)
    rec = [float(misa.recall(misa.misa_select(q, kv, w, ks, ke, k=64, active_heads=h, block_size=64), dsa).mean())
           for h in (2, 8, 32)]
    assert rec[0] < rec[1] < rec[2] == 1.0
