"""The fused selection (misa/ops/dsa/triton.py, ``fused_select``): the scoring pass moves only the
logits above a sampled cut into the top-k's scratch. Checked against float64 scores, against the
unfused path (logits, then top-k), and on rows the cut cannot serve (the repair pass).

Interpreter runs (no CUDA) are small; with CUDA the same tests run bigger shapes.
"""
import pytest
import torch

import misa
from misa import select
from misa.ops.dsa import triton as dsa_triton
from misa.ops.topk import triton as topk_triton
from misa.validate import check_inputs
from helpers import FP8, as_sets, check_selection, dsa_logits64, make_inputs

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BIG = DEVICE == "cuda"
RTOL = 5e-4 if BIG else 1e-5
# (queries, keys, heads, head dim, k): the window must hold at least a few sampled keys per column
# of the cut's sample (256 under the interpreter, 2048 on the GPU)
SIZE = (700, 40000, 64, 128, 700) if BIG else (37, 2500, 16, 64, 50)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv("MISA_INTERPRET_KERNELS", "1")
    monkeypatch.delenv("MISA_DISABLE_KERNELS", raising=False)


def _run(kind, active_heads=None, seed=0, k=None):
    t, s, h, d, k_default = SIZE
    k = k or k_default
    q, kv, w, ks, ke = make_inputs(t, s, h, d, kind, seed=seed, device=DEVICE)
    inp = select._contiguous(check_inputs(q, kv, w, ks, ke))
    heads = None
    if active_heads:
        heads = misa.route_heads(q, kv, w, ks, ke, active_heads=active_heads, block_size=64)
    width = s + 16
    buf = torch.empty(t, width, device=DEVICE)
    launches = []
    out = dsa_triton.fused_select(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf, 0, k, heads=heads,
                                  launches=launches)
    ref = dsa_logits64(q, kv, w, ks, ke, heads=heads)
    return out, ref, ks, ke, k, launches[0], inp, heads


def _served(call, ks, ke):
    """Rows the fused pass served: a cut, at least k keys above it in the scratch (whose entries
    include the segments' holes) and no overfull scratch."""
    cut, count, holes = call.cut_keys.cpu(), call.count.cpu(), call.holes.cpu()
    return (cut != 0) & (count - holes >= call.k) & (count <= call.cap)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("active_heads", [None, 4])
def test_fused_select_is_the_top_k_of_the_logits(kind, active_heads):
    out, ref, ks, ke, k, call, inp, heads = _run(kind, active_heads, seed=len(kind) + (active_heads or 0))
    check_selection(out, ref, ks, ke, k, rtol=RTOL)
    served = _served(call, ks, ke)
    long_rows = (ke - ks).cpu() >= 4 * k
    if kind == "causal":
        assert bool(served.all())              # every causal row is long: all served by the fused pass
    # a row the fused pass did not serve is a row without a cut (short, or too few sampled keys)
    assert bool(((call.cut_keys.cpu() == 0) | served).all())
    if kind == "ragged":
        assert bool(served[long_rows].any()) and not bool(served[~long_rows & ((ke - ks).cpu() <= k)].any())
    # the unfused path (logits, then top-k) picks the same keys up to ties at the k-th value
    unfused = select._kernel_select(inp, k, None, heads=heads, fused=False)
    check_selection(unfused, ref, ks, ke, k, rtol=RTOL)
    same = [a == b for a, b in zip(as_sets(out), as_sets(unfused))]
    assert sum(same) >= 0.9 * len(same)


@pytest.mark.parametrize("miss", ["cut_too_high", "scratch_overflows"])
def test_fused_select_repairs_rows_the_cut_misses(monkeypatch, miss):
    if miss == "cut_too_high":
        # a cut at the top of the sample: fewer than k keys above it, (nearly) every row is repaired
        monkeypatch.setattr(topk_triton, "CUT_SLACK", -1e9)
    else:
        # a scratch of exactly k entries: rows with more keys above the cut overflow it
        monkeypatch.setattr(topk_triton, "scratch_size", lambda k, width: k)
    out, ref, ks, ke, k, call, inp, heads = _run("causal", 4, seed=7)
    served = _served(call, ks, ke)
    if miss == "cut_too_high":
        assert int(served.sum()) <= len(served) // 4
        assert bool((call.cut_keys.cpu() != 0).all())
    else:
        assert bool((call.count.cpu() > call.cap).any())
    check_selection(out, ref, ks, ke, k, rtol=RTOL)


def test_public_selection_takes_the_fused_path_on_long_windows(monkeypatch):
    # dsa_select and misa_select (with MISA-dagger's stage 1) go through fused_select once the
    # window is long enough, and give the reference's selection
    t, s, h, d, k = SIZE
    q, kv, w, ks, ke = make_inputs(t, s, h, d, "causal", seed=11, device=DEVICE)
    assert dsa_triton.fuses(s)
    calls = []
    original = dsa_triton.fused_select
    monkeypatch.setattr(dsa_triton, "fused_select", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    check_selection(misa.dsa_select(q, kv, w, ks, ke, k=k), dsa_logits64(q, kv, w, ks, ke), ks, ke, k, rtol=RTOL)
    idx = misa.misa_select(q, kv, w, ks, ke, k=k, active_heads=4, block_size=64, stage1_k=3 * k)
    assert len(calls) == 2
    # MISA-dagger: k distinct picks per row, all in range (test_kernels.py checks them by value)
    for row, got in zip(range(t), as_sets(idx)):
        assert len(got) == k and all(ks[row] <= p < ke[row] for p in got)
    assert not dsa_triton.fuses(s // 16)


def test_launch_logits_checks_its_epilogue():
    q, kv, w, ks, ke = make_inputs(3, 100, 8, 64, "causal", seed=1, device=DEVICE)
    out = torch.empty(3, 112, device=DEVICE)
    with pytest.raises(ValueError, match="epilogue"):
        dsa_triton.launch_logits(q, w, kv[0], kv[1], ks, ke, out, epilogue=1)
    with pytest.raises(ValueError, match="key_step"):
        dsa_triton.launch_logits(q, w, kv[0], kv[1], ks, ke, out, key_step=0)
