"""The top-k's record of the keys tied at a row's k-th value, and the tie break that ranks them by
a finer score (misa/ops/ties), kernel against reference."""
import pytest
import torch

import misa
from helpers import BIG, DEVICE, EXACT_RTOL, check_pick_from, ranges, use_topk_search

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_on")


def _order_keys(row: torch.Tensor) -> torch.Tensor:
    """The top-k's uint32 order keys of a float row (``misa.ops.triton_common.ordered_key``), int64."""
    u = row.float().view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >> 31 == 1, ~u & 0xFFFFFFFF, u | 0x80000000)


@pytest.mark.parametrize("search", ["bracket", "held", "in memory", "general"])
def test_topk_records_the_tie_class(monkeypatch, search):
    # bfloat16 rows on a coarse grid (classes of ~tens of equal values at the k-th): every search
    # path writes each row's ties in its last slots and, with record_ties, the whole class at the
    # k-th value, its size and the ties it took; a row whose class it took whole records nothing
    # to break
    from misa.ops.topk import triton as topk_triton
    from misa.ops.topk.triton import TIE_CAP
    use_topk_search(monkeypatch, search)
    g = torch.Generator().manual_seed(len(search))
    short = search == "general"
    t, s, k = (24, 3001 if short else 7003, 90) if not BIG else (300, 3001 if short else 70003,
                                                                512 if short else 2048)
    grid = 8.0 if not BIG else 64.0
    x = ((torch.randn(t, s, generator=g) * grid).round() / grid).bfloat16()
    ks, ke = ranges("ragged", t, s, g)
    off = 3                                   # output values are columns + 3
    call = topk_triton.TopkLaunches(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k, out_offset=off, record_ties=True)
    call.run()
    out, ties = call.out.cpu().long(), call.ties.cpu().long()
    long = ((ke - ks) >= 2 * call.cfg.sample) & ((ke - ks) > k)
    if not short:
        assert bool((call.cut_keys.cpu()[long] != 0).all())      # the long rows took the sampled path
    breakable = 0
    for r in range(t):
        n, taken = int(ties[r, TIE_CAP]), int(ties[r, TIE_CAP + 1])
        lo, hi = int(ks[r]), int(ke[r])
        if hi - lo <= k:
            assert n == 0 or taken >= n, r                        # all taken: nothing to break
            continue
        picked = out[r] - off
        # classes of the top-k's order key: -0.0 and +0.0 are two (rows of k = 2048 of ~4K columns
        # meet zeros at their k-th value)
        vals = _order_keys(x[r])
        kth = int(vals[picked].min())
        cls = set((torch.nonzero(vals[lo:hi] == kth).flatten() + lo).tolist())
        in_out = [c for c in picked.tolist() if c in cls]
        if len(in_out) == len(cls):                               # the class fits: nothing to break
            assert n == 0 or taken == 0 or taken >= n, r
            continue
        breakable += 1
        assert (n, taken) == (len(cls), len(in_out)), r
        assert {c - off for c in ties[r, :min(n, TIE_CAP)].tolist()} == cls if n <= TIE_CAP else True, r
        assert set(picked[k - taken:].tolist()) == set(in_out), r       # the ties fill the last slots
        assert bool((vals[picked[:k - taken]] > kth).all()), r
    assert breakable >= t // 3


def _scored_inputs(kv: str, routed: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    t, h, d, s, kk = 12, 8, 32, 900, 64
    q = torch.randn(t, h, d, generator=g)
    w = torch.randn(t, h, generator=g)
    k = torch.randn(s, d, generator=g)
    q, w = misa.quantize_queries(q, w)
    if kv == "fp8":
        k8, scale = misa.quantize_keys(k)
        k_dq = k8.float() * scale[:, None]
    else:
        k8, scale = k.bfloat16(), None
        k_dq = k8.float()
    heads = torch.stack([torch.randperm(h, generator=g)[:2] for _ in range(t)]).int() if routed else None
    return g, (q, w, k8, scale, heads), k_dq, t, s, kk


@pytest.mark.parametrize("kv", ["fp8", "bf16"])
@pytest.mark.parametrize("routed", [False, True])
def test_break_ties_kernel_matches_reference(kv, routed):
    # rows with classes of every size (none, one key, a few, the record's cap, past it) and every
    # number of ties taken (none, some, all): the kernel rewrites exactly the breakable rows' last
    # slots with the class's best by the float64 score (within the MMA's rounding on the GPU), as
    # the reference does
    from misa.ops.ties import reference
    from misa.ops.ties.triton import break_ties
    from misa.ops.topk.triton import TIE_CAP, TIE_WIDTH
    g, (q, w, k8, scale, heads), k_dq, t, s, kk = _scored_inputs(kv, routed, 7 + routed)
    sizes = [(0, 0), (1, 1), (5, 2), (37, 11), (TIE_CAP, 40), (TIE_CAP + 4, 9), (20, 0), (20, 20), (3, 64),
             (100, 63), (2, 1), (64, 1)]
    out = torch.stack([torch.randperm(s, generator=g)[:kk] for _ in range(t)]).int()
    ties = torch.full((t, TIE_WIDTH), -7, dtype=torch.int32)
    for r, (n, taken) in enumerate(sizes):
        ties[r, :min(n, TIE_CAP)] = torch.randperm(s, generator=g)[:min(n, TIE_CAP)].int()
        ties[r, TIE_CAP], ties[r, TIE_CAP + 1] = n, taken
    want = reference.break_ties(q.double(), k_dq.double(), w.double(), out, ties, heads=heads)
    dev = lambda x: x.to(DEVICE) if x is not None else None          # noqa: E731
    got = out.clone().to(DEVICE)
    assert break_ties(dev(q), dev(w), dev(k8), dev(scale), got, dev(ties), heads=dev(heads)) is got
    got = got.cpu()
    changed = 0
    for r, (n, taken) in enumerate(sizes):
        if 0 < taken < n <= TIE_CAP:
            changed += 1
            assert torch.equal(got[r, :kk - taken], out[r, :kk - taken]), r
            cls = ties[r, :n].long()
            j = heads[r].long() if heads is not None else torch.arange(q.shape[1])
            score = torch.full((s,), float("-inf"), dtype=torch.float64)
            score[cls] = (w[r, j].double()[:, None] * (q[r, j].double() @ k_dq[cls].double().t()).relu()).sum(0)
            check_pick_from(set(got[r, kk - taken:].tolist()), set(cls.tolist()), taken, score, rtol=EXACT_RTOL)
            if not BIG:
                assert set(got[r, kk - taken:].tolist()) == set(want[r, kk - taken:].tolist()), r
            assert not torch.equal(want[r], out[r]), r
        else:
            assert torch.equal(got[r], out[r]), r
    assert changed == 6


def test_break_ties_reference_picks_best_scores_and_lower_positions_on_equal_scores():
    # three keys with scores 2, 1, 2 (the second head weighs 0): two ties taken -> positions 4 and 9
    from misa.ops.ties.reference import break_ties
    from misa.ops.topk.triton import TIE_CAP, TIE_WIDTH
    k = torch.zeros(12, 1)
    k[9], k[2], k[4] = 2.0, 1.0, 2.0
    q = torch.ones(1, 2, 1)
    w = torch.tensor([[1.0, 0.0]])
    ties = torch.zeros(1, TIE_WIDTH, dtype=torch.int32)
    ties[0, :3] = torch.tensor([9, 2, 4])
    ties[0, TIE_CAP], ties[0, TIE_CAP + 1] = 3, 2
    out = torch.tensor([[7, 9, 2]], dtype=torch.int32)
    assert break_ties(q, k, w, out, ties).tolist() == [[7, 4, 9]]


def test_break_ties_checks_the_record():
    from misa.ops.ties.triton import break_ties
    _, (q, w, k8, scale, _), _, t, _, kk = _scored_inputs("fp8", False, 1)
    out = torch.zeros(t, kk, dtype=torch.int32)
    with pytest.raises(ValueError, match="^ties:"):
        break_ties(q, w, k8, scale, out, torch.zeros(t, 10, dtype=torch.int32))
