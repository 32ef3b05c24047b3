import math

import pytest
import torch

import misa
from misa.quant import FP8_MAX
from helpers import FP8, as_sets, paged_batch


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the float8_e4m3fn grid, by its definition (3 mantissa bits, smallest
    normal exponent -6, subnormal step 2**-9), in float64: independent of torch's fp8 cast."""
    x = x.double()
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -6)))        # the binade (subnormals: -6)
    step = torch.exp2(e - 3)
    return torch.round(x / step) * step                                # torch.round: half to even


def expected_scale(amax: float, ue8m0: bool) -> float:
    """The spec's scale of one row, ``max(amax, 1e-4) / 448`` in float32, for ue8m0 rounded up to the
    next power of two, by frexp (not log2/ceil/exp2 as the implementation does)."""
    s = float(torch.tensor(max(amax, 1e-4), dtype=torch.float32) / torch.tensor(FP8_MAX, dtype=torch.float32))
    if not ue8m0:
        return s
    m, e = math.frexp(s)                    # s = m * 2**e, 0.5 <= m < 1
    return 2.0 ** (e - 1) if m == 0.5 else 2.0 ** e


@pytest.mark.parametrize("ue8m0", [False, True])
def test_key_round_trip(ue8m0):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(300, 128, generator=g) * torch.logspace(-3, 2, 300)[:, None]
    k[7] = 0.0                                      # amax 0: the 1e-4 floor applies
    k[8, 0] = 448.0 * 2.0 ** -5                     # amax / 448 exactly a power of two: kept as is
    k_fp8, scale = misa.quantize_keys(k, ue8m0=ue8m0)
    assert k_fp8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (300,)
    amax = k.abs().amax(1)
    want = torch.tensor([expected_scale(float(a), ue8m0) for a in amax], dtype=torch.float64)
    assert torch.equal(scale.double(), want) if ue8m0 else torch.allclose(scale.double(), want, rtol=1e-7, atol=0)
    if ue8m0:
        mant, _ = torch.frexp(scale)
        assert bool((mant == 0.5).all()), "ue8m0 scales are powers of two"
        assert float(scale[7]) == 2.0 ** -22 and float(scale[8]) == 2.0 ** -5   # 1e-4/448 = 1.07 * 2**-22
        # the smallest such power: nothing clips (amax / scale <= 448) and half of it would (> 224)
        ratio = amax.double() / scale.double()
        assert bool((ratio[amax > 0] <= FP8_MAX).all()) and bool((ratio[amax > 1e-4] > FP8_MAX / 2).all())
    else:
        assert float(scale[7]) == pytest.approx(1e-4 / FP8_MAX, rel=1e-7)
    # the fp8 values are round-to-nearest of k / scale on the e4m3 grid ...
    x = k / scale[:, None]
    assert torch.equal(k_fp8.double(), e4m3_round(x))
    # ... so the keys come back within half a step of that grid: 2**-4 of |x| (normal) or 2**-10 (subnormal)
    back = misa.dequantize_keys(k_fp8, scale)
    exact = k_fp8.double() * scale.double()[:, None]
    assert back.dtype == torch.float32 and bool(((back.double() - exact).abs() <= exact.abs() * 2.0 ** -24).all())
    bound = torch.maximum(x.double().abs() * 2.0 ** -4, torch.full_like(x.double(), 2.0 ** -10)) * scale.double()[:, None]
    bound = bound * (1 + 2.0 ** -20)               # the float32 product's own rounding
    assert bool(((back.double() - k.double()).abs() <= bound).all())
    assert torch.equal(back[7], torch.zeros(128))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_query_scales_fold_into_weights_exactly(ue8m0):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 32, generator=g) * 5
    w = torch.randn(10, 4, generator=g)
    q_fp8, w_folded = misa.quantize_queries(q, w, ue8m0=ue8m0)
    amax = q.abs().amax(-1)
    scale = torch.tensor([[expected_scale(float(a), ue8m0) for a in row] for row in amax], dtype=torch.float32)
    assert torch.allclose(w_folded, w * scale, rtol=1e-6, atol=0)
    assert torch.equal(q_fp8.double(), e4m3_round(q / scale[..., None]))
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
