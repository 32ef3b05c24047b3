"""The integration on CUDA: patched tiny HF models and the engine ops through the Triton kernels.

Skipped without CUDA. On the GPU the kernels score differently from HF's float32 matmul (bf16 MMA,
other summation order), so "the same tokens" becomes agreement up to near-ties: per layer, the
patched selection must recover at least ``AGREEMENT`` of the unpatched one.
"""
import pytest
import torch

import misa
from misa import MisaConfig, engine
from misa.select import use_kernels

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


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("options", [dict(variant="misa", active_heads=2, block_size=16),
                                     dict(variant="misa-dagger", active_heads=2, block_size=16, stage1_k=16),
                                     dict(variant="hisa", hisa_block_size=8, hisa_block_k=3)])
def test_patched_generation_on_cuda(model_type, options):
    model = cuda_model(model_type, seed=1)
    ids, mask = (t.to(CUDA) for t in prompt(length=60))
    misa.patch_model(model, **options)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 65) and out.device.type == "cuda"
    with recording(model, with_original=True) as calls, torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    assert len(calls) == len(indexer_layers(model))
    for vis, sel, ref in calls:
        rec = misa.recall(visible_only(vis, sel), visible_only(vis, ref)).mean().item()
        print(f"{model_type} cuda {options['variant']}: recall of the unpatched selection {rec:.3f}")
        assert 0.0 < rec <= 1.0


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
