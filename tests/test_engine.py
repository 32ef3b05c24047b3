import pytest
import torch

import misa
from helpers import check_selection, dsa_logits64, make_inputs
from misa import MisaConfig, engine


def packed_prefill(seed=0, h=8, d=32):
    """Two sequences packed as an engine's prefill chunk: keys of both concatenated, each query
    seeing its own sequence causally (``cu_seqlen_ks`` = the sequence's first packed key)."""
    lens = (70, 50)
    q, kv, w, _, _ = make_inputs(sum(lens), sum(lens), h, d, "causal", seed=seed)
    ks = torch.cat([torch.full((n,), start, dtype=torch.int32) for n, start in zip(lens, (0, lens[0]))])
    ke = torch.cat([torch.arange(1, n + 1, dtype=torch.int32) + start for n, start in zip(lens, (0, lens[0]))])
    return q, kv, w, ks, ke


def test_prefill_dsa_is_topk_relative_to_ks():
    q, kv, w, ks, ke = packed_prefill()
    idx = engine.prefill_select(q, kv, w, ks, ke, 16, MisaConfig(variant="dsa"))
    assert idx.dtype == torch.int32 and idx.shape == (q.shape[0], 16)
    absolute = torch.where(idx >= 0, idx + ks[:, None], idx)
    check_selection(absolute, dsa_logits64(q, kv, w, ks, ke), ks, ke, 16)


def test_prefill_misa_matches_library_call():
    q, kv, w, ks, ke = packed_prefill(seed=1)
    cfg = MisaConfig(active_heads=2, block_size=32)
    expected = misa.misa_select(q, kv, w, ks, ke, 16, active_heads=2, block_size=32)
    assert torch.equal(engine.prefill_select(q, kv, w, ks, ke, 16, cfg, relative=False), expected)
    rel = engine.prefill_select(q, kv, w, ks, ke, 16, cfg)
    assert torch.equal(rel, torch.where(expected >= 0, expected - ks[:, None], expected))
    assert int(rel.max()) < 70                      # positions inside each sequence


def decode_batch(next_n=2, seed=0, h=8, d=32):
    g = torch.Generator().manual_seed(seed)
    lens = [90, 130, 64]
    keys = [misa.quantize_keys(torch.randn(n, d, generator=g)) for n in lens]
    cache, table, ctx = misa.build_paged_kcache(keys, extra_pages=2, generator=g)
    q, w = misa.quantize_queries(torch.randn(len(lens) * next_n, h, d, generator=g),
                                 torch.randn(len(lens) * next_n, h, generator=g))
    return q.view(len(lens), next_n, h, d), cache, w, ctx, table


def test_decode_matches_paged_library_call_and_uses_decode_heads():
    q, cache, w, ctx, table = decode_batch()
    cfg = MisaConfig(active_heads=1, decode_active_heads=3, block_size=32)
    got = engine.decode_select(q, cache, w, ctx, table, 20, cfg)
    assert torch.equal(got, misa.paged_misa_select(q, cache, w, ctx, table, 20, active_heads=3, block_size=32))
    dsa = engine.decode_select(q, cache, w, ctx, table, 20, MisaConfig(variant="dsa"))
    assert torch.equal(dsa, misa.paged_dsa_select(q, cache, w, ctx, table, 20))


def test_decode_accepts_vllm_layouts():
    q, cache, w, ctx, table = decode_batch(next_n=2, seed=1)
    cfg = MisaConfig(active_heads=2, block_size=32)
    expected = engine.decode_select(q, cache, w, ctx, table, 20, cfg)
    per_token = torch.stack([ctx - 1, ctx], dim=1).int()           # [B, next_n]
    vllm_cache = cache.view(cache.shape[0], cache.shape[1], -1)      # [blocks, 64, D + 4]
    assert torch.equal(engine.decode_select(q, vllm_cache, w, per_token, table, 20, cfg), expected)
    with pytest.raises(ValueError, match="^context_lens:"):
        engine.decode_select(q, cache, w, torch.stack([ctx, ctx], dim=1).int(), table, 20, cfg)


@pytest.mark.parametrize("call, name", [
    (lambda a: engine.prefill_select(*a, 0), "topk_tokens"),
    (lambda a: engine.prefill_select(*a, 8, config="misa"), "config"),
    (lambda a: engine.prefill_select(a[0], a[1], a[2], a[3].long(), a[4], 8), "ks"),
    (lambda a: engine.prefill_select(*a, 8, MisaConfig(active_heads=9)), "active_heads"),
])
def test_prefill_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call(packed_prefill())
