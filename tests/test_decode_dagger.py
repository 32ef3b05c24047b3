"""MISA-dagger over the paged cache in batched launches: the paged re-scoring kernel against its
float64 reference, the "misa-dagger" DecodeSelector and ``paged_misa_select(stage1_k=)`` against
the per-sequence reference path, and every selector variant at next_n > 2 (chunked prefill), the
scoring kernels cut into query tiles. Kernels through the interpreter without CUDA."""
import pytest
import torch

import misa
from helpers import BIG, DEVICE, EXACT_RTOL, as_sets, check_selection, dsa_logits64, paged_batch_on
from misa.ops.rescore import reference as rescore_ref

pytest.importorskip("triton")
pytestmark = [pytest.mark.usefixtures("kernels_on"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def _batch(lens, next_n, h, d, seed):
    return paged_batch_on(DEVICE, lens, next_n, h, d, seed, extra_pages=3)


def _agree(got, want):
    """The same selection: exactly in the interpreter (float32 sums, no near-ties at these sizes);
    on the GPU the fp8 MMA's reduced-precision accumulation may swap a near-tie at a cut (the
    routing, the stage-1 candidates or the top-k), so nearly all of it."""
    a, b = as_sets(got), as_sets(want)
    assert [len(x) for x in a] == [len(y) for y in b]
    if not BIG:
        assert a == b
    else:
        shared = sum(len(x & y) for x, y in zip(a, b)) / max(1, sum(len(y) for y in b))
        assert shared >= 0.98, shared


def _ends(clens, n):
    return (clens.long()[:, None] - n + 1 + torch.arange(n, device=clens.device)).reshape(-1).cpu()


@pytest.mark.parametrize("next_n,h,splits", [(1, 8, None), (2, 5, 2), (5, 16, 3)])
def test_paged_rescore_kernel_like_float64(next_n, h, splits):
    # ragged lengths off the page size, shuffled pages with garbage in unused slots; candidates
    # hold holes (-1), positions past a row's visible end and repeats
    from misa.ops.rescore.triton import paged_rescore
    lens = [70, 129, 300, 5] if not BIG else [700, 1290, 30000, 5]
    d = 64 if not BIG else 128
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=next_n + h)
    g = torch.Generator().manual_seed(next_n)
    c = 77 if not BIG else 2000
    cand = torch.stack([torch.randint(-1, lens[r // next_n] + 4, (c,), generator=g)
                        for r in range(len(lens) * next_n)]).int()
    cand[:, ::7] = -1
    cand = cand.to(DEVICE)
    out = torch.full(cand.shape, float("nan"), device=DEVICE)
    paged_rescore(q, cache, w, clens, table, cand, out, splits=splits)
    ref = rescore_ref.paged_rescore(q.cpu(), cache.cpu(), w.cpu(), clens.cpu(), table.cpu(), cand.cpu())
    ends = _ends(clens, next_n)
    pos = cand.cpu().long()
    visible = (pos >= 0) & (pos < ends[:, None])
    assert torch.equal(torch.isfinite(ref), visible) and visible.float().mean() > 0.5
    got = out.cpu()
    assert bool(torch.isneginf(got[~visible]).all())
    # the float64 reference against the brute-force DSA logits of each sequence's keys
    for b in range(len(lens)):
        rows = slice(b * next_n, (b + 1) * next_n)
        ke = ends[rows].int()
        full = dsa_logits64(q[b], seqs[b], w[rows], torch.zeros_like(ke), ke)
        want = torch.gather(full, 1, pos[rows].clamp(0, lens[b] - 1))
        torch.testing.assert_close(ref[rows][visible[rows]], want[visible[rows]], rtol=1e-12, atol=1e-9)
    scale = float(ref[visible].abs().max())
    torch.testing.assert_close(got[visible].double(), ref[visible], rtol=0, atol=EXACT_RTOL * scale)


@pytest.mark.parametrize("next_n", [1, 2, 5])
def test_misa_dagger_selector_equals_the_per_sequence_path(next_n):
    # the selector's four stages (routing, routed logits, top stage1_k, paged re-scoring, top-k)
    # select what the per-sequence reference selects; called again with new inputs at the same
    # batch size (its buffers reused)
    h, d, k, stage1_k = 8, 64, 24, 96
    opts = dict(active_heads=2, block_size=128)
    sel = None
    for seed, lens in ((50 + next_n, [300, 650, 77]), (60 + next_n, [500, 70, 64])):
        seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=seed)
        pooled = misa.pool_paged_kcache(cache, table, clens)
        if sel is None:
            sel = misa.DecodeSelector("misa-dagger", num_heads=h, head_dim=d, k=k, max_batch=3,
                                      max_context=704, next_n=next_n, device=DEVICE, stage1_k=stage1_k,
                                      active_heads=opts["active_heads"], router_block_size=opts["block_size"])
        wide = torch.nn.functional.pad(table, (0, sel.max_pages - table.shape[1]))   # the engine's full table
        sel.check(q, cache, w, clens, wide, pooled)
        got = sel(q, cache, w, clens, wide, pooled)
        assert got.data_ptr() == sel.plan(3).out.data_ptr()
        want = misa.paged_misa_select(q, cache, w, clens, table, k=k, stage1_k=stage1_k, backend="reference", **opts)
        # the stages after routing are what this checks: rows the selector routed as the reference
        # did (all of them in the interpreter; on the GPU the bfloat16 pooled-key cache and tf32
        # router products may swap a near-tie of 2 heads out of 8, which changes the whole row)
        routed = misa.paged_route_heads(q, cache, w, clens, table, backend="reference", **opts)
        same = (sel.plan(3).heads.cpu() == routed.cpu()).all(1)
        assert bool(same.all()) if not BIG else float(same.float().mean()) >= 0.5, same
        _agree(got[same.to(got.device)], want[same.to(want.device)])
        ends = _ends(clens, next_n)
        assert [len(s) for s in as_sets(got)] == [min(k, int(e)) for e in ends]


def test_paged_misa_select_dagger_runs_batched(monkeypatch):
    # on the kernels, paged_misa_select(stage1_k=) goes through the cached selector (one re-scoring
    # launch for the whole batch, no per-sequence reads), also without the pooled-key cache; options
    # the selector does not take (every head routed, a block not a multiple of the page) run the
    # same batched stages
    from misa import paged
    from misa.ops.rescore import triton as rescore_triton
    monkeypatch.setenv("MISA_GRAPHS", "0")      # counts launches from Python: no graph replays
    lens, next_n = [300, 1100, 77], 2
    seqs, q, w, cache, table, clens = _batch(lens, next_n, 8, 64, seed=71)
    launches = []
    real = rescore_triton.paged_rescore
    monkeypatch.setattr(rescore_triton, "paged_rescore", lambda *a, **kw: launches.append(1) or real(*a, **kw))

    def no_loop(*a, **kw):
        raise AssertionError("the batched path read the cache sequence by sequence")

    for opts in (dict(active_heads=2, block_size=128), dict(active_heads=8, block_size=64),
                 dict(active_heads=3, block_size=100)):
        want = misa.paged_misa_select(q, cache, w, clens, table, k=40, stage1_k=100, backend="reference", **opts)
        with monkeypatch.context() as m:
            m.setattr(paged, "_sequences", no_loop)
            got = misa.paged_misa_select(q, cache, w, clens, table, k=40, stage1_k=100, **opts)
        _agree(got, want)
    assert len(launches) == 3
    assert any(key[0] == "misa-dagger" for key in paged._SELECTORS)
    # the engine op and MisaConfig reach the same path
    cfg = misa.MisaConfig(variant="misa-dagger", active_heads=2, block_size=128, stage1_k=100)
    got = misa.engine.decode_select(q, cache, w, clens, table, 40, config=cfg)
    assert len(launches) == 4
    _agree(got, misa.paged_misa_select(q, cache, w, clens, table, k=40, stage1_k=100, active_heads=2, block_size=128,
                                       backend="reference"))


def test_misa_dagger_selector_checks_its_arguments():
    base = dict(num_heads=8, head_dim=64, k=64, max_batch=2, max_context=1024, device=DEVICE, active_heads=2,
                router_block_size=128)
    with pytest.raises(ValueError, match="^stage1_k:"):
        misa.DecodeSelector("misa-dagger", **base)
    with pytest.raises(ValueError, match="^stage1_k:"):
        misa.DecodeSelector("misa-dagger", stage1_k=32, **base)
    with pytest.raises(ValueError, match="^stage1_k:"):
        misa.DecodeSelector("misa", stage1_k=128, **base)
    with pytest.raises(ValueError, match="^num_heads:"):
        misa.DecodeSelector("misa-dagger", stage1_k=128, **{**base, "num_heads": 128})
    with pytest.raises(ValueError, match="^active_heads:"):
        misa.DecodeSelector("misa-dagger", stage1_k=128, **{**base, "active_heads": 3})
    # a stage1_k past the context keeps every position: the buffers stop at max_context
    sel = misa.DecodeSelector("misa-dagger", stage1_k=8192, **base)
    assert sel.stage1_width == 1024
    seqs, q, w, cache, table, clens = _batch([70, 129], 1, 8, 64, seed=12)
    with pytest.raises(ValueError, match="^pooled:"):
        sel.check(q, cache, w, clens, table)
    with pytest.raises(ValueError, match="^stage1_k:"):
        misa.paged_misa_select(q, cache, w, clens, table, k=64, stage1_k=63, active_heads=2, block_size=128)


@pytest.mark.parametrize("next_n", [1, 2, 5])
@pytest.mark.parametrize("variant", ["dsa", "misa", "misa-dagger", "hisa"])
def test_every_selector_variant_at_next_n(monkeypatch, variant, next_n):
    # several queries per sequence (multi-token prediction, or a prefill chunk whose keys are in
    # the cache): query i sees ctx - next_n + i + 1 keys. The scoring kernels take at most 8
    # (head, query) pairs a program here, so a sequence's queries span several query tiles.
    from misa.ops.dsa import paged_triton
    monkeypatch.setattr(paged_triton, "MAX_PAIRS", 8)
    h, d, k = 8, 64, 32
    lens = [300, 133, 64 + next_n]
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=80 + next_n)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    opts = dict(stage1_k=96) if variant == "misa-dagger" else dict(block_k=2) if variant == "hisa" else {}
    if variant.startswith("misa"):
        opts.update(active_heads=2, router_block_size=64)
    sel = misa.DecodeSelector(variant, num_heads=h, head_dim=d, k=k, max_batch=3,
                              max_context=table.shape[1] * 64, next_n=next_n, device=DEVICE, **opts)
    sel.check(q, cache, w, clens, table, pooled)
    got = sel(q, cache, w, clens, table, pooled)
    ends = _ends(clens, next_n)
    if variant == "dsa":
        for b in range(len(lens)):
            rows = slice(b * next_n, (b + 1) * next_n)
            ke = ends[rows].int()
            check_selection(got[rows], dsa_logits64(q[b], seqs[b], w[rows], torch.zeros_like(ke), ke),
                            torch.zeros_like(ke), ke, k)
        return
    ref = dict(backend="reference")
    if variant == "hisa":
        want = misa.paged_hisa_select(q, cache, w, clens, table, k=k, block_size=64, block_k=2, **ref)
    else:
        want = misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=2, block_size=64,
                                      stage1_k=opts.get("stage1_k"), **ref)
    assert [len(s) for s in as_sets(got)] == [min(k, int(e)) for e in ends]
    _agree(got, want)
