"""The top-k with its compaction in the scoring (``misa.ops.dsa.triton.scored_topk``): the logits
kernel moves each row's candidates into the top-k's scratch, stores logits only for the blocks of
queries whose cut missed, and the selection is the top-k of the logits whatever the sample."""
import pytest
import torch

from helpers import BIG, DEVICE, EXACT_RTOL, as_sets, check_selection, dsa_logits64, make_inputs


def _run(inputs, k, heads, sample_kind, store, dtype=torch.float32):
    from misa.ops.dsa import triton as dsa_t
    from misa.ops.topk import triton as topk_t
    q, (k8, scale), w, ks, ke = inputs
    t, s = q.shape[0], k8.shape[0]
    width = s + (-s % 16)
    sample = dsa_t.cut_sample(q, w, k8, scale, 0, width, heads=heads, fused=True)
    assert sample is not None
    if sample_kind == "high":           # every cut above the row's maximum: fewer than k candidates
        sample[0].fill_(1e30)
    elif sample_kind == "low":          # every key a candidate: more than the scratch holds
        sample[0].fill_(-1e30)
    logits = torch.full((t, width), float("nan"), dtype=dtype, device=DEVICE)
    buffers = topk_t.TopkWorkspace(t, k, width, DEVICE).buffers(t, width)
    out = dsa_t.scored_topk(q, w, k8, scale, ks, ke, logits, k, heads=heads, sample=sample, buffers=buffers,
                            store=store)
    cap = buffers.scr_key.shape[1]
    missed = (buffers.cut_keys == 0) | (buffers.count < k) | (buffers.count > cap)
    return out, logits, missed.cpu()


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("kind", ["causal", "ragged"])
@pytest.mark.parametrize("sample_kind", ["computed", "high", "low"])
def test_scored_topk_selects_the_logits_top_k_and_stores_only_missed_blocks(monkeypatch, routed, kind,
                                                                            sample_kind):
    from misa.ops.dsa import triton as dsa_t
    from misa.ops.topk import triton as topk_t
    # a scratch of 5 k: a sample below every key overflows it on long rows (the general path over
    # stored rows)
    monkeypatch.setattr(topk_t, "scratch_size", lambda k, width: min(width, 5 * k))
    t, s, h, d, k = (300, 20000, 64, 128, 512) if BIG else (40, 1500, 16, 64, 100)
    inputs = make_inputs(t, s, h, d, kind, seed=3 + routed, device=DEVICE)
    q, kv, w, ks, ke = inputs
    g = torch.Generator().manual_seed(5)
    heads = torch.stack([torch.randperm(h, generator=g)[:4] for _ in range(t)]).int().to(DEVICE) if routed else None
    out, logits, missed = _run(inputs, k, heads, sample_kind, store=False)
    want = dsa_logits64(q, kv, w, ks, ke, heads=heads)
    check_selection(out, want, ks, ke, k, rtol=EXACT_RTOL)
    if not BIG and not routed:
        # the unfused pipeline picks the same keys (near-ties may go either way on the GPU; 4 routed
        # heads tie many keys at exactly 0, whose order the atomics set)
        plain = torch.full_like(logits, float("-inf"))
        dsa_t.launch_logits(q, w, kv[0], kv[1], ks, ke, plain, heads=heads)
        sample = dsa_t.cut_sample(q, w, kv[0], kv[1], 0, plain.shape[1], heads=heads, fused=True)
        assert as_sets(out) == as_sets(topk_t.topk(plain, ks, ke, k, sample=sample))
    # stored: exactly the blocks of queries holding a row whose cut missed, every visible column
    bq = max(1, dsa_t.ROUTED_CONFIG.pairs // 4) if routed else max(1, dsa_t.DEFAULT_CONFIG.pairs // h)
    block_missed = torch.tensor([bool(missed[i - i % bq:i - i % bq + bq].any()) for i in range(t)])
    got, ks_c, ke_c = logits.float().cpu(), ks.cpu(), ke.cpu()
    for r in range(t):
        row = got[r, ks_c[r]:ke_c[r]]
        if block_missed[r]:
            ref = want[r, ks_c[r]:ke_c[r]]
            tol = EXACT_RTOL * max(1.0, float(ref.abs().max())) if row.numel() else 0
            assert torch.allclose(row.double(), ref, rtol=0, atol=tol), r
        else:
            assert bool(row.isnan().all()), r
    if sample_kind == "computed":
        # long rows, cut well: nothing stored (ragged rows under two samples have no cut)
        assert kind == "ragged" or not bool(block_missed.any())
    elif sample_kind == "high":
        assert bool(missed.all())
    else:
        long_rows = (ke - ks).cpu() > 5 * k
        assert bool(long_rows.any()) and bool(missed[long_rows].all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scored_topk_storing_every_row_writes_the_logits_and_selects_the_same(dtype):
    from misa.ops.dsa import triton as dsa_t
    t, s, h, d, k = (256, 20000, 64, 128, 512) if BIG else (24, 1300, 16, 64, 90)
    inputs = make_inputs(t, s, h, d, "ragged", seed=11, device=DEVICE)
    q, kv, w, ks, ke = inputs
    moved, _, _ = _run(inputs, k, None, "computed", store=False, dtype=dtype)
    moved = moved.clone()
    stored, logits, _ = _run(inputs, k, None, "computed", store=True, dtype=dtype)
    plain = torch.full_like(logits, float("-inf"))
    dsa_t.launch_logits(q, w, kv[0], kv[1], ks, ke, plain)
    ks_c, ke_c = ks.cpu(), ke.cpu()
    for r in range(t):                  # every visible logit written, as the unfused kernel writes it
        assert torch.equal(logits[r, ks_c[r]:ke_c[r]].cpu(), plain[r, ks_c[r]:ke_c[r]].cpu()), r
    if dtype == torch.float32:
        check_selection(stored, dsa_logits64(q, kv, w, ks, ke), ks, ke, k, rtol=EXACT_RTOL)
    if not BIG:
        assert as_sets(stored) == as_sets(moved)


def test_scored_topk_needs_a_sample():
    from misa.ops.dsa import triton as dsa_t
    q, (k8, scale), w, ks, ke = make_inputs(4, 600, 16, 64, device=DEVICE)
    logits = torch.empty(4, 608, device=DEVICE)
    with pytest.raises(ValueError, match="sample"):
        dsa_t.scored_topk(q, w, k8, scale, ks, ke, logits, 50)
    with pytest.raises(ValueError, match="candidates"):
        dsa_t.launch_logits(q, w, k8, scale, ks, ke, logits, store=False)
