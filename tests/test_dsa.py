import pytest
import torch
from hypothesis import given, settings, strategies as st

import misa
from helpers import FP8, check_selection, dsa_logits64, make_inputs


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("kv,q_dtype", [("fp8", FP8), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_logits_match_float64_formula(kind, kv, q_dtype):
    q, kvv, w, ks, ke = make_inputs(37, 301, 8, 64, kind, seed=3, kv=kv, q_dtype=q_dtype)
    got = misa.dsa_logits(q, kvv, w, ks, ke)
    ref = dsa_logits64(q, kvv, w, ks, ke)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    scale = ref[fin].abs().max().clamp_min(1)
    assert float((got.double()[fin] - ref[fin]).abs().max() / scale) < 1e-5


def test_logits_chunking_does_not_change_values():
    q, kv, w, ks, ke = make_inputs(50, 200, 4, 32, "ragged", seed=5)
    whole = misa.dsa_logits(q, kv, w, ks, ke)
    from misa import select
    from misa.validate import check_inputs
    inp = check_inputs(q, kv, w, ks, ke)
    small = select.dsa_select(inp, 16, workspace_bytes=1)     # one query per chunk
    big = select.dsa_select(inp, 16, workspace_bytes=1 << 30)
    assert torch.equal(small, big)
    assert torch.equal(misa.topk_indices(whole, ks, ke, 16).sort(1).values, big.sort(1).values)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("k", [1, 17, 64, 500])
def test_dsa_select_is_topk_of_formula(kind, k):
    q, kv, w, ks, ke = make_inputs(41, 257, 8, 64, kind, seed=k)
    idx = misa.dsa_select(q, kv, w, ks, ke, k=k)
    check_selection(idx, dsa_logits64(q, kv, w, ks, ke), ks, ke, k)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 24), s=st.integers(1, 150), h=st.sampled_from([1, 3, 8]),
       k=st.integers(1, 160), seed=st.integers(0, 10_000), kind=st.sampled_from(["causal", "ragged", "empty"]))
def test_dsa_select_property(t, s, h, k, seed, kind):
    t = min(t, s)
    q, kv, w, ks, ke = make_inputs(t, s, h, 16, kind, seed=seed)
    idx = misa.dsa_select(q, kv, w, ks, ke, k=k)
    check_selection(idx, dsa_logits64(q, kv, w, ks, ke), ks, ke, k)


def test_negative_weights_and_zero_logits_are_handled():
    # one head: half the keys get relu = 0, i.e. exact ties at 0; ties go either way but count holds
    q, kv, w, ks, ke = make_inputs(20, 90, 1, 16, "causal", seed=1)
    w = -w.abs()
    idx = misa.dsa_select(q, kv, w, ks, ke, k=30)
    check_selection(idx, dsa_logits64(q, kv, w, ks, ke), ks, ke, 30)
