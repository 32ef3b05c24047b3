"""Every Triton kernel against its PyTorch reference.

On a machine without CUDA the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set
in conftest.py) on small inputs; with CUDA the same tests run the compiled kernels. Inputs are
fresh random, ragged, with empty ranges and sizes that are not multiples of the tiles.
"""
import pytest
import torch

import misa
from misa.validate import check_inputs
from helpers import (BF16_LOGITS_RTOL, BIG, DEVICE, EXACT_RTOL, FP8, ROUTER_RTOL, as_sets, check_dagger_selection,
                     check_pick_from, check_routing, check_selection, dsa_logits64, keys64, make_inputs, ranges,
                     router_scores64, use_topk_search)

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("kernels_on")


def _inputs(t, s, h, d, kind, seed, kv="fp8", q_dtype=FP8):
    return make_inputs(t, s, h, d, kind, seed=seed, kv=kv, q_dtype=q_dtype, device=DEVICE)


def _rel_err(got, ref, inside):
    if not inside.any():
        return 0.0
    return float((got.double().cpu()[inside] - ref[inside]).abs().max() / ref[inside].abs().max().clamp_min(1e-12))


def _random_heads(t, h, n, seed):
    """``[t, n]`` int32 sorted distinct heads of ``h`` per query (a router's output shape)."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.sort(torch.stack([torch.randperm(h, generator=g)[:n] for _ in range(t)]), dim=1).values
    return heads.int().to(DEVICE)


SHAPES = [(19, 301, 8, 64), (5, 1000, 64, 128)] + ([(700, 5000, 64, 128), (333, 9000, 32, 64)] if BIG else [])


@pytest.mark.parametrize("t,s,h,d", SHAPES)
@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("kv,q_dtype", [("fp8", FP8), ("bf16", torch.bfloat16), ("bf16", FP8)])
def test_logits_kernel(t, s, h, d, kind, kv, q_dtype):
    q, kvv, w, ks, ke = _inputs(t, s, h, d, kind, seed=t + s, kv=kv, q_dtype=q_dtype)
    got = misa.dsa_logits(q, kvv, w, ks, ke)
    ref = dsa_logits64(q, kvv, w, ks, ke)
    inside = torch.isfinite(ref)
    assert torch.equal(torch.isinf(got.cpu()), ~inside)
    assert _rel_err(got, ref, inside) < EXACT_RTOL


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("routed", [False, True])
def test_logits_kernel_output_window(aligned, routed):
    # launch_logits into a window [col_offset, col_offset + W) of the keys, written into a view of
    # a larger buffer: a 16-aligned window takes the vectorised unmasked stores for interior tiles
    from misa.ops.dsa.triton import launch_logits
    t, s, h, d = (70, 900, 8, 64) if not BIG else (700, 9000, 64, 128)
    q, kv, w, ks, ke = _inputs(t, s, h, d, "causal", seed=7)
    g = torch.Generator().manual_seed(8)
    ks = torch.randint(0, 40, (t,), generator=g, dtype=torch.int32).to(DEVICE) + (48 if aligned else 37)
    ke = torch.maximum(ke, ks)
    col_offset = 48 if aligned else 37                        # the smallest ks
    ks[0] = col_offset
    width = int(ke.max()) - col_offset
    pad = 16 if aligned else 3
    big = torch.full((t, width + 2 * pad + (-width % 16 if aligned else 0)), float("nan"), device=DEVICE)
    out = big[:, pad:pad + width]
    heads = None
    if routed:
        heads = torch.sort(torch.stack([torch.randperm(h, generator=g)[:4] for _ in range(t)]), dim=1).values
        heads = heads.int().to(DEVICE)
    launch_logits(q, w, kv[0], kv[1], ks, ke, out, col_offset, heads=heads)
    ref = dsa_logits64(q, kv, w, ks, ke, heads=heads.cpu() if routed else None)[:, col_offset:]
    got = big.cpu()
    assert bool(got[:, :pad].isnan().all()) and bool(got[:, pad + width:].isnan().all())   # outside the view
    got = got[:, pad:pad + width]
    inside = torch.isfinite(ref)
    assert bool((got[~inside].isnan() | (got[~inside] == float("-inf"))).all())
    assert _rel_err(got, ref, inside) < EXACT_RTOL


@pytest.mark.parametrize("routed", [False, True])
def test_logits_kernel_store_modes(routed):
    # the interior tiles' inline-PTX stores (plain or streaming) write exactly what tl.store
    # writes; the interpreter cannot run PTX and says so
    from misa.ops.dsa import triton as dsa_triton
    t, s, h, d = (40, 600, 8, 64) if not BIG else (700, 9000, 64, 128)
    q, kv, w, ks, ke = _inputs(t, s, h, d, "causal", seed=11)
    heads = _random_heads(t, h, 8, seed=12) if routed else None
    base = dsa_triton.ROUTED_CONFIG if routed else dsa_triton.DEFAULT_CONFIG

    def run(store):
        out = torch.full((t, s), float("nan"), device=DEVICE)
        return dsa_triton.launch_logits(q, w, kv[0], kv[1], ks, ke, out, heads=heads,
                                        config=base._replace(store=store))

    plain = run(0)
    fin = ~plain.isnan()
    assert fin.sum() > t * s // 3        # the causal blocks wrote most of the matrix
    for store in (1, 2):
        if DEVICE == "cpu":
            with pytest.raises(ValueError, match="^config: the inline-PTX store"):
                run(store)
            continue
        out = run(store)
        assert torch.equal(out.isnan(), ~fin)
        assert torch.equal(out[fin], plain[fin])
    with pytest.raises(ValueError, match="^config: store mode 3"):
        run(3)


@pytest.mark.parametrize("routed", [False, True])
def test_logits_kernel_bfloat16_out_is_the_float32_logits_rounded(routed):
    # a bfloat16 out holds the float32 logits rounded once to nearest even, bit for bit, -inf
    # outside the ranges kept, untouched columns untouched; whatever the config's store mode
    # (bfloat16 is stored by tl.store, streaming for mode 2, also in the interpreter)
    from misa.ops.dsa import triton as dsa_triton
    from misa.prefill import logits_width
    # causal: a full first block of queries sees most tiles whole (the unmasked interior stores)
    t, s, h, d = (40, 600, 16, 64) if not BIG else (700, 9000, 64, 128)
    q, kv, w, ks, ke = _inputs(t, s, h, d, "causal", seed=13)
    heads = _random_heads(t, h, 8, seed=14) if routed else None
    width = logits_width(s)                   # as the selectors size their rows
    f32 = torch.full((t, width), float("nan"), device=DEVICE)
    dsa_triton.launch_logits(q, w, kv[0], kv[1], ks, ke, f32, heads=heads)
    written = ~f32.isnan()
    want = f32.to(torch.bfloat16)             # torch rounds to nearest even
    truncated = (f32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert bool((truncated != want)[written].any())          # the rounding shows on these values
    assert bool((f32[written] == float("-inf")).any())
    base = dsa_triton.ROUTED_CONFIG if routed else dsa_triton.DEFAULT_CONFIG
    for store in (0, 1, 2):
        got = torch.full((t, width), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        dsa_triton.launch_logits(q, w, kv[0], kv[1], ks, ke, got, heads=heads, config=base._replace(store=store))
        assert torch.equal(got.isnan(), ~written), store
        assert torch.equal(got[written].view(torch.int16), want[written].view(torch.int16)), store
    with pytest.raises(ValueError, match="^out: expected float32 or bfloat16"):
        dsa_triton.launch_logits(q, w, kv[0], kv[1], ks, ke, got.half(), heads=heads)


def test_topk_kernel_refuses_a_sample_that_is_no_power_of_two():
    from misa.ops.topk import triton as topk_triton
    x = torch.randn(2, 3000, device=DEVICE)
    ks, ke = torch.zeros(2, dtype=torch.int32, device=DEVICE), torch.full((2,), 3000, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="^config: sample must be a power of two"):
        topk_triton.TopkLaunches(x, ks, ke, 10, config=topk_triton.TopkConfig(sample=1200))


@pytest.mark.parametrize("path", ["sampled cut", "row histogram"])
@pytest.mark.parametrize("finite_only", [False, True])
def test_topk_kernel_bfloat16_rows(path, finite_only):
    # bfloat16 rows (the selectors' bfloat16 logits) are read widened to float32: the top-k of
    # their values, the reference's up to which keys tied at the k-th value it keeps. Rows of
    # bfloat16 noise (8 significant bits) and of a coarse grid of values: ties everywhere. A large
    # sample (rows shorter than twice it) sends every row down the general path.
    from misa.ops.topk import triton as topk_triton
    from misa.ops.topk.reference import select_topk
    g = torch.Generator().manual_seed(41 + finite_only)
    # the forcing sample exceeds half the row and is a register tile: these rows stay short
    t, s, k = (6, 1200, 50) if not BIG or path == "row histogram" else (300, 70000, 2048)
    x = torch.randn(t, s, generator=g) * 3
    x[::2] = torch.round(x[::2] * 4) / 4
    x = x.to(torch.bfloat16)
    if finite_only:
        x[torch.rand(t, s, generator=g) < 0.3] = float("-inf")
    ks, ke = ranges("ragged", t, s, g)
    ks[:2], ke[:2] = 0, s
    config = topk_triton.TopkConfig(sample=1 << (s // 2).bit_length()) if path == "row histogram" else None
    call = topk_triton.TopkLaunches(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k, finite_only=finite_only,
                                    config=config)
    call.run()
    cut = call.cut_keys.cpu()
    if path == "row histogram":
        assert bool((cut == 0).all())
    else:
        long = (ke - ks) >= 2 * call.cfg.sample
        count = call.count.cpu()[long]
        assert bool(long[:2].all()) and bool((cut[long] != 0).all())
        assert bool((count >= k).all() & (count <= call.cap).all())        # the fast path's select
    vals = x.float()
    cols = torch.arange(s)
    eligible = (cols[None] >= ks[:, None]) & (cols[None] < ke[:, None])
    if finite_only:
        eligible &= torch.isfinite(vals)
    ref = select_topk(vals, eligible, k)
    got = call.out.cpu().long()
    tied_at_kth = 0
    for r in range(t):
        mine, theirs = got[r][got[r] >= 0], ref[r][ref[r] >= 0]
        assert mine.numel() == theirs.numel() and bool((got[r][mine.numel():] == -1).all()), r
        assert mine.unique().numel() == mine.numel() and bool(eligible[r, mine].all()), r
        assert torch.equal(vals[r, mine].sort().values, vals[r, theirs].sort().values), r
        if theirs.numel():
            kth = vals[r, theirs].min()
            tied_at_kth += int(((vals[r] == kth) & eligible[r]).sum() > (vals[r, theirs] == kth).sum())
    assert tied_at_kth >= 2                     # rows where the tie at the k-th value leaves keys out
    with pytest.raises(ValueError, match="^x: the top-k takes float32 or bfloat16"):
        topk_triton.topk(x.half().to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("k,ties", [(1, False), (100, False), (700, True), (3000, False), (3000, True)])
def test_topk_kernel(kind, k, ties):
    g = torch.Generator().manual_seed(k)
    t, s = (40, 9000) if not BIG else (300, 70000)    # rows long enough for the sampled fast path
    x = torch.randn(t, s, generator=g)
    if ties:
        x = torch.round(x * 8) / 8
    ks, ke = ranges(kind, t, s, g)
    idx = misa.topk_indices(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k)
    assert idx.dtype == torch.int32
    check_selection(idx, x.double(), ks, ke, k, rtol=0)


@pytest.mark.parametrize("kind", ["causal", "ragged"])
@pytest.mark.parametrize("variant", ["samples of 64-byte runs", "four-warp compaction", "searches to the end",
                                     "count-first compaction", "no bracket", "bracket overflows",
                                     "bracket on short scratches"])
def test_topk_kernel_variants(monkeypatch, kind, variant):
    # tuning variants the benchmarks switch between: the cut's sample of 16-column runs spread over
    # the row (SAMPLE_CHUNK = 16), compaction programs of four warps and 1024-column steps or
    # counting their survivors before taking slots for all of them at once, and
    # searches that narrow to one key instead of stopping at exactly k keys (EARLY_EXIT = False),
    # and the select without its sampled bracket or with one too small for the keys inside it
    # (both search the whole scratch)
    from misa.ops.topk import triton as topk_triton
    if variant == "samples of 64-byte runs":
        monkeypatch.setattr(topk_triton, "SAMPLE_CHUNK", 16)
    elif variant == "searches to the end":
        monkeypatch.setattr(topk_triton, "EARLY_EXIT", False)
    elif variant == "no bracket":
        monkeypatch.setattr(topk_triton, "BRACKET", 0)
    elif variant == "bracket overflows":
        monkeypatch.setattr(topk_triton, "BRACKET", 16)
        monkeypatch.setattr(topk_triton, "BRACKET_MIN", 0)
    elif variant == "bracket on short scratches":
        monkeypatch.setattr(topk_triton, "BRACKET_MIN", 0)
    elif variant == "count-first compaction":
        monkeypatch.setattr(topk_triton, "COMPACT_CONFIG", topk_triton.CompactConfig(steps=4, count_first=True))
    else:
        monkeypatch.setattr(topk_triton, "COMPACT_CONFIG", topk_triton.CompactConfig(block=1024, num_warps=4, steps=8))
    g = torch.Generator().manual_seed(21)
    t, s, k = (30, 7000, 90) if not BIG else (300, 70000, 2048)
    x = torch.randn(t, s, generator=g)
    ks, ke = ranges(kind, t, s, g)
    call = topk_triton.TopkLaunches(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k)
    call.run()
    check_selection(call.out, x.double(), ks, ke, k, rtol=0)
    long = ((ke - ks) >= 2 * call.cfg.sample) & ((ke - ks) > k)
    assert bool((call.cut_keys.cpu()[long] != 0).all())         # the long rows took the sampled path


@pytest.mark.parametrize("search", ["bracket", "held", "in memory"])
@pytest.mark.parametrize("shift", [0.0, -3.0])
def test_topk_kernel_on_bfloat16_rows_at_each_search(monkeypatch, search, shift):
    # bfloat16 rows: the searches stop at one bfloat16 value and move onto its key, whose low 16
    # bits are clear for positive values and set for negative ones (shift -3: the k-th value is
    # negative); every fast-path search (the bracket, the scratch held in registers or read from
    # memory) must still pick a top-k of the values, ties at the k-th value included
    from misa.ops.topk import triton as topk_triton
    use_topk_search(monkeypatch, search)
    g = torch.Generator().manual_seed(23 + int(shift))
    t, s, k = (24, 7003, 90) if not BIG else (300, 70003, 2048)
    x = (torch.randn(t, s, generator=g) + shift).bfloat16()
    ks, ke = ranges("ragged", t, s, g)
    call = topk_triton.TopkLaunches(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k)
    call.run()
    check_selection(call.out, x.double(), ks, ke, k, rtol=0)
    long = ((ke - ks) >= 2 * call.cfg.sample) & ((ke - ks) > k)
    assert bool((call.cut_keys.cpu()[long] != 0).all())         # the long rows took the sampled path
    kth = torch.stack([x[r, call.out[r].cpu().long()].double().min() for r in range(t) if long[r]])
    assert bool((kth < 0).all()) if shift < 0 else bool((kth > 0).all())


@pytest.mark.parametrize("kind", ["causal", "ragged"])
@pytest.mark.parametrize("source", ["the row's columns", "noise", "a constant"])
def test_topk_kernel_with_a_sample(kind, source):
    # the cut's sample handed in beside the row (column j = the row's column j * step, as
    # sample_logits computes it) only steers the speed: with the row's own columns every long row
    # takes the sampled fast path; noise or a constant instead still give the right selection
    from misa.ops.topk import triton as topk_triton
    g = torch.Generator().manual_seed(len(source) + len(kind))
    t, s, k = (30, 7001, 90) if not BIG else (300, 70001, 2048)
    x = torch.randn(t, s, generator=g)
    ks, ke = ranges(kind, t, s, g)
    off = 5                                   # the buffer starts at key 5: columns are keys - 5
    ks, ke = ks + off, ke + off
    step = topk_triton.sample_step(s)
    n = -(-s // step)
    if source == "the row's columns":
        values = x[:, ::step].clone()
    elif source == "noise":
        values = torch.randn(t, n, generator=g) * 100
    else:
        values = torch.zeros(t, n)
    call = topk_triton.TopkLaunches(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k, ks_offset=off,
                                    out_offset=off, sample=(values.to(DEVICE), step))
    call.run()
    cols = torch.where(call.out >= 0, call.out - off, call.out)          # positions back to columns
    check_selection(cols, x.double(), ks - off, ke - off, k, rtol=0)
    if source == "the row's columns":
        long = ((ke - ks) >= 2 * call.cfg.sample) & ((ke - ks) > k)
        count = call.count.cpu()
        assert bool(long.any())
        assert bool((call.cut_keys.cpu()[long] != 0).all() & (count[long] >= k).all()
                    & (count[long] <= call.cap).all())


def test_topk_sample_is_checked():
    from misa.ops.topk import triton as topk_triton
    x = torch.randn(4, 100, device=DEVICE)
    ks = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    ke = torch.full((4,), 100, dtype=torch.int32, device=DEVICE)
    good = torch.zeros(4, 10, device=DEVICE)
    for sample, what in [((good, 0), "step must be an int >= 1"), ((good, 10.0), "step must be an int"),
                         ((good[:3], 10), "must have 4 rows"), ((good, 9), "at least ceil"),
                         ((good.double(), 10), "2-D float32"), ((good.t().contiguous().t(), 10), "must have")]:
        with pytest.raises(ValueError, match="^sample: .*" + what):
            topk_triton.topk(x, ks, ke, 3, sample=sample)


@pytest.mark.parametrize("routed", [False, True])
def test_sample_logits_are_the_window_columns(routed):
    # sample_logits: the logits kernel on every step-th key of a window, for every query (visible
    # or not), equal to the full-range logits at those keys
    from misa.ops.dsa.triton import sample_logits
    t, s, h, d = (21, 1003, 8, 64) if not BIG else (300, 20011, 64, 128)
    q, kv, w, _, _ = _inputs(t, s, h, d, "causal", seed=31)
    heads = _random_heads(t, h, 4, seed=32) if routed else None
    full = (torch.zeros(t, dtype=torch.int32), torch.full((t,), s, dtype=torch.int32))
    ref = dsa_logits64(q, kv, w, *[v.to(DEVICE) for v in full], heads=heads.cpu() if routed else None)
    for col_offset, width, step in [(0, s, 7), (37, s - 37 + 40, 16), (500, 300, 1)]:
        got = sample_logits(q, w, kv[0], kv[1], col_offset, width, step, heads=heads).cpu()
        n = -(-width // step)
        assert got.shape == (t, n)
        keys = torch.arange(col_offset, col_offset + width, step)
        have = keys < s                       # columns past the last key are not written
        assert _rel_err(got[:, have], ref[:, keys[have]], torch.ones(t, int(have.sum()), dtype=torch.bool)) < EXACT_RTOL


def test_gathered_scores_sample_is_their_strided_columns():
    # MISA-dagger's re-scoring also writes every step-th score for the top-k's cut: exactly those
    # columns of its scores, holes (-inf) included; with int32 or int64 key offsets alike
    from misa.ops.rescore.triton import GatherConfig, gather_logits
    t, s, c = (9, 700, 301) if not BIG else (300, 20000, 8191)
    q, kv, w, ks, ke = _inputs(t, s, 64, 128, "ragged", seed=41)
    inp = check_inputs(q, kv, w, ks, ke)
    g = torch.Generator().manual_seed(42)
    cand = torch.randint(-1, s, (t, c), generator=g, dtype=torch.int32).to(DEVICE)
    plain = gather_logits(inp, cand)
    # int32 key offsets (the default where the keys allow them) and int64 ones: the same scores
    assert torch.equal(gather_logits(inp, cand, config=GatherConfig(offsets32=False)), plain)
    for step in (1, 4, 7):
        scores, sample = gather_logits(inp, cand, sample_every=step)
        assert torch.equal(scores, plain)
        assert sample.shape == (t, -(-c // step)) and torch.equal(sample, plain[:, ::step])


def test_cut_sample_is_computed_only_where_it_pays():
    # the selections hand the top-k a sample for routed heads (few per query) on rows long enough
    # to sample; all 64 heads, or rows too short, keep the top-k's own cut
    from misa.ops.dsa import triton as dsa_triton
    from misa.ops.topk.triton import sample_step
    t, s, h, d = (9, 1100, 64, 128) if not BIG else (64, 20000, 64, 128)
    q, kv, w, _, _ = _inputs(t, s, h, d, "causal", seed=61)
    heads = _random_heads(t, h, 8, seed=62)
    got = dsa_triton.cut_sample(q, w, kv[0], kv[1], 3, s - 3, heads=heads)
    step = sample_step(s - 3)
    assert step > 1 and got is not None and got[1] == step
    assert torch.equal(got[0], dsa_triton.sample_logits(q, w, kv[0], kv[1], 3, s - 3, step, heads=heads))
    assert dsa_triton.cut_sample(q, w, kv[0], kv[1], 3, s - 3) is None                    # 64 heads
    assert dsa_triton.cut_sample(q, w, kv[0], kv[1], 0, 100, heads=heads) is None            # too short


@pytest.mark.parametrize("count_first", [False, True])
@pytest.mark.parametrize("order", ["ascending", "descending", "one hot span"])
def test_topk_kernel_on_rows_whose_winners_sit_together(monkeypatch, order, count_first):
    # the compaction's programs each stream one span of a row: here one span holds all the winners
    # and the others none (sorted rows, or a block of large values), and every row still takes
    # the sampled fast path
    from misa.ops.topk import triton as topk_triton
    monkeypatch.setattr(topk_triton, "COMPACT_CONFIG", topk_triton.CompactConfig(count_first=count_first))
    g = torch.Generator().manual_seed(len(order))
    t, s, k = (6, 9000, 300) if not BIG else (64, 70000, 2048)
    x = torch.randn(t, s, generator=g)
    if order == "ascending":
        x = torch.sort(x, dim=1).values
    elif order == "descending":
        x = torch.sort(x, dim=1, descending=True).values
    else:
        x[:, s // 3: s // 3 + 2 * k] += 10.0
    ks, ke = torch.zeros(t, dtype=torch.int32), torch.full((t,), s, dtype=torch.int32)
    call = topk_triton.TopkLaunches(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k)
    call.run()
    check_selection(call.out, x.double(), ks, ke, k, rtol=0)
    count = call.count.cpu()
    assert bool((call.cut_keys.cpu() != 0).all() & (count >= k).all() & (count <= call.cap).all())


@pytest.mark.parametrize("width,k", [(1, 1), (300, 7), (300, 400), (1000, 1000), (5000, 64), (8192, 2048)])
@pytest.mark.parametrize("holes", [False, True])
def test_topk_kernel_short_rows(width, k, holes):
    # short matrices (MISA-dagger's and HISA's second stage, HISA's block choice): ragged and empty
    # ranges, ties, k beyond the range (-1 padding), -inf holes skipped and positions mapped
    # through cmap
    from misa.ops.topk import triton as topk_triton
    g = torch.Generator().manual_seed(width + k)
    t = 37 if not BIG else 1000
    x = torch.round(torch.randn(t, width, generator=g) * 4) / 4           # many ties
    ks, ke = ranges("ragged", t, width, g)
    ks[0], ke[0] = 0, width
    ks[1], ke[1] = width // 2, width // 2                                  # an empty row
    cmap = None
    if holes:
        x[torch.rand(t, width, generator=g) < 0.3] = float("-inf")
        cmap = torch.randperm(10 * width, generator=g)[:width].int().repeat(t, 1)
    idx = topk_triton.topk(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), k, ks_offset=0, out_offset=0,
                           cmap=cmap.to(DEVICE) if holes else None, finite_only=holes).cpu()
    if holes:       # map back to columns, then check against the finite entries only
        inv = {int(v): j for j, v in enumerate(cmap[0].tolist())}
        idx = torch.tensor([[inv[int(v)] if v >= 0 else -1 for v in r] for r in idx], dtype=torch.int32)
        vals = x.double().masked_fill(torch.isinf(x), float("nan"))
        for r in range(t):
            row = idx[r][idx[r] >= 0]
            fin = [j for j in range(ks[r], ke[r]) if torch.isfinite(x[r, j])]
            assert len(row) == min(k, len(fin)) and set(row.tolist()) <= set(fin)
            assert bool((idx[r][len(row):] == -1).all())
            if row.numel() and len(fin) > len(row):
                rest = sorted(set(fin) - set(row.tolist()))
                assert float(vals[r, row].min()) >= float(vals[r, rest].max())
    else:
        check_selection(idx, x.double(), ks, ke, k, rtol=0)


def test_topk_kernel_heavy_ties_and_small_scratch(monkeypatch):
    from misa.ops.topk import triton as topk_triton
    monkeypatch.setattr(topk_triton, "scratch_size", lambda k, w: 16)   # force whole-row refinement
    g = torch.Generator().manual_seed(5)
    x = torch.ones(6, 3000)
    x[:, 7::11] = 2.0                                         # 272 twos, then a sea of ties
    x[2] = torch.round(torch.randn(3000, generator=g) * 4) / 4
    ks, ke = ranges("ragged", 6, 3000, g)
    ks[0], ke[0] = 0, 3000
    idx = misa.topk_indices(x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE), 400)
    check_selection(idx, x.double(), ks, ke, 400, rtol=0)


@pytest.mark.parametrize("h,bs", [(2, 64), (8, 128), (16, 1024)])
@pytest.mark.parametrize("kind", ["causal", "ragged"])
@pytest.mark.parametrize("router", ["abs-sum", "gap"])
def test_router_kernel(h, bs, kind, router):
    t, s = (23, 1500) if not BIG else (500, 40000)
    q, kv, w, ks, ke = _inputs(t, s, 64, 128, kind, seed=h * bs)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=h, block_size=bs, router=router)
    assert heads.shape == (t, h) and heads.dtype == torch.int32
    r = router_scores64(q, kv, w, ks, ke, bs, router)
    check_routing(heads, r, ROUTER_RTOL * r.abs().amax(1).clamp_min(1e-12))


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter multiplies in float32 whatever the config says")
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_router_kernel_precision(precision):
    # both MMA precisions the router ships (abs-sum's tf32, gap's tf32x3) pick the heads the
    # float64 reference picks, up to near-ties
    from misa.ops.router import triton as router_triton
    t, s, h, bs = 700, 50000, 8, 1024
    q, kv, w, ks, ke = _inputs(t, s, 64, 128, "causal", seed=31)
    inp = check_inputs(q, kv, w, ks, ke)
    heads = router_triton.route_heads(inp, h, bs, config=router_triton.RouteConfig(precision=precision))
    r = router_scores64(q, kv, w, ks, ke, bs, "abs-sum")
    check_routing(heads, r, ROUTER_RTOL * r.abs().amax(1).clamp_min(1e-12))


@pytest.mark.skipif(DEVICE == "cpu", reason="2 GiB of fp8 queries: on the GPU only")
@pytest.mark.parametrize("router", ["abs-sum", "gap"])
def test_router_kernel_past_2_to_the_31_query_elements(router):
    # q [T, 64, 128] with T * H * D past 2**31: from row 262144 on, a query's offset does not fit an
    # int32. Few keys keep it fast; sampled rows (the first, those about the boundary, the last)
    # against the float64 router on those rows.
    h, d, s, bs, active = 64, 128, 4096, 64, 8
    first_big = 2 ** 31 // (h * d)
    t = first_big + 1000
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.empty(t, h, d, dtype=FP8, device=DEVICE)
    for t0 in range(0, t, 1 << 15):                 # 1 GiB of float32 at a time
        part = q[t0:t0 + (1 << 15)]
        part.copy_(torch.randn(part.shape, generator=g, device=DEVICE))
    w = torch.randn(t, h, generator=g, device=DEVICE)
    keys = misa.quantize_keys(torch.randn(s, d, generator=torch.Generator().manual_seed(6)))
    kv = tuple(x.to(DEVICE) for x in keys)
    ks = torch.zeros(t, dtype=torch.int32, device=DEVICE)
    ke = torch.randint(1, s + 1, (t,), generator=g, device=DEVICE, dtype=torch.int32)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=active, block_size=bs, router=router)
    rows = torch.cat([torch.arange(0, 50), torch.arange(first_big - 50, first_big + 50), torch.arange(t - 50, t)])
    q_rows = q.view(torch.uint8)[rows.to(DEVICE)].view(FP8).cpu()
    r = router_scores64(q_rows, kv, w[rows], ks[rows], ke[rows], bs, router)
    check_routing(heads[rows], r, ROUTER_RTOL * r.abs().amax(1).clamp_min(1e-12))


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("h,stage1_factor,dtype", [(4, None, None), (8, None, None), (4, 3, None), (8, 40, None),
                                                   (4, 3, torch.float32)])
def test_misa_kernels(kind, h, stage1_factor, dtype):
    t, s, k = (17, 1200, 60) if not BIG else (600, 30000, 512)
    stage1 = stage1_factor and min(s, stage1_factor * k)      # MISA-dagger's k1, a multiple of k
    q, kv, w, ks, ke = _inputs(t, s, 64, 128, kind, seed=h + (stage1 or 0))
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=h, block_size=64)
    idx = misa.misa_select(q, kv, w, ks, ke, k=k, active_heads=h, block_size=64, stage1_k=stage1, logits_dtype=dtype)
    routed = dsa_logits64(q, kv, w, ks, ke, heads=heads.cpu())
    if stage1 is None:
        check_selection(idx, routed, ks.cpu(), ke.cpu(), k, rtol=EXACT_RTOL)
    else:
        # stage 1 in bfloat16 by default, float32 when asked
        stage1_rtol = EXACT_RTOL + (BF16_LOGITS_RTOL if dtype is None else 0.0)
        check_dagger_selection(idx, routed, dsa_logits64(q, kv, w, ks, ke), k, stage1, stage1_rtol)


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
def test_misa_kernel_all_heads_is_dsa_kernel(kind):
    t, s, k = (17, 1200, 60) if not BIG else (400, 20000, 700)
    q, kv, w, ks, ke = _inputs(t, s, 16, 64, kind, seed=3)
    dsa = misa.dsa_select(q, kv, w, ks, ke, k=k)
    m = misa.misa_select(q, kv, w, ks, ke, k=k, active_heads=16, block_size=128)
    check_selection(dsa, dsa_logits64(q, kv, w, ks, ke), ks.cpu(), ke.cpu(), k, rtol=EXACT_RTOL)
    assert as_sets(m) == as_sets(dsa)      # same kernel, same heads in the same order


@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("bs,m", [(16, 3), (64, 4), (128, 64)])
def test_hisa_kernels(monkeypatch, kind, bs, m):
    # the kept blocks (the candidates the kernel pipeline hands its re-scoring) against the pooled
    # reference scores in float64, then the pick against the exact scores of those candidates
    from misa.ops.rescore import triton as rescore_triton
    from misa.ops.router.reference import pool_keys, visible_blocks
    from misa.reference import block_logits
    from misa.ops.blocks import kept_blocks
    t, s, k = (15, 900, 40) if not BIG else (300, 20000, 512)
    k = min(k, bs * m)                              # block_k * block_size >= k
    q, kv, w, ks, ke = _inputs(t, s, 16, 64, kind, seed=bs + m)
    cands, real = [], rescore_triton.rerank
    monkeypatch.setattr(rescore_triton, "rerank", lambda inp, cand, k_, rows=slice(None), **kw:
                        cands.append(cand.cpu()) or real(inp, cand, k_, rows, **kw))
    idx = misa.hisa_select(q, kv, w, ks, ke, k=k, block_size=bs, block_k=m)
    m = kept_blocks(k, bs, m)                       # more than block_k where edge blocks are partial
    cand = torch.cat(cands).long()                  # [t, m * bs]: the kept blocks' positions, -1 holes
    assert cand.shape == (t, m * bs)
    kept = cand[:, ::bs]                            # each kept block's first position
    kbar = pool_keys(keys64(kv).cpu(), bs)
    ks_, ke_ = ks.cpu().long(), ke.cpu().long()
    vis = visible_blocks(ks_, ke_, kbar.shape[0], bs)
    q64, w64 = q.double().cpu(), w.double().cpu()
    pooled = block_logits(q64, kbar, w64, vis)
    # the kernel scores the pooled keys rounded to bf16 (relative error up to 2**-8), so a block's
    # score may move by 2**-8 * sum_h |w_h| |q_h| . |kbar_b| (relu is 1-Lipschitz), and by EXACT_RTOL of
    # that for the float32 sums
    magnitude = torch.einsum("th,thb->tb", w64.abs(), torch.matmul(q64.abs(), kbar.abs().t()))
    slack = (2.0 ** -8 + EXACT_RTOL) * magnitude
    full = dsa_logits64(q, kv, w, ks, ke)
    for t_, got in enumerate(as_sets(idx)):
        blocks = sorted(p // bs for p in kept[t_].tolist() if p >= 0)
        assert all(bool((cand[t_, j * bs:(j + 1) * bs] == kept[t_, j] + torch.arange(bs)).all())
                   for j in range(m) if kept[t_, j] >= 0)     # whole blocks
        shown = vis[t_].nonzero().flatten().tolist() if ke_[t_] > ks_[t_] else []    # (ks = ke: no block)
        assert len(set(blocks)) == len(blocks) == min(m, len(shown)) and set(blocks) <= set(shown)
        if not shown:
            assert not got
            continue
        first, last = int(ks_[t_]) // bs, (int(ke_[t_]) - 1) // bs
        assert first in blocks and last in blocks                   # always kept
        free = [b for b in blocks if b not in (first, last)]
        rest = [b for b in shown if b not in blocks]
        if free and rest:                                           # the best of the rest, up to near-ties
            assert min(float(pooled[t_, b] + slack[t_, b]) for b in free) >= \
                max(float(pooled[t_, b] - slack[t_, b]) for b in rest), (t_, blocks)
        # the pick: the top-k of the kept blocks' visible positions by the exact scores
        row = cand[t_]
        visible = set(row[(row >= ks_[t_]) & (row < ke_[t_])].tolist())
        check_pick_from(got, visible, k, full[t_], rtol=EXACT_RTOL)


def _kernel_spies(monkeypatch):
    """Count the launches of every kernel entry point the selections use."""
    from misa.ops.dsa import triton as dsa_t
    from misa.ops.rescore import triton as rescore_t
    from misa.ops.router import triton as router_t
    from misa.ops.topk import triton as topk_t
    launches = []
    for mod, name in ((dsa_t, "launch_logits"), (topk_t, "topk"), (router_t, "route_heads"),
                      (router_t, "pool_keys"), (rescore_t, "gather_logits")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **kw: launches.append(_name) or _real(*a, **kw))
    return launches


@pytest.mark.parametrize("h,d", [(6, 64), (8, 48)])
def test_shapes_the_kernels_do_not_tile_take_the_reference(monkeypatch, h, d):
    # head counts and head dims that are not powers of two: "auto" runs the reference (no kernel
    # launch) and agrees with it exactly; "triton" refuses with a ValueError naming the backend
    q, kv, w, ks, ke = _inputs(23, 400, h, d, "ragged", seed=h + d)
    calls = {
        "logits": lambda b: misa.dsa_logits(q, kv, w, ks, ke, backend=b),
        "dsa": lambda b: misa.dsa_select(q, kv, w, ks, ke, k=30, backend=b),
        "heads": lambda b: misa.route_heads(q, kv, w, ks, ke, active_heads=3, block_size=64, backend=b),
        "misa": lambda b: misa.misa_select(q, kv, w, ks, ke, k=30, active_heads=2, block_size=64, backend=b),
        "hisa": lambda b: misa.hisa_select(q, kv, w, ks, ke, k=30, block_size=64, block_k=3, backend=b),
    }
    launches = _kernel_spies(monkeypatch)
    got = {name: fn("auto") for name, fn in calls.items()}
    assert launches == []
    for name, fn in calls.items():
        with pytest.raises(ValueError, match="^backend: 'triton' cannot run these inputs: head count"):
            fn("triton")
        ref = fn("reference")
        if name == "logits":
            torch.testing.assert_close(got[name].cpu(), ref.cpu(), rtol=0, atol=0)
        elif name == "heads":
            assert torch.equal(got[name].cpu(), ref.cpu())
        else:
            assert as_sets(got[name].cpu()) == as_sets(ref.cpu()), name
    assert launches == []


def test_dispatch_uses_reference_for_float32(monkeypatch):
    q, kv, w, ks, ke = _inputs(7, 100, 8, 32, "causal", seed=0, kv="fp32", q_dtype=torch.float32)
    launches = _kernel_spies(monkeypatch)
    got = misa.dsa_select(q, kv, w, ks, ke, k=10, backend="auto")
    assert launches == []
    check_selection(got, dsa_logits64(q, kv, w, ks, ke), ks.cpu(), ke.cpu(), 10)
    with pytest.raises(ValueError, match="^backend: 'triton' cannot run these inputs: dtype float32"):
        misa.dsa_select(q, kv, w, ks, ke, k=10, backend="triton")


def test_backend_triton_runs_the_kernels(monkeypatch):
    q, kv, w, ks, ke = _inputs(9, 300, 8, 64, "causal", seed=3)
    launches = _kernel_spies(monkeypatch)
    misa.dsa_select(q, kv, w, ks, ke, k=10, backend="triton")
    assert launches.count("launch_logits") >= 1 and launches.count("topk") == 1
