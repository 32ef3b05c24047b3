import re

import pytest
import torch

import misa
from helpers import FP8, make_inputs


@pytest.fixture
def good():
    return make_inputs(6, 40, 4, 16, "causal", seed=0)


def _call(fn, q, kv, w, ks, ke, **kw):
    return fn(q, kv, w, ks, ke, **kw)


SELECTORS = [misa.dsa_logits, misa.dsa_select, misa.route_heads, misa.misa_select, misa.hisa_select]


@pytest.mark.parametrize("fn", SELECTORS)
def test_good_inputs_pass(fn, good):
    kw = {"active_heads": 2} if fn in (misa.route_heads, misa.misa_select) else {}
    if fn is misa.misa_select or fn is misa.route_heads:
        kw["block_size"] = 8
    if fn is misa.hisa_select:
        kw.update(k=16, block_size=8, block_k=2)
    fn(*good, **kw)


def test_hisa_budget_below_k_is_refused(good):
    # SPEC: block_k * block_size >= k, or a row could come back with fewer than min(k, ke - ks)
    # positions; every HISA entry point refuses it
    with pytest.raises(ValueError, match=r"^block_k: block_k \* block_size \(2 \* 8 = 16\) must be >= k \(17\)"):
        misa.hisa_select(*good, k=17, block_size=8, block_k=2)
    misa.hisa_select(*good, k=16, block_size=8, block_k=2)
    q, kv, w, ks, ke = good
    cache, table, lens = misa.build_paged_kcache([kv])
    paged = (q[None, -1:].contiguous(), cache, w[-1:], lens, table)
    with pytest.raises(ValueError, match="^block_k:"):
        misa.paged_hisa_select(*paged, k=17, block_size=8, block_k=2)
    misa.paged_hisa_select(*paged, k=16, block_size=8, block_k=2)
    with pytest.raises(ValueError, match="^hisa_block_k:"):
        misa.MisaConfig(variant="hisa", hisa_block_size=8, hisa_block_k=2).check_indexer(8, 17)


def _bad_cases(good):
    q, kv, w, ks, ke = good
    k_fp8, k_scale = kv
    nan_w = w.clone()
    nan_w[0, 0] = float("nan")
    nan_q = q.view(torch.uint8).clone()
    nan_q[0, 0, 0] = 0x7F
    return [
        ("q", (q.float()[:, 0], kv, w, ks, ke)),                       # wrong ndim
        ("q", (q.float().half(), kv, w, ks, ke)),                      # float16 is not a q dtype
        ("q", (nan_q.view(FP8), kv, w, ks, ke)),                       # NaN fp8
        ("kv", (q, (k_fp8,), w, ks, ke)),                              # tuple of one
        ("kv[0]", (q, (k_fp8.float(), k_scale), w, ks, ke)),          # k not fp8 in tuple
        ("kv[1]", (q, (k_fp8, k_scale[:-1]), w, ks, ke)),             # scale shape
        ("kv[1]", (q, (k_fp8, -k_scale), w, ks, ke)),                 # negative scale
        ("kv[0]", (q, (k_fp8[:, :8], k_scale), w, ks, ke)),           # head dim mismatch
        ("kv", (q, k_fp8.float().half(), w, ks, ke)),                 # float16 keys
        ("weights", (q, kv, w.double(), ks, ke)),
        ("weights", (q, kv, w[:, :2], ks, ke)),
        ("weights", (q, kv, nan_w, ks, ke)),
        ("ks", (q, kv, w, ks.long(), ke)),
        ("ks", (q, kv, w, ks[:-1], ke)),
        ("ks", (q, kv, w, ks - 1, ke)),
        ("ks", (q, kv, w, ke + 1, ke)),                                # ks > ke
        ("ke", (q, kv, w, ks, ke + 1)),                                # ke > S
    ]


@pytest.mark.parametrize("fn", SELECTORS)
def test_bad_inputs_name_the_argument(fn, good):
    for name, args in _bad_cases(good):
        with pytest.raises(ValueError, match="^" + re.escape(name)):
            fn(*args)


def test_bad_scalars(good):
    with pytest.raises(ValueError, match="^k:"):
        misa.dsa_select(*good, k=0)
    with pytest.raises(ValueError, match="^k:"):
        misa.dsa_select(*good, k=2.5)
    with pytest.raises(ValueError, match="^active_heads:"):
        misa.misa_select(*good, active_heads=5)
    with pytest.raises(ValueError, match="^active_heads:"):
        misa.route_heads(*good, active_heads=0)
    with pytest.raises(ValueError, match="^block_size:"):
        misa.misa_select(*good, active_heads=2, block_size=0)
    with pytest.raises(ValueError, match="^stage1_k:"):
        misa.misa_select(*good, k=10, active_heads=2, stage1_k=5)
    with pytest.raises(ValueError, match="^block_k:"):
        misa.hisa_select(*good, block_k=1)
    with pytest.raises(ValueError, match="^router:"):
        misa.misa_select(*good, active_heads=2, router="median")
    with pytest.raises(ValueError, match="^workspace_bytes:"):
        misa.dsa_select(*good, k=4, workspace_bytes=0)


def test_topk_bad_inputs(good):
    _, _, _, ks, ke = good
    x = torch.randn(6, 40)
    with pytest.raises(ValueError, match="^logits:"):
        misa.topk_indices(x.double(), ks, ke, 3)
    with pytest.raises(ValueError, match="^k:"):
        misa.topk_indices(x, ks, ke, 0)
    with pytest.raises(ValueError, match="^ke:"):
        misa.topk_indices(x[:, :10], ks, ke, 3)
    y = x.clone()
    y[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^logits:"):
        misa.topk_indices(y, ks, ke, 3)


def test_paged_bad_inputs():
    g = torch.Generator().manual_seed(0)
    seqs = [misa.quantize_keys(torch.randn(n, 16, generator=g)) for n in (10, 100)]
    cache, table, lens = misa.build_paged_kcache(seqs, generator=g)
    q, w = misa.quantize_queries(torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, generator=g))
    q = q[:, None]
    misa.paged_dsa_select(q, cache, w, lens, table, k=4)
    with pytest.raises(ValueError, match="^q:"):
        misa.paged_dsa_select(q[:, 0], cache, w, lens, table, k=4)
    wide = torch.cat([cache, cache], 3)
    for bad in (cache.view(-1, 64, 1, 10), cache.float(), cache.view(-1, 64, 1, 2), wide[..., :cache.shape[3]]):
        with pytest.raises(ValueError, match="^kv_cache:"):      # D mismatch, dtype, page < D + 4, strides
            misa.paged_dsa_select(q, bad, w, lens, table, k=4)
    with pytest.raises(ValueError, match="^weights:"):
        misa.paged_dsa_select(q, cache, w[:1], lens, table, k=4)
    with pytest.raises(ValueError, match="^context_lens:"):
        misa.paged_dsa_select(q, cache, w, lens.long(), table, k=4)
    with pytest.raises(ValueError, match="^block_table:"):
        misa.paged_dsa_select(q, cache, w, lens, table[:, :1], k=4)
    with pytest.raises(ValueError, match="^block_table:"):
        misa.paged_dsa_select(q, cache, w, lens, table + 1000, k=4)


def test_value_checks_are_read_back_together_and_the_first_failure_wins(good):
    from misa.select import query_chunks
    from misa.validate import check_inputs
    q, kv, w, ks, ke = good
    inp = check_inputs(q, kv, w, ks, ke)
    assert inp.extent == (int(ks.min()), int(ke.max()))
    # one chunk: the key window comes from the values read back with the checks, not a new read
    fake = type(inp)(*(inp.q, inp.k, inp.k_scale, inp.weights, inp.ks, inp.ke), extent=(3, 7))
    assert list(query_chunks(fake, 4, 1 << 40)) == [(0, q.shape[0], 3, 7)]
    assert list(query_chunks(inp, 4, 1 << 40)) == [(0, q.shape[0], int(ks.min()), int(ke.max()))]
    # several bad values: the error is the first check in argument order (q before weights before ks)
    w_bad = w.clone()
    w_bad[0, 0] = float("nan")
    ks_bad = ks.clone()
    ks_bad[0] = -1
    with pytest.raises(ValueError, match="^weights:"):
        check_inputs(q, kv, w_bad, ks_bad, ke)
    with pytest.raises(ValueError, match="^ks:"):
        check_inputs(q, kv, w, ks_bad, ke)


@pytest.mark.parametrize("case", ["good", "q", "k", "k_scale", "weights", "ks_negative", "ks_after_ke",
                                  "ke_past_keys", "bf16_keys_inf"])
def test_check_kernel_flags_like_the_reference(case):
    # the one-launch value checks (Triton; the interpreter without CUDA) flag exactly what the
    # PyTorch reference flags, and read back the same extent; inputs larger than one block
    pytest.importorskip("triton")
    from misa.ops.checks import FLAGS, input_flags
    from misa.ops.checks import triton as checks_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kv_kind = "bf16" if case == "bf16_keys_inf" else "fp8"
    q, kv, w, ks, ke = make_inputs(70, 300, 8, 128, "ragged", seed=4, kv=kv_kind, device=dev)
    k, k_scale = kv if isinstance(kv, tuple) else (kv, None)
    q, k, w, ks, ke = q.clone(), k.clone(), w.clone(), ks.clone(), ke.clone()
    if case == "q":
        q.view(torch.uint8)[61, 5, 100] = 0xFF                 # fp8 NaN, far into q
    elif case == "k":
        k.view(torch.uint8)[299, 127] = 0x7F
    elif case == "k_scale":
        k_scale = k_scale.clone()
        k_scale[150] = 0.0
    elif case == "weights":
        w[69, 7] = float("inf")
    elif case == "ks_negative":
        ks[3] = -1
    elif case == "ks_after_ke":
        ks[40] = ke[40] + 1
    elif case == "ke_past_keys":
        ke[69] = 301
    elif case == "bf16_keys_inf":
        k[17, 3] = float("-inf")
    ref = input_flags(q, k, k_scale, w, ks, ke, k.shape[0]).tolist()
    got = checks_triton.input_flags(q, k, k_scale, w, ks, ke, k.shape[0]).tolist()
    assert got == ref
    expected = {"bf16_keys_inf": "k"}.get(case, case)
    assert [name for name, bad in zip(FLAGS, ref) if bad] == ([] if case == "good" else [expected])
    assert ref[-2:] == [int(ks.min()), int(ke.max())]


@pytest.mark.parametrize("byte", [0, 1, 2, 3, 5])
def test_check_kernel_finds_fp8_nan_at_every_byte_of_a_word(byte):
    # fp8 inputs are scanned four bytes to a word: a NaN in any byte of a word is found (byte 5: a
    # q of an odd byte count, scanned byte by byte)
    pytest.importorskip("triton")
    from misa.ops.checks import FLAGS
    from misa.ops.checks import triton as checks_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = 33 if byte == 5 else 40
    q, kv, w, ks, ke = make_inputs(t, 5000, 3 if byte == 5 else 4, 15 if byte == 5 else 16, "ragged", seed=byte,
                                   device=dev)
    k, k_scale = kv
    for x, name in ((q, "q"), (k, "k")):
        x = x.clone()
        flat = x.view(torch.uint8).reshape(-1)
        flat[(flat.numel() // 8) * 4 + byte % 4] = 0xFF if byte % 2 else 0x7F
        args = (x, k, k_scale, w, ks, ke) if name == "q" else (q, x, k_scale, w, ks, ke)
        flags = checks_triton.input_flags(*args, k.shape[0]).tolist()
        assert [n for n, bad in zip(FLAGS, flags) if bad] == [name]


@pytest.mark.parametrize("case", ["good", "q", "weights", "context_lens_short", "block_table_narrow",
                                  "page_outside_cache", "unused_column"])
def test_paged_check_kernel_flags_like_the_reference(case):
    pytest.importorskip("triton")
    from misa.ops.checks import PAGED_FLAGS, paged_flags
    from misa.ops.checks import triton as checks_triton
    g = torch.Generator().manual_seed(1)
    seqs = [misa.quantize_keys(torch.randn(n, 16, generator=g)) for n in (10, 300, 64)]
    cache, table, lens = misa.build_paged_kcache(seqs, extra_pages=2, generator=g)
    q, w = misa.quantize_queries(torch.randn(6, 4, 16, generator=g), torch.randn(6, 4, generator=g))
    q = q.view(3, 2, 4, 16)
    table = torch.nn.functional.pad(table, (0, 2))
    if case == "q":
        q.view(torch.uint8)[2, 1, 3, 15] = 0x7F
    elif case == "weights":
        w[5, 0] = float("nan")
    elif case == "context_lens_short":
        lens[0] = 1
    elif case == "block_table_narrow":
        table = table[:, :4]
    elif case == "page_outside_cache":
        table[1, 4] = cache.shape[0]
    elif case == "unused_column":
        table[0, 3] = -5                 # past sequence 0's one page: never read, so not an error
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = (q.to(dev), w.to(dev), lens.to(dev), table.to(dev), cache.shape[0], 64)
    ref = paged_flags(*args).tolist()
    assert checks_triton.paged_flags(*args).tolist() == ref
    assert [n for n, bad in zip(PAGED_FLAGS, ref) if bad] == ([] if case in ("good", "unused_column") else [case])
    assert ref[-1] == int(lens.max())


def test_paged_check_kernel_sanitizes_like_the_reference():
    """``sanitize=True`` (the checked decode functions' CUDA graphs check and select in one replay):
    the flags are those of the inputs as given; then lengths are clamped into what the table can
    hold and page ids outside the cache in the columns those lengths use become 0, in place, so the
    selection reads only the cache. Valid entries and unused columns are left as they were."""
    pytest.importorskip("triton")
    from misa.ops.checks import paged_flags
    from misa.ops.checks import triton as checks_triton
    g = torch.Generator().manual_seed(7)
    num_pages, cols, n = 80, 9, 2
    lens = torch.randint(2, cols * 64 + 1, (6,), generator=g).int()
    lens[0], lens[1], lens[2] = 1, cols * 64 + 130, 0          # too short, longer than the table, empty
    table = torch.randperm(num_pages, generator=g)[: 6 * cols].view(6, cols).int()
    table[3, 0], table[4, (int(lens[4]) - 1) // 64] = -3, num_pages + 5       # used columns, outside the cache
    table[5, cols - 1] = -9 if int(lens[5]) <= (cols - 1) * 64 else table[5, cols - 1]     # unused: kept
    q = misa.quantize_queries(torch.randn(12, 4, 16, generator=g), torch.randn(12, 4, generator=g))[0]
    q, w = q.view(6, n, 4, 16), torch.randn(12, 4, generator=g)
    w[7, 1] = float("inf")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    want_flags = paged_flags(q, w, lens, table, num_pages, 64).tolist()
    got = {}
    for name, fn in (("reference", paged_flags), ("kernel", checks_triton.paged_flags)):
        l2, t2 = lens.clone().to(dev), table.clone().to(dev)
        out = torch.full((len(want_flags),), 99, dtype=torch.int64, device=dev)      # reused: stale values
        flags = fn(q.to(dev), w.to(dev), l2, t2, num_pages, 64, out=out, sanitize=True)
        assert flags.data_ptr() == out.data_ptr() and flags.tolist() == want_flags, name
        got[name] = (l2.cpu(), t2.cpu())
    assert torch.equal(got["kernel"][0], got["reference"][0]) and torch.equal(got["kernel"][1], got["reference"][1])
    l2, t2 = got["kernel"]
    assert torch.equal(l2, lens.clamp(n, cols * 64))
    used = torch.arange(cols)[None, :] < ((l2.long() + 63) // 64)[:, None]
    assert ((t2 >= 0) & (t2 < num_pages))[used].all()
    outside = (table < 0) | (table >= num_pages)
    assert torch.equal(t2[~(used & outside)], table[~(used & outside)])
    assert (t2[used & outside] == 0).all() and int((used & outside).sum()) >= 2
