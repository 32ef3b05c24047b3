"""Selectors of the evaluation and attention inside a (tiny, random) transformers Llama."""
import pytest
import torch

pytest.importorskip("transformers")

import misa
from misa.eval import selectors as sl
from misa.eval.hooks import Controller, attention, attention_probs
from misa.eval.indexer import IndexerInputs
from helpers import as_sets


def _inputs(t=40, s=40, h=16, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, w = torch.randn(t, h, d, generator=g), torch.randn(t, h, generator=g)
    q8, wf = misa.quantize_queries(q, w)
    kv = misa.quantize_keys(torch.randn(s, d, generator=g))
    ke = torch.arange(s - t + 1, s + 1, dtype=torch.int32)
    return IndexerInputs(q8, kv, wf, w), torch.zeros_like(ke), ke


def test_window_select_keeps_sinks_and_the_latest():
    ks = torch.tensor([0, 0, 5], dtype=torch.int32)
    ke = torch.tensor([3, 20, 20], dtype=torch.int32)
    sel = sl.window_select(ks, ke, 6, 2)
    assert sel[0].tolist() == [0, 1, 2, -1, -1, -1]
    assert sel[1].tolist() == [0, 1, 16, 17, 18, 19]
    assert sel[2].tolist() == [5, 6, 16, 17, 18, 19]


def test_heads_chosen_by_weight_with_all_heads_is_dsa():
    inp, ks, ke = _inputs()
    ref = sl.select("dsa", inp, ks, ke, 8)
    got = sl.select("topw-h16", inp, ks, ke, 8)
    assert float(misa.recall(got, ref).mean()) > 0.99     # same heads, summed in another order


def test_every_method_returns_valid_selections():
    inp, ks, ke = _inputs()
    for name in sl.METHODS:
        sel = sl.select(name, inp, ks, ke, 8, sl.SelectorSettings(block_size=8, hisa_block=4))
        assert sel.shape == (40, 8), name
        for t in range(40):
            row = sel[t][sel[t] >= 0]
            assert row.numel() == min(8, int(ke[t])), name
            assert row.unique().numel() == row.numel() and bool((row < ke[t]).all()), name
    with pytest.raises(ValueError, match="method"):
        sl.select("nope", inp, ks, ke, 8)


def test_mass_and_mask():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    sel = torch.tensor([[0, 2, -1], [3, 1, 0]], dtype=torch.int32)
    assert torch.allclose(sl.mass(sel, probs), torch.tensor([0.75, 0.7]))
    m = sl.selection_mask(sel, 4)
    assert m.tolist() == [[True, False, True, False], [True, True, False, True]]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_controller_dense_matches_sdpa_and_full_mask_matches_dense():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        want = model(ids).logits
        ctl = Controller().install(model)
        got = model(ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        ctl.sparse = lambda layer, x, q, k: torch.ones(30, 30, dtype=torch.bool).tril()
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
        ctl.sparse = lambda layer, x, q, k: torch.eye(30, dtype=torch.bool)   # attend to self only
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)


def test_capture_and_attention_probs_match_eager_attention():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 25))
    ctl = Controller().install(model)
    ctl.capture, ctl.stop_after = {1}, 1
    from misa.eval.hooks import run_layers
    run_layers(model, ids, ctl)
    cap = ctl.captured[1]
    assert cap["x"].shape == (25, 64) and cap["q"].shape == (4, 25, 16) and cap["k"].shape == (2, 25, 16)
    p = attention_probs(cap["q"], cap["k"], 16 ** -0.5, torch.arange(25))
    k = cap["k"].repeat_interleave(2, 0)
    s = (cap["q"] @ k.transpose(1, 2)) * 16 ** -0.5
    s = s.masked_fill(~torch.ones(25, 25, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(p, torch.softmax(s, -1).mean(0), atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(25))


def test_masked_attention_chunks_agree():
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    mask = torch.rand(50, 50) < 0.3
    mask |= torch.eye(50, dtype=torch.bool)
    mask &= torch.ones(50, 50, dtype=torch.bool).tril()
    a = attention(q, k, v, 0.3, mask, chunk=7)
    b = attention(q, k, v, 0.3, mask, chunk=64)
    assert torch.allclose(a, b, atol=1e-6)


def test_eval_configs_name_the_bad_argument():
    from misa.eval.niah import NiahConfig
    from misa.eval.ppl import PplConfig
    from misa.eval.recall import RecallConfig
    with pytest.raises(ValueError, match="queries"):
        RecallConfig(queries=0)
    with pytest.raises(ValueError, match="k:"):
        RecallConfig(context=256, ks=[256])
    with pytest.raises(ValueError, match="router"):
        RecallConfig(router_stats=["median"])
    with pytest.raises(ValueError, match="methods"):
        NiahConfig(methods=["dense", "magic"])
    with pytest.raises(ValueError, match="depths"):
        NiahConfig(depths=0)
    with pytest.raises(ValueError, match="windows"):
        PplConfig(windows=0)


def _check_valid(sel, ke, k, name):
    assert sel.shape == (ke.numel(), k), name
    for t in range(ke.numel()):
        row = sel[t][sel[t] >= 0]
        assert row.numel() == min(k, int(ke[t])), name
        assert row.unique().numel() == row.numel() and bool((row < ke[t]).all()), name


def test_gap_methods_run_in_the_model_evaluations_when_asked_for():
    from misa.eval.niah import NiahConfig
    from misa.eval.ppl import PplConfig
    gap = ["misa-gap-h8", "misa-gap-h16", "misa-gap-dagger"]
    assert PplConfig(methods=["dsa"] + gap).methods == ["dsa"] + gap
    assert NiahConfig(methods=["dsa", "misa-gap-h8"]).methods == ["dsa", "misa-gap-h8"]
    s = sl.SelectorSettings(block_size=8)
    assert "router gap" in sl.describe("misa-gap-h8", 8, s) and "router gap" in sl.describe("misa-gap-dagger", 8, s)
    inp, ks, ke = _inputs()
    # by default neither evaluation runs a gap method; each keeps the dense model and DSA (the
    # baselines its report compares with), and every default method is a selector that runs
    for cfg in (PplConfig(), NiahConfig()):
        assert cfg.methods and not set(gap) & set(cfg.methods), cfg.methods
        assert {"dense", "dsa"} <= set(cfg.methods), cfg.methods
        assert len(set(cfg.methods)) == len(cfg.methods)
        for name in cfg.methods:
            if name != "dense":                  # full attention: no selector
                _check_valid(sl.select(name, inp, ks, ke, 8, s), ke, 8, name)
    # in the model a gap method selects what its abs-sum twin selects with router="gap", and the
    # statistic matters: on these inputs the gap router picks other tokens than abs-sum somewhere
    for name, twin in (("misa-gap-h8", "misa-h8"), ("misa-gap-dagger", "misa-dagger")):
        got = sl.select(name, inp, ks, ke, 8, s)
        assert torch.equal(got, sl.select(twin, inp, ks, ke, 8, sl.SelectorSettings(block_size=8, router="gap")))
    assert as_sets(sl.select("misa-gap-h8", inp, ks, ke, 8, s)) != as_sets(sl.select("misa-h8", inp, ks, ke, 8, s))
