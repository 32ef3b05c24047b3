import pytest
import torch
import torch.nn.functional as F

import misa
from helpers import as_sets, check_selection
from misa.nn import DSAIndexer, MISAIndexer, apply_rope, rope_freqs_cis
from test_hadamard import sylvester

DIM, Q_LORA, H, D, R, TOPK = 48, 24, 8, 32, 16, 10


def make_indexer(seed=0, **kwargs) -> DSAIndexer:
    torch.manual_seed(seed)
    ind = DSAIndexer(DIM, Q_LORA, H, D, R, TOPK, **kwargs)
    with torch.no_grad():   # a LayerNorm that is not the identity, so the test sees it applied
        ind.k_norm.weight.uniform_(0.5, 1.5)
        ind.k_norm.bias.normal_(0, 0.1)
    return ind


def make_batch(b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, DIM, generator=g), torch.randn(b, s, Q_LORA, generator=g)


def causal_mask(s, start=0):
    return torch.full((s, start + s), float("-inf")).triu_(start + 1)


def rope_complex(x, freqs_cis, interleaved):
    """RoPE as DeepSeek's inference code writes it: complex multiplication of dim pairs."""
    r = x.shape[-1]
    if interleaved:
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], r // 2, 2))
    else:
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], 2, r // 2).transpose(-1, -2).contiguous())
    y = torch.view_as_real(xc * freqs_cis.to(torch.complex128).view(1, x.shape[1], 1, r // 2))
    return y.flatten(-2) if interleaved else torch.cat([y[..., 0], y[..., 1]], dim=-1)


@torch.no_grad()
def reference_scores(ind, x, qr, freqs_cis, ue8m0=False):
    """The reference forward's index scores ``[B, S, S]`` (float64, no mask), written independently:
    explicit Hadamard matrix, complex RoPE, the engines' fp8 quantisation (``misa.quant``)."""
    b, s, _ = x.shape
    had = sylvester(D) * D ** -0.5
    q = (qr.double() @ ind.wq_b.weight.double().t()).view(b, s, H, D)
    q = torch.cat([rope_complex(q[..., :R], freqs_cis, False), q[..., R:]], -1) @ had
    k = F.layer_norm(x.double() @ ind.wk.weight.double().t(), (D,), ind.k_norm.weight.double(),
                     ind.k_norm.bias.double(), 1e-6)
    k = torch.cat([rope_complex(k[:, :, None, :R], freqs_cis, False)[:, :, 0], k[..., R:]], -1) @ had
    w = (x.double() @ ind.weights_proj.weight.double().t()) * H ** -0.5 * D ** -0.5
    q8, w8 = misa.quantize_queries(q.reshape(-1, H, D).float(), w.reshape(-1, H).float(), ue8m0)
    k8, k_scale = misa.quantize_keys(k.reshape(-1, D).float(), ue8m0)
    kd = (k8.double() * k_scale.double()[:, None]).view(b, s, D)
    dots = torch.einsum("bshd,btd->bsht", q8.double().view(b, s, H, D), kd).clamp_min(0)
    return torch.einsum("bsh,bsht->bst", w8.double().view(b, s, H), dots)


def split_padding(idx, ks, ke):
    """The in-range part (-1 elsewhere) for check_selection; asserts the rest is hidden padding."""
    inside = (idx >= ks[:, None]) & (idx < ke[:, None])
    for row, keep in zip(idx, inside):
        n = int(keep.sum())
        assert bool(keep[:n].all()), "selected positions must come before the padding"
        assert row.unique().numel() == row.numel(), "padding must not repeat a position"
    return torch.where(inside, idx, torch.full_like(idx, -1))


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_matches_complex_form(interleaved):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, R, generator=g)
    freqs = rope_freqs_cis(R, torch.arange(7, 12))
    assert torch.allclose(apply_rope(x, freqs, interleaved).double(), rope_complex(x, freqs, interleaved), atol=1e-5)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_dsa_indexer_is_the_reference_forward(ue8m0):
    ind = make_indexer(ue8m0=ue8m0)
    x, qr = make_batch(2, 30)
    freqs = rope_freqs_cis(R, 30)
    idx = ind(x, qr, 0, freqs, causal_mask(30))
    assert idx.shape == (2, 30, TOPK) and idx.dtype == torch.long
    scores = reference_scores(ind, x, qr, freqs, ue8m0)
    ks, ke = torch.zeros(30, dtype=torch.int32), torch.arange(1, 31, dtype=torch.int32)
    for b in range(2):
        check_selection(split_padding(idx[b], ks, ke), scores[b], ks, ke, TOPK)


def test_decode_with_cache_matches_full_prefill():
    ind = make_indexer(seed=2)
    x, qr = make_batch(1, 25, seed=3)
    freqs = rope_freqs_cis(R, 25)
    full = ind(x, qr, 0, freqs, causal_mask(25))
    ind(x[:, :24], qr[:, :24], 0, freqs[:24], causal_mask(24))
    step = ind(x[:, 24:], qr[:, 24:], 24, freqs[24:], None)       # decode: no mask, as the reference
    assert as_sets(step[0]) == as_sets(full[0, 24:])


def test_misa_indexer_shares_weights():
    ind = make_indexer()
    m = MISAIndexer.from_dsa(ind, variant="misa", active_heads=2, block_size=8)
    assert m.wq_b is ind.wq_b and m.wk is ind.wk and m.k_norm is ind.k_norm
    assert m.weights_proj is ind.weights_proj
    assert (m.misa_config.active_heads, m.misa_config.block_size) == (2, 8)


@pytest.mark.parametrize("options", [
    dict(variant="misa", active_heads=H, block_size=8),
    dict(variant="misa-dagger", active_heads=1, block_size=8, stage1_k=64),
    dict(variant="hisa", hisa_block_size=4, hisa_block_k=16),
    dict(variant="dsa"),
])
def test_exact_settings_reproduce_dsa(options):
    ind = make_indexer(seed=4)
    m = MISAIndexer.from_dsa(ind, **options)
    x, qr = make_batch(2, 40, seed=5)
    freqs = rope_freqs_cis(R, 40)
    ref = ind(x, qr, 0, freqs, causal_mask(40))
    got = m(x, qr, 0, freqs, causal_mask(40))
    assert as_sets(got.flatten(0, 1)) == as_sets(ref.flatten(0, 1))
    dec_x, dec_qr = make_batch(2, 1, seed=6)
    ref = ind(dec_x, dec_qr, 40, rope_freqs_cis(R, [40]), None)
    got = m(dec_x, dec_qr, 40, rope_freqs_cis(R, [40]), None)
    assert as_sets(got.flatten(0, 1)) == as_sets(ref.flatten(0, 1))


def test_misa_with_few_heads_selects_validly_and_differs():
    ind = make_indexer(seed=7)
    m = MISAIndexer.from_dsa(ind, active_heads=1, block_size=8)
    x, qr = make_batch(1, 40, seed=8)
    freqs = rope_freqs_cis(R, 40)
    ref, got = ind(x, qr, 0, freqs, causal_mask(40))[0], m(x, qr, 0, freqs, causal_mask(40))[0]
    ks, ke = torch.zeros(40, dtype=torch.int32), torch.arange(1, 41, dtype=torch.int32)
    got_in, ref_in = split_padding(got, ks, ke), split_padding(ref, ks, ke)
    assert bool(((got_in >= 0).sum(1) == torch.clamp(ke - ks, max=TOPK)).all())
    rec = misa.recall(got_in, ref_in)
    assert float(rec.min()) < 1.0     # one head of eight cannot agree with all eight everywhere


def test_errors_name_the_argument():
    ind = make_indexer()
    with pytest.raises(ValueError, match="^active_heads:"):
        MISAIndexer.from_dsa(ind, active_heads=H + 1)
    with pytest.raises(ValueError, match="^stage1_k:"):
        MISAIndexer.from_dsa(ind, variant="misa-dagger", stage1_k=TOPK - 1)
    with pytest.raises(ValueError, match="^indexer:"):
        MISAIndexer.from_dsa(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^activ:"):
        MISAIndexer.from_dsa(ind, activ=2)
    x, qr = make_batch(1, 4)
    with pytest.raises(ValueError, match="^freqs_cis:"):
        ind(x, qr, 0, rope_freqs_cis(R, 3), causal_mask(4))
    with pytest.raises(ValueError, match="^mask:"):
        ind(x, qr, 0, rope_freqs_cis(R, 4), causal_mask(3))
    ind.reset_cache()
    with pytest.raises(ValueError, match="^start_pos:"):
        ind(x, qr, 5, rope_freqs_cis(R, 4), None)
    with pytest.raises(ValueError, match="^rope_head_dim:"):
        DSAIndexer(DIM, Q_LORA, H, D, rope_head_dim=D + 2)
