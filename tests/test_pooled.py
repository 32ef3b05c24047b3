"""The pooled-key cache (misa/quant.py, misa/ops/pool): built from a cache, kept current by
``write_paged_kcache``, and turned into the router's pooled blocks.

Inputs are fresh random and ragged (lengths not multiples of the page, one shorter than a page),
pages shuffled by ``build_paged_kcache`` with garbage in every unwritten slot. Every result is
checked against float64 sums of ``read_paged_kcache``'s tokens, within a float32 summation bound:
``|error| <= n * 2^-24 * sum |x|`` for a sum of ``n`` float32 products (times 2 for slack), plus one
rounding to the pooled cache's dtype (bfloat16: ``2^-8`` of the value). Kernels run through
Triton's interpreter on the CPU (``MISA_BACKEND=triton``), compiled on a GPU.
"""
import pytest
import torch

import misa
from misa.ops import kernels_available
from misa.ops.pool import pool_blocks
from misa.ops.pool import reference as pool_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = misa.PAGE_SIZE
U = 2.0 ** -24
LENS = (37, 64, 150, 301, 1100)          # one shorter than a page, one exactly a page, the rest ragged

BACKENDS = ["triton", "reference"]


@pytest.fixture
def backend(request, monkeypatch):
    """Run with MISA_BACKEND set: the documented override the public functions read."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("MISA_BACKEND", request.param)
    return request.param


def _batch(lens, d, seed, extra_pages=3):
    g = torch.Generator().manual_seed(seed)
    seqs = [misa.quantize_keys(torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 4)
            for n in lens]
    seqs = [(k.to(DEVICE), s.to(DEVICE)) for k, s in seqs]
    cache, table, clens = misa.build_paged_kcache(seqs, extra_pages=extra_pages, generator=g)
    return seqs, cache, table, clens, g


def _page_sums64(cache, table, clens):
    """float64 ``(sums, abs sums, tokens)`` per page ``[num_pages, D]``, from ``read_paged_kcache``."""
    d = misa.quant.paged_head_dim(cache)
    sums = torch.zeros(cache.shape[0], d, dtype=torch.float64)
    abss = torch.zeros_like(sums)
    count = torch.zeros(cache.shape[0], dtype=torch.long)
    for b, n in enumerate(clens.tolist()):
        k, s = misa.read_paged_kcache(cache, table[b], n)
        x = k.double().cpu() * s.double().cpu()[:, None]         # exact: fp8 * float32 in float64
        for j in range(-(-n // PAGE)):
            p = int(table[b, j])
            sums[p] = x[j * PAGE:(j + 1) * PAGE].sum(0)
            abss[p] = x[j * PAGE:(j + 1) * PAGE].abs().sum(0)
            count[p] = min(PAGE, n - j * PAGE)
    return sums, abss, count


# unit roundoff of the rounding to the pooled dtype beyond the float32 sum (float32: none)
ROUNDING = {torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}


def _close(got, ref, abss, n, rounded=None):
    """``got`` within ``2 n u sum|x|`` of the float64 ``ref`` (elementwise), plus the rounding of page
    sums to the dtype ``rounded`` (default: ``got``'s own when narrower than float32), at most its
    unit roundoff times ``sum|x|`` (``abss``)."""
    unit = ROUNDING[rounded or got.dtype]
    err = (got.double().cpu() - ref).abs()
    tol = (unit + 2 * n * U) * abss * (1 + unit) + 1e-30
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} values off, worst {float((err - tol).max()):.3g} past the bound"


def _used(table, clens, num_pages):
    used = torch.zeros(num_pages, dtype=torch.bool)
    for b, n in enumerate(clens.tolist()):
        used[table[b, : -(-n // PAGE)].long().cpu()] = True
    return used


# ---------------------------------------------------------------------------------------------
# pool_paged_kcache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (48, torch.bfloat16), (64, torch.float32)])
def test_pool_paged_kcache_is_page_sums(backend, d, dtype):
    _, cache, table, clens, _ = _batch(LENS, d, seed=d)
    # a zero-length sequence whose row lists page ids: nothing of it is read
    table = torch.cat([table, table[:1]])
    clens = torch.cat([clens, clens.new_zeros(1)])
    pooled = misa.pool_paged_kcache(cache, table, clens, **({} if dtype == torch.bfloat16 else dict(dtype=dtype)))
    assert pooled.dtype == dtype and pooled.shape == (cache.shape[0], d)
    sums, abss, _ = _page_sums64(cache, table, clens)
    used = _used(table, clens, cache.shape[0])
    assert (~used).sum() == 3                               # the extra pages
    assert torch.equal(pooled.cpu()[~used], torch.zeros(3, d))
    _close(pooled[used.to(pooled.device)], sums[used], abss[used], PAGE)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_pool_paged_kcache_shared_full_pages(backend):
    # prefix caching: two sequences list the same full pages (and go on into pages of their own)
    seqs, cache, table, clens, _ = _batch((130, 200), 32, seed=5, extra_pages=0)
    table = torch.cat([table, table[1:]])
    table[2, 2:] = table[0, 2]          # sequence 2: sequence 1's first two pages, then sequence 0's third
    clens = torch.stack([clens[0], clens[1], clens.new_tensor(128 + 2)])
    pooled = misa.pool_paged_kcache(cache, table, clens)
    sums, abss, _ = _page_sums64(cache, table[:2], clens[:2])
    _close(pooled, sums, abss, PAGE)


# ---------------------------------------------------------------------------------------------
# write_paged_kcache(pooled=...)
# ---------------------------------------------------------------------------------------------

def _slots(table, b, positions):
    positions = torch.as_tensor(positions, device=table.device)
    return table[b, positions // PAGE].long() * PAGE + positions % PAGE


def _fresh(cache, g, dtype=torch.bfloat16):
    """A cache of garbage and a pooled cache of garbage, as a long-running engine has them."""
    c = torch.empty_like(cache).random_(0, 256, generator=None)
    pooled = misa.new_pooled_kcache(cache.shape[0], misa.quant.paged_head_dim(cache), device=cache.device,
                                    dtype=dtype)
    pooled.copy_(torch.randn(pooled.shape, generator=g).to(pooled.device) * 100)
    return c, pooled


def _check_written(cache, pooled, before, table, clens):
    """The pooled rows of used pages equal pool_paged_kcache's (and the float64 sums); the others
    are as they were."""
    sums, abss, _ = _page_sums64(cache, table, clens)
    used = _used(table, clens, cache.shape[0]).to(pooled.device)
    _close(pooled[used], sums[used.cpu()], abss[used.cpu()], PAGE)
    for backend in ("reference", "triton") if kernels_available() else ("reference",):
        rebuilt = misa.pool_paged_kcache(cache, table, clens, dtype=pooled.dtype, backend=backend)
        # both rounded from float32 sums taken in their own orders
        _close(pooled[used], rebuilt[used].double().cpu(), 2 * abss[used.cpu()], 2 * PAGE)
    assert torch.equal(pooled[~used], before[~used])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode,dtype", [("decode", torch.bfloat16), ("prefill-chunks", torch.bfloat16),
                                        ("one-shuffled-batch", torch.bfloat16), ("prefill-chunks", torch.float32)])
def test_write_keeps_pooled_current(backend, mode, dtype):
    # the write goes through the kernel (the interpreter on the CPU) or the reference, as
    # MISA_BACKEND says
    lens = LENS if mode != "decode" else LENS[:4]
    seqs, ref_cache, table, clens, g = _batch(lens, 64, seed=11)
    cache, pooled = _fresh(ref_cache, g, dtype)
    before = pooled.clone()
    if mode == "decode":        # one step: the next token of every live sequence, one call
        for t in range(max(lens)):
            live = [b for b, n in enumerate(lens) if t < n]
            slots = torch.cat([_slots(table, b, [t]) for b in live])
            k = torch.cat([seqs[b][0][t:t + 1] for b in live])
            s = torch.cat([seqs[b][1][t:t + 1] for b in live])
            misa.write_paged_kcache(cache, slots, k, s, pooled)
    elif mode == "prefill-chunks":     # chunks of ragged sizes crossing pages, tokens shuffled inside
        for b, (k, s) in enumerate(seqs):
            start = 0
            while start < k.shape[0]:
                end = min(k.shape[0], start + int(torch.randint(1, 150, (1,), generator=g)))
                perm = torch.randperm(end - start, generator=g).to(DEVICE) + start
                misa.write_paged_kcache(cache, _slots(table, b, perm), k[perm], s[perm], pooled)
                start = end
    else:
        slots = torch.cat([_slots(table, b, torch.arange(len(k))) for b, (k, _) in enumerate(seqs)])
        k = torch.cat([k for k, _ in seqs])
        s = torch.cat([s for _, s in seqs])
        perm = torch.randperm(len(slots), generator=g).to(DEVICE)
        misa.write_paged_kcache(cache, slots[perm], k[perm], s[perm], pooled)
    _check_written(cache, pooled, before, table, clens)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_write_reused_page_holds_only_new_tokens(backend):
    seqs, ref_cache, table, clens, g = _batch(LENS, 64, seed=12)
    cache, pooled = _fresh(ref_cache, g)
    before = pooled.clone()
    for b, (k, s) in enumerate(seqs):
        misa.write_paged_kcache(cache, _slots(table, b, torch.arange(len(k))), k, s, pooled)
    # sequence 3 (301 tokens, 5 pages) ends; a new sequence of 140 tokens takes its first 3 pages,
    # written in three calls (a prefill, a speculative step of two draft tokens, both rejected, then
    # the real token 139 over the first draft), leaving stale tokens behind in the cache
    k_new, s_new = misa.quantize_keys(torch.randn(142, 64, generator=g) * 3)
    k_new, s_new = k_new.to(DEVICE), s_new.to(DEVICE)
    table2 = table.clone()
    table2[3, 3:] = 0
    misa.write_paged_kcache(cache, _slots(table2, 3, torch.arange(139)), k_new[:139], s_new[:139], pooled)
    misa.write_paged_kcache(cache, _slots(table2, 3, [139, 140]), k_new[140:], s_new[140:], pooled)
    misa.write_paged_kcache(cache, _slots(table2, 3, [139]), k_new[139:140], s_new[139:140], pooled)
    k_new, s_new = k_new[:140], s_new[:140]
    clens2 = clens.clone()
    clens2[3] = 140
    # the freed pages 3 and 4 of sequence 3 keep their old sums (no one restarted them)
    freed = table[3, 3:5].long()
    old, old_abs, _ = _page_sums64(ref_cache, table, clens)
    _close(pooled[freed], old[freed.cpu()], old_abs[freed.cpu()], PAGE)
    before[freed] = pooled[freed]
    _check_written(cache, pooled, before, table2, clens2)
    # against the new tokens directly
    x = misa.dequantize_keys(k_new, s_new).double().cpu()
    for j, n in enumerate((64, 64, 12)):
        want = x[64 * j: 64 * j + n].sum(0)
        _close(pooled[int(table2[3, j])], want, x[64 * j: 64 * j + n].abs().sum(0), PAGE)


def test_write_checks_pooled_before_writing():
    _, cache, table, clens, g = _batch((100,), 32, seed=3)
    k, s = misa.quantize_keys(torch.randn(2, 32, generator=g))
    k, s = k.to(DEVICE), s.to(DEVICE)
    slots = torch.tensor([0, 65], device=DEVICE)
    snapshot = cache.clone()
    p = cache.shape[0]
    bad = [torch.zeros(p, 32, dtype=torch.float64, device=DEVICE),        # dtype
           torch.zeros(p + 1, 32, device=DEVICE),                         # a row per page
           torch.zeros(p, 33, device=DEVICE),                             # head dim
           torch.zeros(p, 32, device="meta"),                             # device
           [[0.0] * 32] * p]                                              # not a tensor
    for pooled in bad:
        with pytest.raises(ValueError, match="^pooled"):
            misa.write_paged_kcache(cache, slots, k, s, pooled)
    assert torch.equal(cache, snapshot)
    # the existing checks are unchanged, and come first for their own arguments
    with pytest.raises(ValueError, match="^slot_mapping"):
        misa.write_paged_kcache(cache, torch.tensor([0, p * PAGE], device=DEVICE), k, s,
                                misa.new_pooled_kcache(p, 32, DEVICE))
    with pytest.raises(ValueError, match="^k_scale"):
        misa.write_paged_kcache(cache, slots, k, s.double(), misa.new_pooled_kcache(p, 32, DEVICE))
    assert torch.equal(cache, snapshot)
    # no pooled: as before; an empty write leaves pooled alone
    pooled = misa.new_pooled_kcache(p, 32, DEVICE)
    misa.write_paged_kcache(cache, slots[:0], k[:0], s[:0], pooled)
    assert not pooled.any()


# ---------------------------------------------------------------------------------------------
# pool_blocks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("block_size", [64, 128, 1024])
def test_pool_blocks_matches_paged_pool_keys(backend, block_size):
    pytest.importorskip("triton")
    from misa.ops.router.triton import paged_pool_keys
    _, cache, table, clens, _ = _batch(LENS, 64, seed=block_size)
    table = torch.cat([table, table[:1]])                   # and an empty sequence
    clens = torch.cat([clens, clens.new_zeros(1)])
    pooled = misa.pool_paged_kcache(cache, table, clens)
    max_blocks = -(-max(LENS) // block_size) + 1            # one block past the longest sequence
    kbar = pool_blocks(pooled, table, clens, block_size, max_blocks)
    assert kbar.shape == (len(clens), max_blocks, 64) and kbar.dtype == torch.float32
    # the router kernel, from the raw cache (always the kernel: the interpreter on the CPU)
    raw = paged_pool_keys(cache, clens, table, block_size, max_blocks)
    # float64 truth, the bound of a sum of block_size products (the page sums, then the pages)
    want = torch.zeros(len(clens), max_blocks, 64, dtype=torch.float64)
    abss = torch.zeros_like(want)
    for b, n in enumerate(clens.tolist()):
        k, s = misa.read_paged_kcache(cache, table[b], n)
        x = k.double().cpu() * s.double().cpu()[:, None]
        for j in range(-(-n // block_size)):
            blk = x[j * block_size:(j + 1) * block_size]
            want[b, j], abss[b, j] = blk.mean(0), blk.abs().sum(0) / len(blk)
    assert not kbar.cpu()[want.abs().sum(-1) == 0].any()    # blocks past each sequence: 0
    _close(kbar, want, abss, block_size + PAGE, rounded=pooled.dtype)
    _close(raw, want, abss, block_size)
    _close(kbar, raw.double().cpu(), 2 * abss, block_size + PAGE, rounded=pooled.dtype)
    # from a float32 pooled cache: the float32 bound alone
    exact = pool_blocks(misa.pool_paged_kcache(cache, table, clens, dtype=torch.float32), table, clens, block_size,
                        max_blocks)
    _close(exact, want, abss, block_size + PAGE)

    # fewer blocks than the longest sequence needs: cut there, as paged_pool_keys does
    cut = pool_blocks(pooled, table, clens, block_size, 2)
    _close(cut, want[:, :2], abss[:, :2], block_size + PAGE, rounded=pooled.dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_pool_blocks_odd_head_dim(backend):
    _, cache, table, clens, _ = _batch(LENS, 48, seed=4)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    got = pool_blocks(pooled, table, clens, 128, 9)
    ref = pool_ref.pool_blocks(pooled, table, clens, 128, 9)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_pool_blocks_block_size_must_be_whole_pages(backend):
    _, cache, table, clens, _ = _batch((100,), 32, seed=6)
    pooled = misa.pool_paged_kcache(cache, table, clens)
    for bs in (48, 96, 0, 32, 64.0):
        with pytest.raises(ValueError, match="^block_size"):
            pool_blocks(pooled, table, clens, bs, 4)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_inputs_name_the_argument(backend):
    _, cache, table, clens, _ = _batch((37, 150), 32, seed=7)
    p = cache.shape[0]
    pooled = misa.new_pooled_kcache(p, 32, DEVICE)
    far = table.clone()
    far[1, 2] = p                                   # a used column pointing past the cache
    neg = table.clone()
    neg[0, 0] = -1
    unused_far = table.clone()
    unused_far[0, 2] = p + 100                      # past sequence 0's pages: never read, allowed
    pool_cases = [
        (dict(kv_cache=cache.view(torch.int8)), "kv_cache"),
        (dict(kv_cache=cache[:, :32]), "kv_cache"),
        (dict(block_table=table.long()), "block_table"),
        (dict(block_table=table[0]), "block_table"),
        (dict(block_table=far), "block_table"),
        (dict(block_table=neg), "block_table"),
        (dict(block_table=table[:, :2]), "block_table"),          # too few columns for 150 tokens
        (dict(context_lens=clens.long()), "context_lens"),
        (dict(context_lens=clens[:1]), "context_lens"),
        (dict(context_lens=torch.tensor([37, -1], dtype=torch.int32, device=DEVICE)), "context_lens"),
        (dict(backend="cuda"), "backend"),
    ]
    base = dict(kv_cache=cache, block_table=table, context_lens=clens)
    for change, name in pool_cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            misa.pool_paged_kcache(**{**base, **change})
    misa.pool_paged_kcache(cache, unused_far, clens)

    blocks_base = dict(pooled=pooled, block_table=table, context_lens=clens, block_size=64, max_blocks=3)
    block_cases = [
        (dict(pooled=pooled.double()), "pooled"),
        (dict(pooled=pooled[None]), "pooled"),
        (dict(pooled=pooled[:2]), "block_table"),                 # page ids past the pooled rows
        (dict(block_table=far), "block_table"),
        (dict(block_table=table.long()), "block_table"),
        (dict(context_lens=clens[:1]), "context_lens"),
        (dict(context_lens=clens.float()), "context_lens"),
        (dict(max_blocks=-1), "max_blocks"),
        (dict(max_blocks=2.0), "max_blocks"),
        (dict(block_size=100), "block_size"),
        (dict(backend="gpu"), "backend"),
    ]
    for change, name in block_cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            pool_blocks(**{**blocks_base, **change})
    # the table only needs the pages of the blocks read: 2 blocks of 64 tokens read 2 columns
    assert pool_blocks(pooled, table[:, :2], clens, 64, 2).shape == (2, 2, 32)
    assert pool_blocks(pooled, table, clens, 64, 0).shape == (2, 0, 32)
