"""The one-launch paged decode kernel (``MISA_PAGED_KERNEL=1``) against float64 and against the
per-sequence path, on caches with shuffled pages and garbage in unused slots. Under the
interpreter on machines without CUDA (conftest.py), compiled on a GPU."""
import pytest
import torch

import misa
from helpers import check_selection, dsa_logits64, paged_batch

pytest.importorskip("triton")
# unused slots of a sequence's last page hold garbage bytes (build_paged_kcache), some of which
# decode to NaN or huge scales; the kernel scores them and masks them to -inf, and the
# interpreter warns
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 5e-4 if DEVICE == "cuda" else 1e-5


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv("MISA_INTERPRET_KERNELS", "1")
    monkeypatch.delenv("MISA_DISABLE_KERNELS", raising=False)


def _batch(lens, next_n, h, d, seed):
    seqs, qs, ws, cache, table, clens = paged_batch(lens, next_n, h, d, torch.Generator().manual_seed(seed),
                                                    extra_pages=2)
    to = lambda x: x.to(DEVICE)
    return [tuple(map(to, s)) for s in seqs], to(torch.stack(qs)), to(torch.cat(ws)), to(cache), to(table), to(clens)


def _per_query(seqs, lens, next_n, b):
    ke = torch.arange(lens[b] - next_n + 1, lens[b] + 1, dtype=torch.int32)
    return seqs[b], torch.zeros_like(ke), ke


@pytest.mark.parametrize("next_n", [1, 2, 3])
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("splits", [None, 3])
def test_paged_kernel_scores_like_float64(next_n, routed, splits):
    from misa.ops.dsa.paged_triton import paged_logits
    lens = [70, 129, 300, 5] if DEVICE == "cpu" else [700, 1290, 3000, 64, 9000]
    h, d = (8, 64) if DEVICE == "cpu" else (64, 128)
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=next_n + 10 * routed)
    heads = None
    if routed:      # any valid head set per query, distinct and ascending, as the router gives
        g = torch.Generator().manual_seed(3)
        heads = torch.sort(torch.stack([torch.randperm(h, generator=g)[:3] for _ in range(q.shape[0] * next_n)]),
                           dim=1).values.int().to(DEVICE)
    out = torch.full((len(lens) * next_n, max(lens) + 10), float("nan"), device=DEVICE)
    paged_logits(q, cache, w, clens, table, out, heads=heads, splits=splits)
    out = out.cpu()
    for b, n in enumerate(lens):
        rows = slice(b * next_n, (b + 1) * next_n)
        kv, ks, ke = _per_query(seqs, lens, next_n, b)
        ref = dsa_logits64(q[b], kv, w[rows], ks, ke, heads=heads[rows] if routed else None)
        got = out[rows, :n]
        inside = torch.isfinite(ref)
        assert bool(torch.isinf(got[~inside]).all()) and bool((got[~inside] < 0).all())
        # the MMA's rounding scales with the heads' terms before they cancel (weights of both signs),
        # so measure the error against the logits with |w|
        scale = dsa_logits64(q[b], kv, w[rows].abs(), ks, ke, heads=heads[rows] if routed else None)
        err = (got.double()[inside] - ref[inside]).abs().max() / scale[inside].max().clamp_min(1e-12)
        assert float(err) <= RTOL, (b, float(err))
        # the rest of the sequence's last page is -inf; columns past its pages are not written
        last = -(-n // misa.PAGE_SIZE) * misa.PAGE_SIZE
        assert bool(torch.isinf(out[rows, n:min(last, out.shape[1])]).all())
        assert bool(torch.isnan(out[rows, last:]).all())


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_selectors_use_the_kernel_and_agree_with_the_per_sequence_path(monkeypatch, next_n):
    from misa.ops.dsa import paged_triton
    lens = [70, 129, 300] if DEVICE == "cpu" else [700, 1290, 30000]
    h, d, k = (8, 64, 40) if DEVICE == "cpu" else (64, 128, 512)
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=40 + next_n)
    per_sequence = {
        "logits": misa.paged_dsa_logits(q, cache, w, clens, table),
        "dsa": misa.paged_dsa_select(q, cache, w, clens, table, k=k),
        "misa": misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=2, block_size=64),
    }
    launches = []
    real = paged_triton.paged_logits
    monkeypatch.setattr(paged_triton, "paged_logits", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    monkeypatch.setenv("MISA_PAGED_KERNEL", "1")
    batched = {
        "logits": misa.paged_dsa_logits(q, cache, w, clens, table),
        "dsa": misa.paged_dsa_select(q, cache, w, clens, table, k=k),
        "misa": misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=2, block_size=64),
    }
    assert len(launches) == 3                       # one scoring launch per call, whole batch
    fin = torch.isfinite(per_sequence["logits"])
    assert torch.equal(fin, torch.isfinite(batched["logits"]))
    # the same scores up to float32 summation order (relative to the largest score)
    scale = float(per_sequence["logits"][fin].abs().max())
    torch.testing.assert_close(batched["logits"][fin], per_sequence["logits"][fin], rtol=0, atol=RTOL * scale)
    heads = misa.paged_route_heads(q, cache, w, clens, table, active_heads=2, block_size=64)
    for b in range(len(lens)):
        rows = slice(b * next_n, (b + 1) * next_n)
        kv, ks, ke = _per_query(seqs, lens, next_n, b)
        for name, hd in (("dsa", None), ("misa", heads[rows])):
            scores = dsa_logits64(q[b], kv, w[rows], ks, ke, heads=hd)
            check_selection(batched[name][rows], scores, ks, ke, k, rtol=RTOL)
