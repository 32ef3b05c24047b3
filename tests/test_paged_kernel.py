"""The batched paged decode kernels (what the kernel backend runs; the reference runs sequence by sequence):
scoring in one launch, MISA's router pooling and routing the whole batch, against float64 and
against the per-sequence path, on caches with shuffled pages and garbage in unused slots. Under the
interpreter on machines without CUDA (conftest.py), compiled on a GPU."""
import pytest
import torch

import misa
from helpers import (DEVICE, EXACT_RTOL, ROUTER_RTOL, check_routing, check_selection, dsa_logits64, keys64,
                     paged_batch_on, router_scores64)

pytest.importorskip("triton")
# unused slots of a sequence's last page hold garbage bytes (build_paged_kcache), some of which
# decode to NaN or huge scales; the kernel scores them and masks them to -inf, and the
# interpreter warns
pytestmark = [pytest.mark.usefixtures("kernels_on"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def _batch(lens, next_n, h, d, seed):
    return paged_batch_on(DEVICE, lens, next_n, h, d, seed, extra_pages=2)


def _per_query(seqs, lens, next_n, b):
    ke = torch.arange(lens[b] - next_n + 1, lens[b] + 1, dtype=torch.int32)
    return seqs[b], torch.zeros_like(ke), ke


def _check_scores(lens, next_n, h, d, routed_heads, splits, seed):
    """``paged_logits`` against float64 per query, -inf past each query's end and on the rest of
    its sequence's last page, columns past its pages untouched."""
    from misa.ops.dsa.paged_triton import paged_logits
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=seed)
    heads = None
    if routed_heads:      # any valid head set per query, distinct and ascending, as the router gives
        g = torch.Generator().manual_seed(3)
        heads = torch.sort(torch.stack([torch.randperm(h, generator=g)[:routed_heads]
                                        for _ in range(q.shape[0] * next_n)]), dim=1).values.int().to(DEVICE)
    out = torch.full((len(lens) * next_n, max(lens) + 10), float("nan"), device=DEVICE)
    paged_logits(q, cache, w, clens, table, out, heads=heads, splits=splits)
    out = out.cpu()
    for b, n in enumerate(lens):
        rows = slice(b * next_n, (b + 1) * next_n)
        kv, ks, ke = _per_query(seqs, lens, next_n, b)
        ref = dsa_logits64(q[b], kv, w[rows], ks, ke, heads=heads[rows] if routed_heads else None)
        got = out[rows, :n]
        inside = torch.isfinite(ref)
        assert bool(torch.isinf(got[~inside]).all()) and bool((got[~inside] < 0).all())
        # the MMA's rounding scales with the heads' terms before they cancel (weights of both signs),
        # so measure the error against the logits with |w|
        scale = dsa_logits64(q[b], kv, w[rows].abs(), ks, ke, heads=heads[rows] if routed_heads else None)
        err = (got.double()[inside] - ref[inside]).abs().max() / scale[inside].max().clamp_min(1e-12)
        assert float(err) <= EXACT_RTOL, (b, float(err))
        # the rest of the sequence's last page is -inf; columns past its pages are not written
        last = -(-n // misa.PAGE_SIZE) * misa.PAGE_SIZE
        assert bool(torch.isinf(out[rows, n:min(last, out.shape[1])]).all())
        assert bool(torch.isnan(out[rows, last:]).all())


@pytest.mark.parametrize("next_n", [1, 2, 3])
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("splits", [None, 3])
def test_paged_kernel_scores_like_float64(next_n, routed, splits):
    lens = [70, 129, 300, 5] if DEVICE == "cpu" else [700, 1290, 3000, 64, 9000]
    h, d = (8, 64) if DEVICE == "cpu" else (64, 128)
    _check_scores(lens, next_n, h, d, 3 if routed else 0, splits, seed=next_n + 10 * routed)


@pytest.mark.parametrize("h,next_n,routed_heads", [(16, 2, 0), (32, 2, 16), (128, 5, 0)])
def test_paged_kernel_two_query_tiles_score_like_float64(h, next_n, routed_heads):
    # tiles of two queries with >= 16 heads run one MMA per query; with 128 heads five queries
    # make three tiles, the last holding one query
    from misa.ops.dsa.paged_triton import one_mma_per_query, query_tile
    qb, _ = query_tile(next_n, routed_heads or h)
    assert qb == 2 and one_mma_per_query(qb, routed_heads or h)
    lens = [70, 129, 300, 5] if DEVICE == "cpu" else [700, 1290, 3000, 64, 9000]
    _check_scores(lens, next_n, h, 32 if DEVICE == "cpu" else 128, routed_heads, 3, seed=h + next_n)


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_selectors_use_the_kernel_and_agree_with_the_per_sequence_path(monkeypatch, next_n):
    from misa.ops.dsa import paged_triton
    lens = [70, 129, 300] if DEVICE == "cpu" else [700, 1290, 30000]
    h, d, k = (8, 64, 40) if DEVICE == "cpu" else (64, 128, 512)
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=40 + next_n)
    from misa.ops.router import triton as router_triton
    ref = dict(backend="reference")
    per_sequence = {
        "logits": misa.paged_dsa_logits(q, cache, w, clens, table, **ref),
        "dsa": misa.paged_dsa_select(q, cache, w, clens, table, k=k, **ref),
        "misa": misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=2, block_size=64, **ref),
    }
    launches, routings = [], []
    real, real_router = paged_triton.paged_logits, router_triton.paged_route_heads_batched
    monkeypatch.setattr(paged_triton, "paged_logits", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    monkeypatch.setattr(router_triton, "paged_route_heads_batched",
                        lambda *a, **kw: routings.append(1) or real_router(*a, **kw))
    batched = {
        "logits": misa.paged_dsa_logits(q, cache, w, clens, table),
        "dsa": misa.paged_dsa_select(q, cache, w, clens, table, k=k),
        "misa": misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=2, block_size=64),
    }
    assert len(launches) == 3                       # one scoring launch per call, whole batch
    assert len(routings) == 1                       # MISA routed the whole batch at once
    fin = torch.isfinite(per_sequence["logits"])
    assert torch.equal(fin, torch.isfinite(batched["logits"]))
    # the same scores up to float32 summation order (relative to the largest score)
    scale = float(per_sequence["logits"][fin].abs().max())
    torch.testing.assert_close(batched["logits"][fin], per_sequence["logits"][fin], rtol=0, atol=EXACT_RTOL * scale)
    heads = misa.paged_route_heads(q, cache, w, clens, table, active_heads=2, block_size=64)
    for b in range(len(lens)):
        rows = slice(b * next_n, (b + 1) * next_n)
        kv, ks, ke = _per_query(seqs, lens, next_n, b)
        for name, hd in (("dsa", None), ("misa", heads[rows])):
            scores = dsa_logits64(q[b], kv, w[rows], ks, ke, heads=hd)
            check_selection(batched[name][rows], scores, ks, ke, k, rtol=EXACT_RTOL)


@pytest.mark.parametrize("block_size", [64, 128, 1024, 48])
def test_paged_pool_keys_like_float64(block_size):
    # SPEC's pooling per sequence, read through the shuffled block table; ragged lengths, some not a
    # multiple of the page or the block, one shorter than a page, one of exactly one block
    from misa.ops.router.triton import paged_pool_keys
    lens = [70, 129, 300, 5, 1100, 1024] if DEVICE == "cpu" else [700, 1290, 3000, 5, 9000, 1024, 4097]
    d = 64 if DEVICE == "cpu" else 128
    seqs, q, w, cache, table, clens = _batch(lens, 1, 2, d, seed=block_size)
    max_blocks = -(-max(lens) // block_size) + 1         # one column more than any sequence needs
    kbar = paged_pool_keys(cache, clens, table, block_size, max_blocks).cpu()
    assert kbar.shape == (len(lens), max_blocks, d)
    for b, n in enumerate(lens):
        k64 = keys64(tuple(x.cpu() for x in seqs[b]))
        nb = -(-n // block_size)
        ref = torch.stack([k64[j * block_size:(j + 1) * block_size].mean(0) for j in range(nb)])
        err = float((kbar[b, :nb].double() - ref).abs().max() / k64.abs().max())
        assert err <= 1e-5, (b, err)
        assert bool((kbar[b, nb:] == 0).all())           # blocks past the sequence: zeros, not garbage


@pytest.mark.parametrize("next_n", [1, 2, 3])
@pytest.mark.parametrize("router", ["abs-sum", "gap"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_paged_router_batched_like_float64_and_per_sequence(monkeypatch, next_n, router, block_size):
    # Lengths put a query's visible end just past a block boundary (its last block holds one
    # visible token) and, with next_n > 1, a query's end exactly on one while the block after it
    # holds real tokens: a visible range off by one either way moves a whole block in or out.
    # Short blocks pool few tokens, so they weigh heavily on the scores.
    from misa.ops.router import triton as router_triton
    boundary = [block_size + next_n, 2 * block_size + next_n - 1]
    lens = boundary + ([300, 7, 700] if DEVICE == "cpu" else [3000, 7, 9000, 20000])
    h, d, active = (8, 64, 3) if DEVICE == "cpu" else (64, 128, 8)
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=next_n + block_size)
    calls = []
    real = router_triton.paged_route_heads_batched
    monkeypatch.setattr(router_triton, "paged_route_heads_batched", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    batched = misa.paged_route_heads(q, cache, w, clens, table, active, block_size, router=router)
    assert calls == [1] and batched.shape == (len(lens) * next_n, active) and batched.dtype == torch.int32
    # 16 (query, head) pairs per program: a sequence's queries split over several programs
    shipped = router_triton.GAP_CONFIG if router == "gap" else router_triton.DEFAULT_CONFIG
    split = real(q, cache, w, clens, table, active, block_size, router, config=shipped._replace(pairs=16))
    per_sequence = misa.paged_route_heads(q, cache, w, clens, table, active, block_size, router=router,
                                          backend="reference")
    assert calls == [1]
    for b in range(len(lens)):
        rows = slice(b * next_n, (b + 1) * next_n)
        kv, ks, ke = _per_query(seqs, lens, next_n, b)
        r = router_scores64(q[b], kv, w[rows], ks, ke, block_size, router)
        tol = ROUTER_RTOL * r.abs().amax(1, keepdim=True).clamp_min(1e-12)
        check_routing(batched[rows], r, tol)
        check_routing(per_sequence[rows], r, tol)
        check_routing(split[rows], r, tol)
        # the two paths may part only on heads whose scores tie within the tolerance
        for t, (x, y) in enumerate(zip(batched[rows].cpu().tolist(), per_sequence[rows].cpu().tolist())):
            differ = sorted(set(x) ^ set(y))
            if differ:
                span = r[t, differ].max() - r[t, differ].min()
                assert float(span) <= 2 * float(tol[t]), (b, t, x, y)


def test_paged_batched_path_checks_its_switch_and_the_page_ids(monkeypatch):
    seqs, q, w, cache, table, clens = _batch([70, 129], 1, 8, 64, seed=5)
    monkeypatch.setenv("MISA_BACKEND", "yes")
    with pytest.raises(ValueError, match="^MISA_BACKEND:"):
        misa.paged_dsa_select(q, cache, w, clens, table, k=8)
    with pytest.raises(ValueError, match="^backend:"):
        misa.paged_dsa_select(q, cache, w, clens, table, k=8, backend="gpu")
    monkeypatch.setenv("MISA_BACKEND", "triton")
    bad = table.clone()
    bad[1, 2] = cache.shape[0]          # the third page of the second sequence: outside the cache
    for call in (lambda t: misa.paged_dsa_select(q, cache, w, clens, t, k=8),
                 lambda t: misa.paged_route_heads(q, cache, w, clens, t, active_heads=2, block_size=64),
                 lambda t: misa.paged_misa_select(q, cache, w, clens, t, k=8, active_heads=2, block_size=64)):
        with pytest.raises(ValueError, match="^block_table:"):
            call(bad)
        spare = table.clone()
        spare[0, -1] = -7               # columns past a sequence's pages are not read: any value goes
        call(spare)
