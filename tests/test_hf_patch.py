"""misa.patch_model on tiny random DeepSeek-V3.2 and GLM-5 (glm_moe_dsa) models from transformers."""
import contextlib
import types

import pytest
import torch

import misa
from misa.nn import PatchedIndexer
from misa.nn.ranges import visible_from_mask

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, index_topk=8,
            index_head_dim=32, index_n_heads=8, first_k_dense_replace=1, max_position_embeddings=256)
MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")


def tiny_model(model_type: str, attn: str = "eager", seed: int = 0, **config):
    if model_type == "deepseek_v32":
        cfg = transformers.DeepseekV32Config(**TINY, **config)
        cls = transformers.DeepseekV32ForCausalLM
    else:   # last layer "shared": it reuses the previous layer's selection (GLM-5's cross-layer sharing)
        cfg = transformers.GlmMoeDsaConfig(**TINY, index_topk_pattern="FFS", **config)
        cls = transformers.GlmMoeDsaForCausalLM
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        # With signed head weights many keys score exactly 0 (all their relus dead) and torch.topk
        # breaks those ties arbitrarily; positive weights leave a zero only where every head is
        # dead, so "the same tokens" is well defined and the comparison below can be exact.
        for layer in indexer_layers(model):
            layer.indexer.weights_proj.weight.abs_()
    return model


def indexer_layers(model):
    return [m for m in model.modules() if isinstance(getattr(m, "indexer", None), torch.nn.Module)]


@contextlib.contextmanager
def recording(model, with_original=False):
    """Record (visibility [B, S, T], selection [B, S, k], original's selection or None) per call."""
    calls, handles = [], []

    def hook(module, args, kwargs, out):
        mask = args[3] if len(args) > 3 else kwargs["attention_mask"]
        # the original indexer on the very same inputs (only without a cache: no double update)
        original = module.original(*args[:5]) if with_original else None
        calls.append((visible_from_mask(mask).expand(out.shape[0], out.shape[1], -1), out, original))

    for layer in indexer_layers(model):
        handles.append(layer.indexer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def visible_sets(visible, selection):
    """Per query, the selected positions it can see (slots beyond its range are masked padding)."""
    sel = selection.reshape(-1, selection.shape[-1]).long()
    vis = visible.reshape(-1, visible.shape[-1])
    return [set(r[v[r]].tolist()) for r, v in zip(sel, vis)]


def visible_only(visible, selection):
    sel = selection.reshape(-1, selection.shape[-1]).long()
    vis = visible.reshape(-1, visible.shape[-1])
    return torch.where(torch.gather(vis, 1, sel), sel, torch.full_like(sel, -1))


def prompt(batch=2, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :7] = 0                                    # left padding in the second sequence
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])       # additive float mask / boolean mask
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_all_heads_selects_the_same_tokens_and_logits(model_type, attn):
    model = tiny_model(model_type, attn)
    ids, mask = prompt()
    with recording(model) as before, torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    misa.patch_model(model, active_heads=TINY["index_n_heads"], block_size=16)
    with recording(model) as after, torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert len(after) == len(before) == len(indexer_layers(model))
    for (vis, sel_ref, _), (_, sel, _) in zip(before, after):
        assert sel.dtype == sel_ref.dtype and sel.shape == sel_ref.shape
        assert visible_sets(vis, sel) == visible_sets(vis, sel_ref)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_all_heads_generates_the_same_tokens(model_type):
    model = tiny_model(model_type, seed=2)
    ids, _ = prompt(batch=1, seed=3)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with recording(model) as before:
        ref = model.generate(ids, **gen)
    misa.patch_model(model, active_heads=TINY["index_n_heads"], block_size=16)
    with recording(model) as after:
        got = model.generate(ids, **gen)
    assert torch.equal(got, ref)
    assert len(after) == len(before) > len(indexer_layers(model))     # the decode steps ran too
    for (vis, sel_ref, _), (_, sel, _) in zip(before, after):
        assert visible_sets(vis, sel) == visible_sets(vis, sel_ref)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_few_heads_generate_and_recall_is_reported(model_type):
    model = tiny_model(model_type, seed=4)
    ids, mask = prompt(seed=5, length=60)
    h = TINY["index_n_heads"] // 4
    misa.patch_model(model, variant="misa", active_heads=h, block_size=16)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 65)
    with recording(model, with_original=True) as calls, torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    for layer, (vis, sel, ref) in enumerate(calls):
        picked, expected = visible_only(vis, sel), visible_only(vis, ref)
        rows = expected.ge(0).sum(1) < vis.reshape(-1, vis.shape[-1]).sum(1)   # a real choice was made
        recall = misa.recall(picked, expected)[rows].mean().item()
        chance = (expected.ge(0).sum(1) / vis.reshape(-1, vis.shape[-1]).sum(1))[rows].mean().item()
        print(f"{model_type} layer {layer}: MISA h={h}/{TINY['index_n_heads']} recall of the "
              f"unpatched selection {recall:.3f} (random selection: {chance:.3f})")
        assert chance < recall <= 1.0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_unpatch_restores_and_state_dict_is_untouched(model_type):
    model = tiny_model(model_type)
    originals = [layer.indexer for layer in indexer_layers(model)]
    keys = list(model.state_dict())
    ids, mask = prompt()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    assert misa.patch_model(model, active_heads=1, block_size=16) is model
    patched = [layer.indexer for layer in indexer_layers(model)]
    assert all(isinstance(p, PatchedIndexer) and p.wq_b is o.wq_b and p.weights_proj is o.weights_proj
               for p, o in zip(patched, originals))
    assert list(model.state_dict()) == keys
    misa.unpatch_model(model)
    assert [layer.indexer for layer in indexer_layers(model)] == originals
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_patch_reads_the_model_config_keys():
    model = tiny_model("deepseek_v32", use_misa=True, misa_topk_heads=2, misa_k_block_size=32,
                       misa_stage1_topk=16)
    misa.patch_model(model)
    cfg = indexer_layers(model)[0].indexer.misa_config
    assert (cfg.variant, cfg.active_heads, cfg.block_size, cfg.stage1_k) == ("misa-dagger", 2, 32, 16)
    misa.unpatch_model(model)
    misa.patch_model(model, misa.MisaConfig(active_heads=3), block_size=8)
    cfg = indexer_layers(model)[0].indexer.misa_config
    assert (cfg.variant, cfg.active_heads, cfg.block_size) == ("misa", 3, 8)


def fp8_dsa_and_all_heads_runs(model, ids, mask):
    """The recorded selections of the fp8 path patched as DSA, then as MISA with every head."""
    runs = []
    for options in (dict(variant="dsa"), dict(variant="misa", active_heads=8, block_size=16)):
        misa.patch_model(model, fp8=True, ue8m0=True, **options)
        with recording(model) as calls, torch.no_grad():
            model(ids, attention_mask=mask)
        runs.append(calls)
        misa.unpatch_model(model)
    return runs


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fp8_path_all_heads_is_fp8_dsa(model_type):
    model = tiny_model(model_type, seed=6)
    ids, mask = prompt(seed=7)
    runs = fp8_dsa_and_all_heads_runs(model, ids, mask)
    for (vis, a, _), (_, b, _) in zip(*runs):
        assert visible_sets(vis, a) == visible_sets(vis, b)


def test_patch_errors_name_the_argument():
    model = tiny_model("deepseek_v32")
    with pytest.raises(ValueError, match="^model:"):
        misa.patch_model(types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama")))
    with pytest.raises(ValueError, match="^model:"):
        misa.unpatch_model(model)
    with pytest.raises(ValueError, match="^active_heads:"):
        misa.patch_model(model, active_heads=TINY["index_n_heads"] + 1)
    with pytest.raises(ValueError, match="^stage1_k:"):
        misa.patch_model(model, variant="misa-dagger", stage1_k=TINY["index_topk"] - 1)
    with pytest.raises(ValueError, match="^active_head:"):
        misa.patch_model(model, active_head=2)
    with pytest.raises(ValueError, match="^config:"):
        misa.patch_model(model, {"variant": "misa"})
    misa.patch_model(model, active_heads=2)
    with pytest.raises(ValueError, match="^model:"):
        misa.patch_model(model, active_heads=2)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_per_layer_config_patches_each_layer_with_its_own_setting(model_type):
    model = tiny_model(model_type, seed=3)
    layers = [m.indexer.layer_idx for m in indexer_layers(model)]
    per_layer = {str(layers[0]): {"variant": "misa", "active_heads": 2, "block_size": 8, "router": "gap"}}
    cfg = misa.MisaConfig.from_json({"default": {"variant": "dsa"}, "layers": per_layer})
    misa.patch_model(model, config=cfg)
    got = {m.indexer.layer_idx: m.indexer.misa_config for m in indexer_layers(model)}
    assert (got[layers[0]].variant, got[layers[0]].active_heads, got[layers[0]].router) == ("misa", 2, "gap")
    assert all(got[i].variant == "dsa" for i in layers[1:])
    ids, mask = prompt(seed=4)
    with recording(model, with_original=True) as calls, torch.no_grad():
        model(ids, attention_mask=mask)
    # the DSA layers select exactly what the unpatched indexer selects; the MISA layer (2 of 8 heads) does not
    same = [visible_sets(v, s) == visible_sets(v, o) for v, s, o in calls]
    assert same[0] is False and all(same[1:])
    misa.unpatch_model(model)
    bad = misa.MisaConfig.from_json({"layers": {str(layers[-1]): {"variant": "misa", "active_heads": 99}}})
    with pytest.raises(ValueError, match=rf"^layers\.{layers[-1]}\.active_heads"):
        misa.patch_model(model, config=bad)


def test_calibrate_a_hf_model_records_dsa_traffic_and_returns_a_patchable_config():
    from misa.calibration import CostTable, candidate_settings
    model = tiny_model("deepseek_v32", seed=5)
    sets = candidate_settings(TINY["index_n_heads"], heads=(2, 4), dagger_heads=(2,), dagger_multiples=(2,),
                              hisa_multiples=(2,))
    costs = CostTable({s.name: (8.0 if s.variant == "dsa" else 1.0 + i * 0.1) for i, s in enumerate(sets)})
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(2, TINY["vocab_size"], (60,), generator=g) for _ in range(2)]
    cal = misa.calibrate(model, texts, target=0.9, queries=12, settings=sets, cost_table=costs,
                         router_block_size=8, hisa_block_size=4)
    layers = sorted(m.indexer.layer_idx for m in indexer_layers(model))
    assert sorted(cal.table) == layers
    for row in cal.table.values():
        assert row["settings"]["dsa"]["recall"] == 1.0            # DSA against itself on the recorded traffic
        assert row["settings"][row["chosen"]]["recall"] >= 0.9
    assert not any(isinstance(m.indexer, PatchedIndexer) for m in indexer_layers(model))   # unpatched after
    misa.patch_model(model, config=cal.config)
    assert [m.indexer.misa_config for m in indexer_layers(model)] == [cal.config.for_layer(i) for i in layers]
    misa.unpatch_model(model)
    with pytest.raises(ValueError, match="metric"):
        misa.calibrate(model, texts, metric="mass", cost_table=costs)
    with pytest.raises(ValueError, match="tokenizer"):
        misa.calibrate(model, ["some text"], cost_table=costs)
