import pytest
import torch

import misa
from helpers import as_sets, make_inputs
from misa import MisaConfig


def test_defaults_are_the_papers_sizes_with_the_gap_router():
    cfg = MisaConfig()
    assert (cfg.variant, cfg.active_heads, cfg.block_size, cfg.stage1_k) == ("misa", 8, 1024, None)
    assert cfg.router == "gap"                  # the paper routes by abs-sum; docs/results.md says why not
    assert cfg.heads(decode=True) == 8


@pytest.mark.parametrize("raw, expected", [
    ({"use_misa": True, "misa_topk_heads": 4, "misa_k_block_size": 256},
     MisaConfig(variant="misa", active_heads=4, block_size=256)),
    ({"use_misa": True, "misa_topk_heads": 4, "misa_decode_topk_heads": 16, "misa_stage1_topk": 8192},
     MisaConfig(variant="misa-dagger", active_heads=4, decode_active_heads=16, stage1_k=8192)),
    ({"use_misa": True, "misa_stage1_topk": None}, MisaConfig(variant="misa")),
    ({"use_misa": False, "misa_topk_heads": 4}, MisaConfig(variant="dsa", active_heads=4)),
    ({"hidden_size": 7168}, MisaConfig(variant="dsa")),
])
def test_from_model_config_keys(raw, expected):
    assert MisaConfig.from_model_config(raw) == expected


def test_from_hf_config_object_and_overrides():
    transformers = pytest.importorskip("transformers")
    hf = transformers.PretrainedConfig(use_misa=True, misa_topk_heads=2, misa_decode_topk_heads=4)
    cfg = MisaConfig.from_model_config(hf, block_size=64)
    assert (cfg.variant, cfg.active_heads, cfg.decode_active_heads, cfg.block_size) == ("misa", 2, 4, 64)
    assert (cfg.heads(decode=False), cfg.heads(decode=True)) == (2, 4)


@pytest.mark.parametrize("raw, name", [
    ({"use_misa": True, "misa_topk_heads": 0}, "misa_topk_heads"),
    ({"use_misa": True, "misa_topk_heads": "8"}, "misa_topk_heads"),
    ({"use_misa": True, "misa_decode_topk_heads": -1}, "misa_decode_topk_heads"),
    ({"use_misa": True, "misa_k_block_size": 0}, "misa_k_block_size"),
    ({"use_misa": True, "misa_k_block_size": None}, "misa_k_block_size"),
    ({"use_misa": True, "misa_stage1_topk": 0}, "misa_stage1_topk"),
    ({"use_misa": "yes"}, "use_misa"),
    ({"use_misa": True, "misa_topk_head": 8}, "misa_topk_head"),
])
def test_from_model_config_errors_name_the_key(raw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        MisaConfig.from_model_config(raw)


def test_from_model_config_needs_a_config():
    with pytest.raises(ValueError, match="^model_config:"):
        MisaConfig.from_model_config(42)


@pytest.mark.parametrize("fields, name", [
    ({"variant": "moe"}, "variant"),
    ({"active_heads": 0}, "active_heads"),
    ({"active_heads": 2.0}, "active_heads"),
    ({"decode_active_heads": 0}, "decode_active_heads"),
    ({"block_size": 0}, "block_size"),
    ({"stage1_k": 4096}, "stage1_k"),                        # variant "misa": ambiguous
    ({"variant": "misa-dagger"}, "stage1_k"),                # missing
    ({"router": "softmax"}, "router"),
    ({"hisa_block_size": 0}, "hisa_block_size"),
    ({"hisa_block_k": 1}, "hisa_block_k"),
    ({"workspace_bytes": 0}, "workspace_bytes"),
])
def test_fields_are_validated(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        MisaConfig(**fields)


def test_with_options():
    cfg = MisaConfig().with_options(active_heads=2, variant="misa-dagger", stage1_k=64)
    assert (cfg.active_heads, cfg.variant, cfg.stage1_k) == (2, "misa-dagger", 64)
    with pytest.raises(ValueError, match="^active_head:"):
        MisaConfig().with_options(active_head=2)


def test_select_runs_the_variant():
    q, kv, w, ks, ke = make_inputs(24, 200, 8, 32, "ragged", seed=3)
    args = (q, kv, w, ks, ke)
    assert as_sets(MisaConfig(variant="dsa").select(*args, 20)) == as_sets(misa.dsa_select(*args, 20))
    assert torch.equal(MisaConfig(variant="hisa", hisa_block_size=16, hisa_block_k=3).select(*args, 20),
                       misa.hisa_select(*args, 20, block_size=16, block_k=3))
    assert torch.equal(MisaConfig(active_heads=2, block_size=32).select(*args, 20),
                       misa.misa_select(*args, 20, active_heads=2, block_size=32))
    dagger = MisaConfig(variant="misa-dagger", active_heads=2, block_size=32, stage1_k=40)
    assert torch.equal(dagger.select(*args, 20),
                       misa.misa_select(*args, 20, active_heads=2, block_size=32, stage1_k=40))


def test_decode_heads_apply_only_at_decode():
    q, kv, w, ks, ke = make_inputs(24, 200, 8, 32, "causal", seed=4)
    args = (q, kv, w, ks, ke)
    cfg = MisaConfig(active_heads=1, decode_active_heads=8, block_size=32)
    assert as_sets(cfg.select(*args, 20, decode=True)) == as_sets(misa.dsa_select(*args, 20))
    assert torch.equal(cfg.select(*args, 20), misa.misa_select(*args, 20, active_heads=1, block_size=32))


@pytest.mark.parametrize("variant", ["dsa", "misa", "misa-dagger"])
def test_logits_dtype_reaches_the_selection(variant, monkeypatch):
    # the config's dtype is the one the selection runs with (DSA and MISA select as float32 either
    # way, so it is watched on its way in); MISA-dagger's stage 1 ties keys that float32 orders,
    # so there the two selections differ on these inputs and the config's must be the bfloat16 one
    from misa import select
    q, kv, w, ks, ke = make_inputs(96, 700, 8, 32, "causal", seed=5)
    extra = {"stage1_k": 128} if variant == "misa-dagger" else {}
    cfg = MisaConfig(variant=variant, active_heads=2, block_size=64, logits_dtype="bfloat16", **extra)
    name = "dsa_select" if variant == "dsa" else "misa_select"
    seen = []
    inner = getattr(select, name)

    def watched(*args, **options):
        seen.append(options.get("logits_dtype"))
        return inner(*args, **options)

    monkeypatch.setattr(select, name, watched)
    got = cfg.select(q, kv, w, ks, ke, 64)
    if variant == "dsa":
        want = misa.dsa_select(q, kv, w, ks, ke, 64, logits_dtype=torch.bfloat16)
        f32 = misa.dsa_select(q, kv, w, ks, ke, 64)
    else:
        args = (q, kv, w, ks, ke, 64, 2, 64, extra.get("stage1_k"))
        want = misa.misa_select(*args, logits_dtype=torch.bfloat16)
        f32 = misa.misa_select(*args, logits_dtype=torch.float32)
    assert seen[0] == torch.bfloat16
    assert as_sets(got) == as_sets(want)
    assert (as_sets(got) != as_sets(f32)) == (variant == "misa-dagger")
    assert MisaConfig.from_json(cfg.to_json()) == cfg
    # unset, the variant's default: bfloat16 for MISA-dagger's first stage, float32 for the others
    default = cfg.with_options(logits_dtype=None)
    seen.clear()
    assert as_sets(default.select(q, kv, w, ks, ke, 64)) == as_sets(want if variant == "misa-dagger" else f32)
    assert seen == [None]
    assert "logits_dtype" not in default.to_json()["default"]
    explicit = cfg.with_options(logits_dtype="float32")
    seen.clear()
    assert as_sets(explicit.select(q, kv, w, ks, ke, 64)) == as_sets(f32)
    assert seen == [torch.float32]
    assert MisaConfig.from_json(explicit.to_json()) == explicit


def test_logits_dtype_bad_values():
    with pytest.raises(ValueError, match="^logits_dtype: expected one of"):
        MisaConfig(logits_dtype="float16")
    with pytest.raises(ValueError, match="^logits_dtype: variant 'hisa'"):
        MisaConfig(variant="hisa", logits_dtype="bfloat16")
    with pytest.raises(ValueError, match="^layers.2.logits_dtype:"):
        MisaConfig.from_json({"layers": {"2": {"variant": "dsa", "logits_dtype": "bf16"}}})
