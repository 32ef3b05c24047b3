"""The evaluation's DSA indexer: RoPE, logits, fp8 inference inputs, shards, the warm-up loss."""
import pytest
import torch

pytest.importorskip("safetensors")

from misa.eval import indexer as ix
from misa.eval.hooks import attention_probs
from misa.eval.warmup import _layer_loss


def _stack(layers=(0, 2), **kw):
    torch.manual_seed(0)
    cfg = ix.IndexerConfig(layers=list(layers), hidden=32, heads=8, head_dim=16, q_rank=8, **kw)
    return ix.IndexerStack(cfg)


@pytest.mark.parametrize("seed", range(20))
def test_rope_scores_depend_on_relative_position_only(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 3, 16, dtype=torch.float64, generator=g)
    k = torch.randn(1, 16, dtype=torch.float64, generator=g)

    def score(tq, tk):
        cq, sq = ix.rope_tables(torch.tensor([tq]), 16, 10000.0)
        ck, sk = ix.rope_tables(torch.tensor([tk]), 16, 10000.0)
        return ix.apply_rope(q, cq.double(), sq.double())[0] @ ix.apply_rope(k, ck.double(), sk.double())[0]
    # the tables are float32: angles of ~100 rad carry ~1e-5 rad of rounding, so scores agree to
    # a small multiple of that times |q| |k| (a relative tolerance fails on scores near zero)
    tol = 1e-4 * float(q.norm(dim=-1).max() * k.norm())
    assert torch.allclose(score(7, 3), score(107, 103), rtol=0, atol=tol)
    assert float((score(7, 3) - score(7, 5)).abs().max()) > 10 * tol


def test_rope_touches_only_the_first_rope_dims():
    x = torch.randn(4, 2, 16)
    c, s = ix.rope_tables(torch.arange(4), 8, 100.0)
    y = ix.apply_rope(x, c, s)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert torch.allclose(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)  # a rotation


def test_indexer_logits_brute_force():
    q, k, w = torch.randn(5, 4, 8), torch.randn(7, 8), torch.randn(5, 4)
    want = torch.einsum("th,ths->ts", w, torch.einsum("thd,sd->ths", q, k).clamp_min(0))
    assert torch.allclose(ix.indexer_logits(q, k, w), want, atol=1e-5)


def test_inference_inputs_are_fp8_with_the_same_scores():
    stack = _stack()
    x = torch.randn(12, 32)
    inp = stack.inference_inputs(2, x)
    assert inp.q.dtype == torch.float8_e4m3fn and inp.kv[0].dtype == torch.float8_e4m3fn
    q, k, w = stack[2](x, torch.arange(12))
    exact = ix.indexer_logits(q.float(), k.float(), w)
    deq = ix.indexer_logits(inp.q.float(), inp.kv[0].float() * inp.kv[1][:, None], inp.weights)
    assert torch.allclose(deq, exact, rtol=0.1, atol=0.1 * exact.abs().max().item())   # fp8: ~3 bits of mantissa


def test_save_load_round_trip_in_small_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ix, "SHARD_BYTES", 20_000)
    stack = _stack(layers=(0, 1, 5))
    files = stack.save(tmp_path, dtype=torch.float32)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) > 1 and all(f.stat().st_size <= 20_000 for f in shards)
    back = ix.IndexerStack.load(tmp_path)
    assert back.layer_ids == [0, 1, 5]
    for (n, a), (_, b) in zip(stack.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="head_dim"):
        ix.IndexerConfig(layers=[0], head_dim=0)
    with pytest.raises(ValueError, match="rope_dim"):
        ix.IndexerConfig(layers=[0], head_dim=16, rope_dim=3)
    with pytest.raises(ValueError, match="layers"):
        ix.IndexerConfig(layers=[])
    with pytest.raises(ValueError, match="indexer"):
        ix.IndexerStack.load("/nonexistent/folder")


def _reference_loss(idx, cap, sparse, k_sparse, scaling):
    """The warm-up loss written plainly: one [T, S] softmax, no chunks, no detached-key trick."""
    x, qm, km = cap["x"], cap["q"], cap["k"]
    t = x.shape[0]
    pos = torch.arange(t)
    q, k, w = idx(x, pos)
    logits = ix.indexer_logits(q, k, w)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    p = attention_probs(qm, km, scaling, pos)
    logits = logits.masked_fill(~causal, float("-inf"))
    if sparse:
        top = torch.topk(logits.detach(), min(k_sparse, t), dim=-1).indices
        causal = torch.zeros_like(causal).scatter_(1, top, True) & causal
        p = p * causal
        p = p / p.sum(-1, keepdim=True)
    logq = torch.log_softmax(logits.masked_fill(~causal, float("-inf")), -1)
    kl = torch.where(causal, p * (torch.log(p.clamp_min(1e-30)) - logq.masked_fill(~causal, 0)), 0.0)
    return kl.sum() / t


@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_warmup_loss_and_gradients_match_the_plain_formula(sparse):
    torch.manual_seed(1)
    stack = _stack(layers=(0,))
    idx = stack[0].double()
    t = 37
    cap = {"x": torch.randn(t, 32, dtype=torch.float64), "q": torch.randn(6, t, 8, dtype=torch.float64),
           "k": torch.randn(2, t, 8, dtype=torch.float64)}
    ref = _reference_loss(idx, cap, sparse, 5, 0.35)
    ref.backward()
    want = {n: p.grad.clone() for n, p in idx.named_parameters()}
    idx.zero_grad()
    from contextlib import nullcontext
    got, dense = _layer_loss(idx, cap, torch.arange(t), 0.35, sparse, 5, 8, nullcontext())
    assert torch.allclose(got, ref.detach(), rtol=1e-6)       # the logits are float32
    assert dense >= 0
    for n, p in idx.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-5, atol=1e-9), n   # logits are float32


def test_a_failing_fused_kernel_falls_back_to_eager(monkeypatch):
    from contextlib import nullcontext
    from misa.eval import fused, warmup
    stack = _stack(layers=(0,))
    cap = {"x": torch.randn(20, 32), "q": torch.randn(6, 20, 8), "k": torch.randn(2, 20, 8)}
    monkeypatch.setattr(fused, "available", lambda device: True)

    def broken(*a):
        raise RuntimeError("no GPU here")
    monkeypatch.setattr(fused, "fused_logits", broken)
    kernel, why = warmup.choose_kernel(stack[0], cap, torch.arange(20), 0.35, 4, 8, nullcontext(), "auto")
    assert kernel == "eager" and "no GPU here" in why
    assert all(p.grad is None for p in stack.parameters())
    with pytest.raises(ValueError, match="kernel"):
        warmup.WarmupConfig(kernel="fast")


def test_subset_keeps_the_layers_weights_and_names_its_source(tmp_path, capsys):
    stack = _stack(layers=(0, 1, 5))
    stack.cfg.meta = {"progress": {"tokens_per_layer": 1234}}
    sub = stack.subset([5, 0])
    assert sub.layer_ids == [5, 0]
    for layer in (0, 5):
        for (n, a), (_, b) in zip(stack[layer].state_dict().items(), sub[layer].state_dict().items()):
            assert torch.equal(a, b), (layer, n)
    assert sub.cfg.meta["progress"] == {"tokens_per_layer": 1234}        # training kept
    assert sub.cfg.meta["subset"] == {"layers": [5, 0], "source_layers": [0, 1, 5], "source_id": stack.fingerprint()}
    assert stack.cfg.meta == {"progress": {"tokens_per_layer": 1234}}    # the source's meta untouched
    # a subset of a subset still names the original stack
    assert sub.subset([0]).cfg.meta["subset"] == {"layers": [0], "source_layers": [0, 1, 5],
                                                  "source_id": stack.fingerprint()}
    x = torch.randn(9, 32)
    assert torch.equal(sub.inference_inputs(5, x).weights, stack.inference_inputs(5, x).weights)
    for bad in ([2], [], [0, 0]):
        with pytest.raises(ValueError, match="layers"):
            stack.subset(bad)

    # the command line: saved in the source's dtype, loads back with the same weights
    stack.save(tmp_path / "src")
    assert ix.main(["subset", str(tmp_path / "src"), str(tmp_path / "dst"), "--layers", "1,5"]) == 0
    assert "indexer.json" in capsys.readouterr().out
    back = ix.IndexerStack.load(tmp_path / "dst")
    assert back.layer_ids == [1, 5] and back.cfg.meta["subset"]["source_layers"] == [0, 1, 5]
    src = ix.IndexerStack.load(tmp_path / "src")
    assert back.cfg.meta["subset"]["source_id"] == src.fingerprint()
    for layer in (1, 5):
        for (n, a), (_, b) in zip(src[layer].state_dict().items(), back[layer].state_dict().items()):
            assert torch.equal(a, b), (layer, n)
    assert ix.main(["subset", str(tmp_path / "src"), str(tmp_path / "bad"), "--layers", "3"]) == 2
    assert "layers" in capsys.readouterr().err
