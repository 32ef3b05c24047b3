"""Block-pruned decode and the engine-path ``DecodeSelector``: the batched kernels against the
float64 reference of ``misa/ops/blocks/reference.py`` and against the per-sequence HISA, on caches
with shuffled pages and garbage in unused slots. Kernels through the interpreter without CUDA."""
import pytest
import torch

import misa
from helpers import BIG, DEVICE, EXACT_RTOL, as_sets, check_pick_from, check_selection, dsa_logits64, paged_batch_on
from misa.ops.blocks import kept_blocks, reference as blocks_ref
from misa.ops.topk.triton_rows import short_rows_topk

pytest.importorskip("triton")
pytestmark = [pytest.mark.usefixtures("kernels_on"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

# block means meet q in a tf32 MMA on the GPU (float32 in the interpreter, where only the float32
# page sums and the order of summation differ from float64); one page a block from a bfloat16
# pooled cache, in a bf16 MMA whose products are exact (EXACT_BLOCK_RTOL everywhere)
RTOL = 5e-3 if BIG else 1e-4
EXACT_BLOCK_RTOL = 1e-4


def _batch(lens, next_n, h, d, seed):
    return paged_batch_on(DEVICE, lens, next_n, h, d, seed, extra_pages=3)


def pooled_sums(cache, table, clens, dtype=misa.quant.POOLED_DTYPE):
    """float64 page sums from the cache (what the pooled-key cache holds), rounded to ``dtype``."""
    d = misa.quant.paged_head_dim(cache)
    pooled = torch.zeros(cache.shape[0], d, dtype=torch.float64, device=cache.device)
    for b, n in enumerate(clens.tolist()):
        k = misa.dequantize_keys(*misa.read_paged_kcache(cache, table[b], n)).double()
        for j in range(-(-n // 64)):
            pooled[int(table[b, j])] = k[j * 64:(j + 1) * 64].sum(0)
    return pooled.to(dtype)


def _ends(clens, n):
    return (clens.long()[:, None] - n + 1 + torch.arange(n, device=clens.device)).reshape(-1).cpu()


CASES = [([70, 129, 300, 5], 1, 64), ([200, 1000], 2, 128), ([64, 640, 3], 1, 64)]
if BIG:
    CASES += [([700, 4000, 30000, 65], 2, 64), ([131072, 9000], 1, 128)]


@pytest.mark.parametrize("lens,next_n,block_size,pooled_dtype,tile,splits,heads",
                         [c + (torch.bfloat16, 64, None, None) for c in CASES]
                         + [CASES[0] + (torch.float32, 64, None, None),
                            ([3000, 70], 2, 64, torch.bfloat16, 16, 2, None),
                            ([129, 1025, 70], 2, 64, torch.bfloat16, 64, None, 16)]
                         # 256 (head, query) pairs of float32 queries: the interpreter's case only
                         + ([([300, 90], 5, 64, torch.bfloat16, 16, 2, 128)] if DEVICE == "cpu" else []))
def test_block_scores_kernel_like_float64(lens, next_n, block_size, pooled_dtype, tile, splits, heads):
    # both pooled-cache dtypes: the kernel reads the rows as float32 whatever they are stored in;
    # two programs per sequence taking alternate tiles of 16 blocks (47 blocks: three tiles); 16 and
    # 128 heads, queries whose visible ends cross a block boundary (129, 1025 tokens), and five
    # queries at 128 heads (three tiles of two, the last holding one query)
    from misa.ops.blocks import triton as blocks_triton
    h, d = (8, 64) if not BIG else (64, 128)
    h = heads or h
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=sum(lens) + next_n)
    pooled = pooled_sums(cache, table, clens, pooled_dtype)
    width = -(-table.shape[1] * 64 // block_size)
    # one row more than the queries: nothing may be written past the last query's row
    got = torch.full((len(lens) * next_n + 1, width), float("nan"), device=DEVICE)
    ends = torch.empty(len(lens) * next_n, dtype=torch.int32, device=DEVICE)
    m = 3
    top = torch.full((len(lens) * next_n, m), -7, dtype=torch.int32, device=DEVICE)
    fused = blocks_triton.block_scores(q, pooled, w, clens, table, block_size, got, ends, tile=tile, splits=splits,
                                       top=top)
    assert bool(got[-1].isnan().all())
    got = got[:-1]
    # one program per sequence (every case off the GPU but the two-split one) takes the top-m too,
    # exactly as the separate top-m would on the scores written
    assert fused == (splits is None and (DEVICE == "cpu" or width <= 64))
    if fused:
        want = torch.empty_like(top)
        short_rows_topk(got, torch.zeros_like(ends), ends, m, want)
        assert torch.equal(top, want)
    else:
        assert (top == -7).all()
    ref = blocks_ref.block_scores(q.cpu(), pooled.cpu(), w.cpu(), clens.cpu(), table.cpu(), block_size, width)
    visible_end = -(-_ends(clens, next_n) // block_size)
    assert torch.equal(ends.cpu().long(), visible_end)
    got = got.cpu()
    for r in range(got.shape[0]):
        n = int(visible_end[r])
        assert torch.equal(torch.isposinf(got[r, :n]), torch.isposinf(ref[r, :n]))     # first and last forced
        fin = torch.isfinite(ref[r, :n])
        scale = float(ref[r, :n][fin].abs().max()) if fin.any() else 1.0
        rtol = EXACT_BLOCK_RTOL if block_size == 64 and pooled_dtype == torch.bfloat16 else RTOL
        torch.testing.assert_close(got[r, :n][fin], ref[r, :n][fin], rtol=0, atol=rtol * scale)
        nblk = -(-int(clens[r // next_n]) // block_size)
        assert torch.isneginf(got[r, n:nblk]).all()                 # blocks past the visible end


@pytest.mark.parametrize("lens,next_n,block_size,shared,splits",
                         [c + (False, None) for c in CASES[:2]]
                         + [(CASES[1][0], 2, 128, True, None), ([65, 129, 1000, 3], 2, 64, True, 2),
                            ([65, 129, 1000, 3], 2, 64, True, None), ([300, 4000], 2, 64, True, 3)])
def test_chosen_block_logits_kernel_like_float64(lens, next_n, block_size, shared, splits):
    # every column of every row written (outputs start as NaN and -7): with two queries a sequence,
    # lists sharing most blocks in other slots, blocks only one query keeps, empty slots on either
    # side, and a last block only the second query sees (65 and 129 tokens); splits taking every
    # second or third slot
    from misa.ops.blocks import triton as blocks_triton
    h, d = 8, 64
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=7 + next_n + len(lens))
    g = torch.Generator().manual_seed(3)
    rows, m = len(lens) * next_n, 5 if shared else 3
    visible = (clens.cpu().long()[:, None] - next_n + 1 + torch.arange(next_n)).reshape(-1)
    nblk = -(-visible // block_size)
    # m block slots per row: random distinct visible blocks, -1 (an empty slot) where fewer exist
    lists = [(torch.randperm(int(nb), generator=g)[:m].tolist() + [-1] * m)[:m] for nb in nblk]
    if shared:      # the second query keeps the first's blocks in another order, one of them swapped
        for r in range(0, rows, 2):
            other = [lists[r][i] for i in torch.randperm(m, generator=g).tolist()]
            spare = [x for x in range(int(nblk[r + 1])) if x not in other]
            if spare and r % 4 == 0:
                other[int(torch.randint(m, (1,), generator=g))] = spare[-1]      # the last: maybe q1's only
            elif r % 4 == 2:
                other[int(torch.randint(m, (1,), generator=g))] = -1
            lists[r + 1] = other
    blocks = torch.tensor(lists, dtype=torch.int32, device=DEVICE)
    scores = torch.full((rows, m * block_size), float("nan"), device=DEVICE)
    pos = torch.full((rows, m * block_size), -7, dtype=torch.int32, device=DEVICE)
    blocks_triton.chosen_block_logits(q, cache, w, clens, table, blocks, block_size, scores, pos, splits=splits)
    ref_s, ref_p = blocks_ref.chosen_block_logits(q.cpu(), cache.cpu(), w.cpu(), clens.cpu(), table.cpu(),
                                                  blocks.cpu(), block_size)
    assert torch.equal(pos.cpu(), ref_p)
    fin = torch.isfinite(ref_s)
    assert torch.equal(fin, torch.isfinite(scores.cpu()))
    torch.testing.assert_close(scores.cpu()[fin], ref_s[fin], rtol=0, atol=EXACT_RTOL * float(ref_s[fin].abs().max()))


@pytest.mark.parametrize("lens,next_n,block_size", CASES)
@pytest.mark.parametrize("block_k", [2, 5])
def test_block_pruned_select_is_hisa(lens, next_n, block_size, block_k):
    # the batched block-pruned path picks, for every query, the top-k of the tokens of the blocks
    # HISA keeps (the reference's block choice, up to near-ties), and returns min(k, visible)
    h, d = (8, 64) if not BIG else (64, 128)
    k = block_size * block_k // 2 if not BIG else min(2048, block_size * block_k)
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=block_k + sum(lens))
    pooled = pooled_sums(cache, table, clens)
    got = misa.paged_hisa_select(q, cache, w, clens, table, k=k, block_size=block_size, block_k=block_k,
                                 pooled=pooled)
    assert got.shape == (len(lens) * next_n, k) and got.dtype == torch.int32
    ends = _ends(clens, next_n)
    m = kept_blocks(k, block_size, block_k)
    scores = blocks_ref.block_scores(q.cpu(), pooled.cpu(), w.cpu(), clens.cpu(), table.cpu(), block_size,
                                     -(-table.shape[1] * 64 // block_size))
    for b in range(len(lens)):
        for i in range(next_n):
            r = b * next_n + i
            ke = int(ends[r])
            full = dsa_logits64(q[b, i:i + 1], seqs[b], w[r:r + 1], torch.zeros(1, dtype=torch.int32),
                                torch.tensor([ke], dtype=torch.int32))[0]
            row = scores[r, : -(-ke // block_size)].double()
            order = sorted(range(row.shape[0]), key=lambda j: (-float(row[j]), j))
            kept, rest = order[:m], order[m:]
            # near-ties at the m-th block may go either way: accept any block within tolerance
            fin = row[torch.isfinite(row)]
            tol = RTOL * float(fin.abs().max()) if fin.numel() else 0.0
            edge = float(row[kept[-1]]) if rest else float("inf")
            maybe = {j for j in rest if float(row[j]) >= edge - tol}
            pick = as_sets(got[r:r + 1])[0]
            assert len(pick) == min(k, ke)
            assert all(0 <= p < ke for p in pick)
            blocks_of_pick = {p // block_size for p in pick}
            assert blocks_of_pick <= set(kept) | maybe
            if not maybe:
                cand = {p for j in kept for p in range(j * block_size, min((j + 1) * block_size, ke))}
                check_pick_from(pick, cand, k, full, rtol=RTOL)


def test_decode_selector_dsa_equals_paged_dsa_select():
    lens, next_n = [70, 129, 300], 2
    seqs, q, w, cache, table, clens = _batch(lens, next_n, 8, 64, seed=11)
    sel = misa.DecodeSelector("dsa", num_heads=8, head_dim=64, k=40, max_batch=4, max_context=table.shape[1] * 64,
                              next_n=next_n, device=DEVICE)
    sel.check(q, cache, w, clens, table)
    got = sel(q, cache, w, clens, table).clone()
    ends = _ends(clens, next_n)
    for b in range(len(lens)):
        rows = slice(b * next_n, (b + 1) * next_n)
        ke = ends[rows].int()
        check_selection(got[rows], dsa_logits64(q[b], seqs[b], w[rows], torch.zeros_like(ke), ke),
                        torch.zeros_like(ke), ke, 40)
    # a second call at the same batch size reuses the plan (same output buffer)
    again = sel(q, cache, w, clens, table)
    assert again.data_ptr() == sel.plan(len(lens)).out.data_ptr() and as_sets(again) == as_sets(got)


def test_decode_selector_checks_its_inputs():
    seqs, q, w, cache, table, clens = _batch([70, 129], 1, 8, 64, seed=12)
    pooled = pooled_sums(cache, table, clens)
    with pytest.raises(ValueError, match="^block_size:"):
        misa.DecodeSelector("hisa", num_heads=8, head_dim=64, k=64, max_batch=2, max_context=256, block_size=96,
                            block_k=4, device=DEVICE)
    with pytest.raises(ValueError, match="^block_k:"):
        misa.DecodeSelector("hisa", num_heads=8, head_dim=64, k=2048, max_batch=2, max_context=256, block_k=4,
                            device=DEVICE)
    with pytest.raises(ValueError, match="^variant:"):
        misa.DecodeSelector("misa-x", num_heads=8, head_dim=64, max_batch=2, max_context=256, device=DEVICE)
    sel = misa.DecodeSelector("hisa", num_heads=8, head_dim=64, k=64, max_batch=2, max_context=256, block_k=2,
                              device=DEVICE)
    with pytest.raises(ValueError, match="^pooled:"):
        sel.check(q, cache, w, clens, table)
    with pytest.raises(ValueError, match="^pooled:"):
        sel.check(q, cache, w, clens, table, pooled[:-1])
    with pytest.raises(ValueError, match="^q:"):
        sel.check(q[:, :, :4], cache, w[:, :4], clens, table, pooled)
    small = misa.DecodeSelector("dsa", num_heads=8, head_dim=64, k=64, max_batch=2, max_context=64, device=DEVICE)
    with pytest.raises(ValueError, match="^block_table:|^context_lens:"):
        small.check(q, cache, w, clens, table)
    with pytest.raises(ValueError, match="^block_size:"):
        misa.paged_hisa_select(q, cache, w, clens, table, k=64, block_size=96, block_k=2, pooled=pooled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("variant", ["dsa", "hisa", "misa", "misa-dagger"])
def test_decode_selector_replays_in_a_cuda_graph(variant):
    # captured once, replayed with new q, weights, context_lens and block_table copied into the
    # captured tensors: the same selection as the checked function on those inputs; a direct call
    # and the replays run with host syncs turned into errors
    lens, next_n, h, d, k, stage1_k = [3000, 9000, 700, 20000], 2, 64, 128, 512, 2048
    batches = [_batch([n + 37 * s for n in lens], next_n, h, d, seed=s) for s in range(3)]
    pages = max(t.shape[1] for *_, t, _ in batches)
    num_pages = max(c.shape[0] for *_, c, _, _ in batches)

    def padded(batch):
        seqs, q, w, cache, table, clens = batch
        cache = torch.cat([cache, cache.new_zeros(num_pages - cache.shape[0], *cache.shape[1:])])
        table = torch.nn.functional.pad(table, (0, pages - table.shape[1]))
        return seqs, q, w, cache, table, clens, pooled_sums(cache, table, clens)

    first = padded(batches[0])
    static = [x.clone() for x in first[1:]]
    sel = misa.DecodeSelector(variant, num_heads=h, head_dim=d, k=k, max_batch=len(lens), max_context=pages * 64,
                              next_n=next_n, device="cuda", block_k=16,
                              stage1_k=stage1_k if variant == "misa-dagger" else None)
    q, w, cache, table, clens, pooled = static
    sel.check(q, cache, w, clens, table, pooled)
    sel(q, cache, w, clens, table, pooled)              # warm-up: compiles, makes the plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sel(q, cache, w, clens, table, pooled)          # no device-to-host read, no sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sel(q, cache, w, clens, table, pooled)
    for batch in batches[1:]:
        new = padded(batch)
        for dst, src in zip(static, new[1:]):
            dst.copy_(src)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        _, q2, w2, cache2, table2, clens2, pooled2 = new
        if variant == "dsa":
            want = misa.paged_dsa_select(q2, cache2, w2, clens2, table2, k=k)
        elif variant == "misa":
            want = misa.paged_misa_select(q2, cache2, w2, clens2, table2, k=k, active_heads=8, pooled=pooled2)
        elif variant == "misa-dagger":
            want = misa.paged_misa_select(q2, cache2, w2, clens2, table2, k=k, active_heads=8, pooled=pooled2,
                                          stage1_k=stage1_k)
        else:
            want = misa.paged_hisa_select(q2, cache2, w2, clens2, table2, k=k, block_size=64, block_k=16,
                                          pooled=pooled2)
        same = [len(a & b) / max(1, len(b)) for a, b in zip(as_sets(out), as_sets(want))]
        assert min(same) >= 0.999, min(same)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("fn", ["dsa", "hisa", "hisa without pooled", "misa-dagger"])
def test_checked_functions_replay_their_graph_with_new_inputs(monkeypatch, fn):
    # a checked function called again with the same shapes and cache replays a CUDA graph of its
    # selector: each call's new q, weights, lengths and table (and, at one step, new keys written
    # into the same cache) select what the selector selects without the graph
    from misa import paged
    lens, next_n, h, d, k = [3000, 9000, 700], 2, 64, 128, 512
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=95)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    g = torch.Generator().manual_seed(5)

    def call(q, w, clens, table):
        if fn == "dsa":
            return misa.paged_dsa_select(q, cache, w, clens, table, k=k)
        if fn.startswith("hisa"):
            return misa.paged_hisa_select(q, cache, w, clens, table, k=k, block_size=64, block_k=16,
                                          pooled=None if "without" in fn else pooled)
        return misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=8, stage1_k=2048, pooled=pooled)

    paged._SELECTORS.clear()
    for step in range(4):
        q2 = (q.float() * torch.rand(q.shape[:3] + (1,), generator=g).to("cuda")).to(q.dtype)
        w2 = torch.randn(w.shape, generator=g).to("cuda")
        clens2 = clens - torch.randint(0, 300, clens.shape, generator=g).int().to("cuda")
        table2 = table.clone()
        table2[:, :2] = table2[:, :2].flip(1)          # other pages, all inside the cache
        if step == 2:       # new keys in place: the graph must read the cache as it is now
            k_new, s_new = misa.quantize_keys(torch.randn(64, d, generator=g) * 5)
            misa.write_paged_kcache(cache, table[1, 3].long() * 64 + torch.arange(64, device="cuda"),
                                    k_new.cuda(), s_new.cuda(), pooled)
        got = call(q2, w2, clens2, table2)
        with monkeypatch.context() as m:
            m.setenv("MISA_GRAPHS", "0")
            want = call(q2, w2, clens2, table2)
        assert got.shape == want.shape and as_sets(got) == as_sets(want), step
    from misa.graphs import Graph
    assert sum(isinstance(g, Graph) for sel in paged._SELECTORS.values() for g in sel.graphs.values()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("fn", ["dsa", "hisa"])
def test_checked_calls_over_many_layers_caches_each_replay(monkeypatch, fn):
    # a model's layers call the checked function at one shape, each with its own cache: every layer
    # gets a graph of its own (more layers than selectors are kept), all of them reading one set of
    # input buffers, and from the third step on every call is one checked replay
    from misa import paged
    from misa.graphs import Graph
    layers = [_batch(CHECKED_LENS, CHECKED_NEXT_N, 64, 128, seed=60 + i)[1:] for i in range(12)]
    pools = [misa.pool_paged_kcache(cache, table, clens) for _, _, cache, table, clens in layers]

    def call(q, w, cache, table, clens, pooled):
        if fn == "dsa":
            return misa.paged_dsa_select(q, cache, w, clens, table, k=CHECKED_K)
        return misa.paged_hisa_select(q, cache, w, clens, table, k=CHECKED_K, block_size=64, block_k=16,
                                      pooled=pooled)

    paged._SELECTORS.clear()
    with monkeypatch.context() as m:
        m.setenv("MISA_GRAPHS", "0")
        want = [as_sets(call(*layer, pooled)) for layer, pooled in zip(layers, pools)]
    read_backs = []
    real = paged._check_paged
    monkeypatch.setattr(paged, "_check_paged", lambda *a: (read_backs.append(1), real(*a))[1])
    for step in range(3):
        read_backs.clear()
        for i, (layer, pooled) in enumerate(zip(layers, pools)):
            assert as_sets(call(*layer, pooled)) == want[i], (step, i)
    assert read_backs == []
    sel, = paged._SELECTORS.values()
    made = [g for g in sel.graphs.values() if isinstance(g, Graph)]
    assert len(made) == len(layers)
    assert len({g.inputs[0].data_ptr() for g in made}) == 1 and len({id(g.checks) for g in made}) == 1


def test_checked_call_signature_tells_apart_what_the_full_path_depends_on(monkeypatch):
    # a repeated checked call skips to its replay only on an equal signature: equal for the same
    # layouts with new values, different for another dtype, stride, shape, cache, pooled cache,
    # argument or environment override, None for an argument that is not a tensor
    from misa.paged import _signature
    _, q, w, cache, table, clens = _batch([70, 129], 2, 8, 64, seed=7)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    call = ("dsa", 64, None)
    base = _signature(call, q, cache, w, clens, table, pooled)
    assert base is not None
    assert _signature(call, q.clone(), cache, torch.randn_like(w), clens.clone(), table.clone(), pooled) == base
    wide = torch.empty(w.shape[0], 2 * w.shape[1])
    wide[:, : w.shape[1]] = w
    others = [(call, q, cache, w.double(), clens, table, pooled),
              (call, q, cache, wide[:, : w.shape[1]], clens, table, pooled),
              (call, q, cache, w, clens, table[:, :-1], pooled), (call, q, cache.clone(), w, clens, table, pooled),
              (call, q, cache, w, clens, table, pooled.clone()), (call, q, cache, w, clens, table, None),
              (("dsa", 32, None), q, cache, w, clens, table, pooled)]
    assert all(_signature(*args) != base for args in others)
    assert _signature(call, q, cache, w.tolist(), clens, table, pooled) is None
    monkeypatch.setenv("MISA_BACKEND", "reference")
    assert _signature(call, q, cache, w, clens, table, pooled) != base


CHECKED_LENS, CHECKED_NEXT_N, CHECKED_K = [3000, 9000, 700], 2, 512


def _checked_setup(fn, seed):
    """A batch of three sequences with two new tokens each (64 heads, D = 128), its pooled-key
    cache, and the checked public function ``fn`` ("dsa", "hisa" or "misa") over its cache as
    ``call(q, w, clens, table)``; the kept selectors cleared."""
    from misa import paged
    _, q, w, cache, table, clens = _batch(CHECKED_LENS, CHECKED_NEXT_N, 64, 128, seed=seed)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    k = CHECKED_K

    def call(q, w, clens, table):
        if fn == "dsa":
            return misa.paged_dsa_select(q, cache, w, clens, table, k=k)
        if fn == "hisa":
            return misa.paged_hisa_select(q, cache, w, clens, table, k=k, block_size=64, block_k=16, pooled=pooled)
        return misa.paged_misa_select(q, cache, w, clens, table, k=k, active_heads=8, pooled=pooled)

    paged._SELECTORS.clear()
    return call, q, w, cache, table, clens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("fn", ["dsa", "hisa", "misa"])
def test_checked_replay_checks_its_own_inputs(monkeypatch, fn):
    # from the third call at a layout the checked function's graph checks its inputs itself (no
    # read-back before the launches): bad input still raises the first failed check's ValueError,
    # the selection run on it reads nothing outside the cache, and the next good call is unchanged
    from misa import paged
    call, q, w, cache, table, clens = _checked_setup(fn, seed=41)
    want = as_sets(call(q, w, clens, table))            # checked with a read-back, then the capture
    assert as_sets(call(q, w, clens, table)) == want
    read_backs = []
    real = paged._check_paged
    monkeypatch.setattr(paged, "_check_paged", lambda *a: (read_backs.append(1), real(*a))[1])
    assert as_sets(call(q, w, clens, table)) == want
    bad_q = q.clone()
    bad_q.view(torch.uint8)[1, 0, 5, 7] = 0x7F
    bad_w = w.clone()
    bad_w[3, 2] = float("inf")
    short, long_, outside, negative = clens.clone(), clens.clone(), table.clone(), table.clone()
    short[2] = 1
    long_[0] = table.shape[1] * 64 + 1
    outside[1, 100] = cache.shape[0] + 7
    negative[0, 3] = -1
    cases = [((bad_q, w, clens, table), "^q:"), ((q, bad_w, clens, table), "^weights:"),
             ((q, w, short, table), "^context_lens:"), ((q, w, long_, table), "^block_table: too few columns"),
             ((q, w, clens, outside), "^block_table: page id outside"),
             ((q, w, clens, negative), "^block_table: page id outside")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            call(*args)
        torch.cuda.synchronize()                       # an access outside the cache would fail here
        assert as_sets(call(q, w, clens, table)) == want, message
    assert read_backs == []                            # every call above was one checked replay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("fn", ["dsa", "hisa", "misa"])
def test_checked_call_repeating_a_signature_goes_straight_to_the_replay(monkeypatch, fn):
    # once a layout replays, a call with the same shapes, dtypes, devices, cache and arguments skips
    # the shape checks and the lookups; a call differing in any of them takes the full path again,
    # so bad arguments still get their ValueError and an environment override still applies
    from misa import paged
    call, q, w, cache, table, clens = _checked_setup(fn, seed=43)
    next_n = CHECKED_NEXT_N
    want = as_sets(call(q, w, clens, table))
    for _ in range(2):
        assert as_sets(call(q, w, clens, table)) == want
    full_path = []
    real = paged._check_paged_shapes
    monkeypatch.setattr(paged, "_check_paged_shapes", lambda *a: (full_path.append(1), real(*a))[1])
    g = torch.Generator().manual_seed(3)
    w2 = torch.randn(w.shape, generator=g).to("cuda")
    with monkeypatch.context() as m:
        m.setenv("MISA_GRAPHS", "0")
        want2 = as_sets(call(q, w2, clens, table))
    full_path.clear()
    assert as_sets(call(q, w2, clens, table)) == want2 and as_sets(call(q, w, clens, table)) == want
    assert full_path == []                             # same signature: straight to the replay
    for bad, message in ((dict(w=w.double()), "^weights:"), (dict(w=w.tolist()), "^weights:"),
                         (dict(clens=clens.long()), "^context_lens:"), (dict(table=table[:2]), "^block_table:"),
                         (dict(w=w.cpu()), "^weights:")):
        args = dict(q=q, w=w, clens=clens, table=table) | bad
        with pytest.raises(ValueError, match=message):
            call(**args)
    # the same values in another layout (q a strided view): the full path, then its own replay
    wide = torch.empty((q.shape[0], 2 * next_n) + q.shape[2:], dtype=q.dtype, device=q.device)
    wide[:, :next_n] = q
    q_view = wide[:, :next_n]
    for _ in range(3):
        assert as_sets(call(q_view, w, clens, table)) == want
    per_sequence = []
    real_seq = paged._paged_select
    monkeypatch.setattr(paged, "_paged_select", lambda *a: (per_sequence.append(1), real_seq(*a))[1])
    monkeypatch.setenv("MISA_BACKEND", "reference")     # the override applies to a repeated call too
    assert call(q, w, clens, table).shape == (len(CHECKED_LENS) * next_n, CHECKED_K) and per_sequence == [1]


def test_block_pruned_selector_keeping_every_block_runs_dense():
    # blocks kept that cover max_context: the dense path (DSA's selection), fewer launches
    lens, next_n, h, d, k = [200, 77], 1, 8, 64, 32
    seqs, q, w, cache, table, clens = _batch(lens, next_n, h, d, seed=17)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    common = dict(num_heads=h, head_dim=d, k=k, max_batch=2, max_context=256, device=DEVICE)
    every = misa.DecodeSelector("hisa", block_size=64, block_k=4, **common)
    some = misa.DecodeSelector("hisa", block_size=64, block_k=2, **{**common, "max_context": 320})
    assert not every.block_pruned and some.block_pruned
    table = torch.nn.functional.pad(table, (0, 4 - table.shape[1]))
    dense = misa.DecodeSelector("dsa", **common)(q, cache, w, clens, table)
    assert as_sets(every(q, cache, w, clens, table, pooled)) == as_sets(dense)


def test_block_pruned_select_with_and_without_pooled():
    # without pooled the batched path pools the cache itself: the same selection as with the
    # pooled-key cache an engine keeps with write_paged_kcache (token by token, as in decode)
    lens, next_n = [300, 129, 77], 2
    seqs, q, w, cache, table, clens = _batch(lens, next_n, 8, 64, seed=21)
    pooled = misa.new_pooled_kcache(cache.shape[0], 64, device=DEVICE)
    for b, (k_fp8, k_scale) in enumerate(seqs):
        slots = (table[b].long()[:, None] * 64 + torch.arange(64, device=DEVICE)).reshape(-1)[: lens[b]]
        for t in range(lens[b]):
            misa.write_paged_kcache(cache, slots[t:t + 1], k_fp8[t:t + 1], k_scale[t:t + 1], pooled=pooled)
    opts = dict(k=128, block_size=64, block_k=3)
    with_pooled = misa.paged_hisa_select(q, cache, w, clens, table, pooled=pooled, **opts)
    without = misa.paged_hisa_select(q, cache, w, clens, table, **opts)
    assert as_sets(with_pooled) == as_sets(without)


@pytest.mark.parametrize("router", ["abs-sum", "gap"])
def test_routing_from_the_pooled_cache_equals_routing_from_the_cache(router):
    # the router's blocks from a float32 pooled-key cache's page sums instead of a pass over the
    # cache: the same heads (up to near-ties of the router score), and MISA then selects the same
    # tokens. From the bfloat16 cache: the heads the reference router picks from those rounded sums.
    from misa.ops.pool import reference as pool_ref
    from misa.ops.router import reference as router_ref
    lens, next_n = [300, 129, 1000], 2
    seqs, q, w, cache, table, clens = _batch(lens, next_n, 8, 64, seed=31)
    pooled = misa.pool_paged_kcache(cache, table, clens, dtype=torch.float32)
    opts = dict(active_heads=3, block_size=128, router=router)
    a = misa.paged_route_heads(q, cache, w, clens, table, **opts)
    b = misa.paged_route_heads(q, cache, w, clens, table, pooled=pooled, **opts)
    sa = misa.paged_misa_select(q, cache, w, clens, table, k=64, **opts)
    sb = misa.paged_misa_select(q, cache, w, clens, table, k=64, pooled=pooled, **opts)
    if not BIG:
        assert torch.equal(a, b) and as_sets(sa) == as_sets(sb)
    else:       # the router's tf32 products may flip a near-tie between the two block sums
        assert (a == b).all(1).float().mean() >= 0.9
    rounded = misa.pool_paged_kcache(cache, table, clens)
    assert rounded.dtype == torch.bfloat16
    # with options the selector takes (power-of-two heads), MISA without pooled builds the default
    # (bfloat16) pooled cache itself: the same selection as with it
    two = dict(opts, active_heads=2)
    assert as_sets(misa.paged_misa_select(q, cache, w, clens, table, k=64, **two)) == \
        as_sets(misa.paged_misa_select(q, cache, w, clens, table, k=64, pooled=rounded, **two))
    got = misa.paged_route_heads(q, cache, w, clens, table, pooled=rounded, **opts).cpu()
    nb = -(-max(lens) // 128)
    kbar = pool_ref.pool_blocks(rounded.cpu(), table.cpu(), clens.cpu(), 128, nb)
    ends = _ends(clens, next_n)
    same = []
    for r in range(len(lens) * next_n):
        vis = router_ref.visible_blocks(torch.zeros(1, dtype=torch.long), ends[r:r + 1], nb, 128)
        qr = q.reshape(-1, 8, 64)[r:r + 1].float().cpu()
        score = router_ref.head_router_scores(qr, kbar[r // next_n], w[r:r + 1].float().cpu(), vis, router)
        same.append(torch.equal(got[r:r + 1].long(), router_ref.top_heads(score, 3)))
    assert all(same) if not BIG else sum(same) >= 0.9 * len(same), same
    with pytest.raises(ValueError, match="^block_size:"):
        misa.paged_route_heads(q, cache, w, clens, table, active_heads=3, block_size=96, pooled=pooled)


def test_decode_selector_misa_equals_paged_misa_select():
    # the selector's routed decode (pooled blocks, routing, routed paged logits, top-k into its own
    # buffers) selects what the checked paged_misa_select selects with the same pooled-key cache
    lens, next_n = [300, 1100, 77], 2
    seqs, q, w, cache, table, clens = _batch(lens, next_n, 8, 64, seed=41)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    sel = misa.DecodeSelector("misa", num_heads=8, head_dim=64, k=64, max_batch=3, max_context=table.shape[1] * 64,
                              next_n=next_n, device=DEVICE, active_heads=2, router_block_size=128)
    sel.check(q, cache, w, clens, table, pooled)
    got = sel(q, cache, w, clens, table, pooled)
    want = misa.paged_misa_select(q, cache, w, clens, table, k=64, active_heads=2, block_size=128, pooled=pooled)
    assert as_sets(got) == as_sets(want)
    with pytest.raises(ValueError, match="^active_heads:"):
        misa.DecodeSelector("misa", num_heads=8, head_dim=64, max_batch=3, max_context=1024, active_heads=3,
                            device=DEVICE)
    with pytest.raises(ValueError, match="^router_block_size:"):
        misa.DecodeSelector("misa", num_heads=8, head_dim=64, max_batch=3, max_context=1024, active_heads=2, router_block_size=100,
                            device=DEVICE)
