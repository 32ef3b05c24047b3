import pytest
import torch

import misa
from misa.quant import FP8_MAX
from helpers import FP8, as_sets, make_inputs, paged_batch


@pytest.mark.parametrize("ue8m0", [False, True])
def test_key_round_trip(ue8m0):
    k = torch.randn(300, 128) * torch.logspace(-3, 2, 300)[:, None]
    k[7] = 0.0                                      # amax 0: the 1e-4 floor applies
    k_fp8, scale = misa.quantize_keys(k, ue8m0=ue8m0)
    assert k_fp8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (300,)
    assert torch.allclose(scale[7], torch.tensor(1e-4 / FP8_MAX) if not ue8m0 else scale[7])
    if ue8m0:
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    else:
        amax = k.abs().amax(1).clamp_min(1e-4)
        assert torch.allclose(scale, amax / FP8_MAX)
    back = misa.dequantize_keys(k_fp8, scale)
    err = (back - k).abs() / k.abs().amax(1, keepdim=True).clamp_min(1e-4)
    assert float(err.max()) <= 2 ** -4 * (2 if ue8m0 else 1)   # e4m3: 3 mantissa bits


def test_query_scales_fold_into_weights_exactly():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 32, generator=g) * 5
    w = torch.randn(10, 4, generator=g)
    q_fp8, w_folded = misa.quantize_queries(q, w)
    scale = q.abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    assert torch.allclose(w_folded, w * scale)
    assert float(((q_fp8.float() * scale[..., None] - q).abs() / q.abs().amax(-1, keepdim=True)).max()) <= 2 ** -4
    # logits with (q_fp8, folded weights) == logits with the dequantised q and the original weights
    k = torch.randn(50, 32, generator=g)
    ks, ke = torch.zeros(10, dtype=torch.int32), torch.full((10,), 50, dtype=torch.int32)
    a = misa.dsa_logits(q_fp8, k, w_folded, ks, ke)
    b = misa.dsa_logits(q_fp8.float() * scale[..., None], k, w, ks, ke)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_paged_cache_round_trip_with_shuffled_pages():
    g = torch.Generator().manual_seed(1)
    seqs = [misa.quantize_keys(torch.randn(n, 64, generator=g)) for n in (1, 64, 65, 200, 500)]
    cache, table, lens = misa.build_paged_kcache(seqs, extra_pages=3, generator=g)
    assert cache.shape[1:] == (misa.PAGE_SIZE, 1, 64 + 4) and cache.dtype == torch.uint8
    assert lens.tolist() == [1, 64, 65, 200, 500]
    for b, (k, s) in enumerate(seqs):
        k2, s2 = misa.read_paged_kcache(cache, table[b], int(lens[b]))
        assert torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
        assert torch.equal(s2, s)


def test_paged_layout_is_values_then_scales():
    k, s = misa.quantize_keys(torch.randn(64, 128))
    cache = misa.new_paged_kcache(2, 128)
    misa.write_paged_kcache(cache, torch.arange(64, 128), k, s)   # page 1
    page = cache[1].reshape(-1)
    assert page.numel() == 64 * 132
    assert torch.equal(page[: 64 * 128].view(FP8).view(64, 128).view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(page[64 * 128:].view(torch.float32), s)


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_selectors_match_prefill(next_n):
    g = torch.Generator().manual_seed(2)
    lens = [70, 129, 300]
    seqs, qs, ws, cache, table, clens = paged_batch(lens, next_n, 8, 32, g)
    q = torch.stack(qs)
    w = torch.cat(ws)
    logits = misa.paged_dsa_logits(q, cache, w, clens, table)
    assert logits.shape == (len(lens) * next_n, max(lens))
    sel = {
        "dsa": misa.paged_dsa_select(q, cache, w, clens, table, k=40),
        "misa": misa.paged_misa_select(q, cache, w, clens, table, k=40, active_heads=2, block_size=64),
        "dagger": misa.paged_misa_select(q, cache, w, clens, table, k=40, active_heads=2, block_size=64,
                                         stage1_k=80),
        "hisa": misa.paged_hisa_select(q, cache, w, clens, table, k=40, block_size=16, block_k=4),
    }
    heads = misa.paged_route_heads(q, cache, w, clens, table, active_heads=2, block_size=64)
    for b, n in enumerate(lens):
        rows = slice(b * next_n, (b + 1) * next_n)
        ke = torch.arange(n - next_n + 1, n + 1, dtype=torch.int32)
        ks = torch.zeros_like(ke)
        args = (qs[b], seqs[b], ws[b], ks, ke)
        assert torch.equal(logits[rows, :n], misa.dsa_logits(*args))
        assert bool(torch.isinf(logits[rows, n:]).all())
        assert as_sets(sel["dsa"][rows]) == as_sets(misa.dsa_select(*args, k=40))
        assert as_sets(sel["misa"][rows]) == as_sets(misa.misa_select(*args, k=40, active_heads=2, block_size=64))
        assert as_sets(sel["dagger"][rows]) == as_sets(
            misa.misa_select(*args, k=40, active_heads=2, block_size=64, stage1_k=80))
        assert as_sets(sel["hisa"][rows]) == as_sets(misa.hisa_select(*args, k=40, block_size=16, block_k=4))
        assert torch.equal(heads[rows], misa.route_heads(*args, active_heads=2, block_size=64))
