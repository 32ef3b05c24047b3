"""The integration on CUDA: patched tiny HF models and the engine ops through the Triton kernels.

Skipped without CUDA. On the GPU the kernels score differently from HF's float32 matmul (bf16 MMA,
other summation order), so "the same tokens" becomes agreement up to near-ties: per layer, the
patched selection must recover at least ``AGREEMENT`` of the unpatched one. The MISA, MISA-dagger
and HISA selections the kernels make inside the patched models are checked by value, call by call,
against float64 formulas of their method on the very inputs each call got.
"""
import pytest
import torch

import misa
from misa import MisaConfig, engine
from misa.select import use_kernels
from misa.validate import logits_dtype_for
from helpers import (BF16_LOGITS_RTOL, EXACT_RTOL, ROUTER_RTOL, as_sets, check_dagger_selection, check_routing,
                     check_selection, dsa_logits64, keys64, router_scores64)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
transformers = pytest.importorskip("transformers")

from test_hf_patch import (MODEL_TYPES, TINY, fp8_dsa_and_all_heads_runs, indexer_layers,  # noqa: E402
                           prompt, recording, tiny_model, visible_only)

AGREEMENT = 0.99
CUDA = torch.device("cuda")


def cuda_model(model_type, seed=0):
    return tiny_model(model_type, "eager", seed).to(CUDA, torch.bfloat16)


def layer_recalls(before, after):
    out = []
    for (vis, ref, _), (_, sel, _) in zip(before, after):
        out.append(misa.recall(visible_only(vis, sel), visible_only(vis, ref)).mean().item())
    return out


def test_kernels_are_what_runs():
    assert use_kernels("auto", torch.zeros(1, device=CUDA), (torch.bfloat16,)), \
        "CUDA is present but misa's Triton kernels are not (is triton installed?)"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_all_heads_agrees_with_hf_on_cuda(model_type):
    model = cuda_model(model_type)
    ids, mask = (t.to(CUDA) for t in prompt())
    with recording(model) as before, torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    misa.patch_model(model, active_heads=TINY["index_n_heads"], block_size=16)
    with recording(model) as after, torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    recalls = layer_recalls(before, after)
    print(f"{model_type} cuda h=H recall per layer: {[round(r, 4) for r in recalls]}")
    assert min(recalls) >= AGREEMENT
    assert torch.isfinite(got).all() and got.shape == ref.shape


def check_misa_call(cfg: MisaConfig, q, kv, w, ks, ke, k: int, decode: bool, sel: torch.Tensor) -> None:
    """One MISA / MISA-dagger selection (``MisaConfig.select``'s inputs and output) by value: the routed
    heads are a top-h of the float64 router scores, and the picks the top-k of the float64 scores of
    those heads (MISA) or of all heads among the routed top-``stage1_k`` (MISA-dagger)."""
    h = cfg.heads(decode)
    heads = misa.route_heads(q, kv, w, ks, ke, active_heads=h, block_size=cfg.block_size, router=cfg.router)
    r = router_scores64(q, kv, w, ks, ke, cfg.block_size, cfg.router)
    check_routing(heads, r, ROUTER_RTOL * r.abs().amax(1).clamp_min(1e-12))
    routed = dsa_logits64(q, kv, w, ks, ke, heads=heads.cpu())
    if cfg.stage1_k is None:
        check_selection(sel, routed, ks, ke, k, rtol=EXACT_RTOL)
        return
    bf16 = logits_dtype_for(cfg.variant, cfg.torch_logits_dtype) == torch.bfloat16
    stage1_rtol = EXACT_RTOL + (BF16_LOGITS_RTOL if bf16 else 0.0)
    check_dagger_selection(sel, routed, dsa_logits64(q, kv, w, ks, ke), k, cfg.stage1_k, stage1_rtol)


def check_hisa_call(cfg: MisaConfig, q, kv, w, ks, ke, k: int, sel: torch.Tensor) -> None:
    """One HISA selection by value: its tokens lie in at most ``hisa_block_k`` blocks, those blocks
    (apart from the always-kept first and last visible) are a top-m by the float64 DSA formula on
    mean-pooled keys, and the tokens are the top-k of their candidate blocks by the float64 DSA score."""
    from misa.ops.blocks import kept_blocks
    bs, m = cfg.hisa_block_size, kept_blocks(k, cfg.hisa_block_size, cfg.hisa_block_k)
    full = dsa_logits64(q, kv, w, ks, ke)
    k64 = keys64(kv).cpu()
    nb = -(-k64.shape[0] // bs)
    kbar = torch.stack([k64[b * bs:(b + 1) * bs].mean(0) for b in range(nb)])
    blk = torch.einsum("th,thb->tb", w.double().cpu(), torch.einsum("thd,bd->thb", q.double().cpu(), kbar).clamp_min(0))
    ks_, ke_ = ks.cpu().long(), ke.cpu().long()
    for t, got in enumerate(as_sets(sel)):
        n = int(ke_[t] - ks_[t])
        assert all(ks_[t] <= p < ke_[t] for p in got), t
        if n == 0:
            assert not got, t
            continue
        first, last = int(ks_[t]) // bs, (int(ke_[t]) - 1) // bs
        blocks = {p // bs for p in got}
        assert len(blocks) <= m, t
        free = [b for b in range(first + 1, last)]                 # blocks not kept by rule
        slots = m - len({first, last})
        picked = blocks - {first, last}
        if picked:
            assert slots > 0 and len(picked) <= slots, t
            thr = sorted((float(blk[t, b]) for b in free), reverse=True)[slots - 1] if len(free) > slots else -1e300
            tol = EXACT_RTOL * max(1e-12, float(blk[t, first:last + 1].abs().max()))
            assert min(float(blk[t, b]) for b in picked) >= thr - tol, t
        cand = {p for b in blocks | {first, last} for p in range(b * bs, (b + 1) * bs) if ks_[t] <= p < ke_[t]}
        vals = full[t]
        if len(cand) > len(got):
            tol = EXACT_RTOL * float(vals[torch.isfinite(vals)].abs().max())
            assert min(vals[list(got)]) >= max(vals[list(cand - got)]) - tol, t
        if m >= last - first + 1:          # every block kept: exactly DSA, by value
            check_selection(sel[t:t + 1], full[t:t + 1], ks_[t:t + 1], ke_[t:t + 1], k, rtol=EXACT_RTOL)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("options", [dict(variant="misa", active_heads=2, block_size=16),
                                     dict(variant="misa-dagger", active_heads=2, block_size=16, stage1_k=16),
                                     dict(variant="hisa", hisa_block_size=8, hisa_block_k=3)])
def test_patched_generation_on_cuda(model_type, options, monkeypatch):
    model = cuda_model(model_type, seed=1)
    ids, mask = (t.to(CUDA) for t in prompt(length=60))
    misa.patch_model(model, **options)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 65) and out.device.type == "cuda"
    # every selection of one forward, with the exact inputs the kernels got
    selections = []
    select = MisaConfig.select

    def recorded(cfg, q, kv, weights, ks, ke, k, *, decode=False):
        sel = select(cfg, q, kv, weights, ks, ke, k, decode=decode)
        selections.append((cfg, q, kv, weights, ks, ke, k, decode, sel))
        return sel

    monkeypatch.setattr(MisaConfig, "select", recorded)
    with recording(model, with_original=True) as calls, torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    monkeypatch.undo()
    assert len(calls) == len(indexer_layers(model))
    assert len(selections) == 2 * len(calls)                   # one per layer and sequence
    for cfg, q, kv, w, ks, ke, k, decode, sel in selections:
        kv_dtype = kv[0].dtype if isinstance(kv, tuple) else kv.dtype
        assert sel.device.type == "cuda" and use_kernels(None, q, (q.dtype, kv_dtype)), "the kernel path is off"
        assert cfg.variant == options["variant"]
        if cfg.variant == "hisa":
            check_hisa_call(cfg, q, kv, w, ks, ke, k, sel)
        else:
            check_misa_call(cfg, q, kv, w, ks, ke, k, decode, sel)
    for vis, sel, ref in calls:
        rec = misa.recall(visible_only(vis, sel), visible_only(vis, ref)).mean().item()
        print(f"{model_type} cuda {options['variant']}: recall of the unpatched selection {rec:.3f}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fp8_path_on_cuda(model_type):
    model = cuda_model(model_type, seed=2)
    ids, mask = (t.to(CUDA) for t in prompt())
    runs = fp8_dsa_and_all_heads_runs(model, ids, mask)
    assert min(layer_recalls(*runs)) >= AGREEMENT


def test_engine_ops_cuda_match_cpu():
    from test_engine import decode_batch, packed_prefill
    cfg = MisaConfig(active_heads=2, block_size=32)
    q, kv, w, ks, ke = packed_prefill(seed=3)
    cpu = engine.prefill_select(q, kv, w, ks, ke, 16, cfg)
    gpu = engine.prefill_select(q.to(CUDA), tuple(t.to(CUDA) for t in kv), w.to(CUDA), ks.to(CUDA),
                                ke.to(CUDA), 16, cfg)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.int32
    assert misa.recall(gpu.cpu(), cpu).mean().item() >= AGREEMENT
    q, cache, w, ctx, table = decode_batch(seed=4)
    cpu = engine.decode_select(q, cache, w, ctx, table, 20, cfg)
    gpu = engine.decode_select(q.to(CUDA), cache.to(CUDA), w.to(CUDA), ctx.to(CUDA), table.to(CUDA), 20, cfg)
    assert misa.recall(gpu.cpu(), cpu).mean().item() >= AGREEMENT
