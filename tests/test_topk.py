import pytest
import torch

import misa
from helpers import check_selection, ranges


def _logits(t, s, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, s, generator=g)
    if ties:
        x = torch.round(x * 2) / 2        # many exact ties
    return x


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("k", [1, 5, 64, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_invariants(kind, k, ties):
    g = torch.Generator().manual_seed(k)
    x = _logits(33, 211, k, ties)
    ks, ke = ranges(kind, 33, 211, g)
    pos = torch.arange(211)
    outside = (pos[None] < ks[:, None]) | (pos[None] >= ke[:, None])
    x = x.masked_fill(outside, float("-inf"))
    idx = misa.topk_indices(x, ks, ke, k)
    assert idx.dtype == torch.int32
    check_selection(idx, x.double(), ks, ke, k, rtol=0)


@pytest.mark.parametrize("kind", ["causal", "ragged"])
def test_topk_of_bfloat16_logits_is_the_topk_of_their_values(kind):
    g = torch.Generator().manual_seed(11)
    x = _logits(40, 300, 11).bfloat16()           # bf16's 8-bit mantissa: many ties at the k-th value
    ks, ke = ranges(kind, 40, 300, g)
    idx = misa.topk_indices(x, ks, ke, 50)
    assert idx.dtype == torch.int32
    check_selection(idx, x.double(), ks, ke, 50, rtol=0)


def test_topk_ignores_values_outside_the_range():
    # huge values outside [ks, ke) must never be picked
    x = torch.randn(4, 50)
    x[:, :10] = 1e9
    ks = torch.full((4,), 10, dtype=torch.int32)
    ke = torch.full((4,), 50, dtype=torch.int32)
    idx = misa.topk_indices(x, ks, ke, 8)
    assert bool((idx >= 10).all())


def test_topk_takes_inf_inside_the_range():
    x = torch.zeros(2, 20)
    x[:, 3] = float("-inf")
    ks = torch.zeros(2, dtype=torch.int32)
    ke = torch.full((2,), 20, dtype=torch.int32)
    idx = misa.topk_indices(x, ks, ke, 20)       # every visible key, the -inf one too
    assert sorted(idx[0].tolist()) == list(range(20))


def test_topk_matches_sort_without_ties():
    x = _logits(16, 333, 7)
    ks = torch.zeros(16, dtype=torch.int32)
    ke = torch.full((16,), 333, dtype=torch.int32)
    idx = misa.topk_indices(x, ks, ke, 40)
    ref = torch.sort(x, dim=1, descending=True).indices[:, :40]
    assert torch.equal(idx.long().sort(1).values, ref.sort(1).values)
