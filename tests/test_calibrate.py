"""Per-layer calibration (misa.calibrate), per-layer configs (MisaConfig.from_json / for_layer) and
their use by patch_model."""
import json

import pytest
import torch

import misa
from misa.calibration import (CostTable, LayerSample, Setting, calibrate_layers, calibration_from_scores,
                              candidate_settings, choose, score_layers)
from misa.synthetic import indexer_workload


def cost_table(settings, dsa_ms=10.0):
    """Prices that make fewer heads and fewer candidates cheaper (the shape of a measured table)."""
    times = {}
    for s in settings:
        if s.variant == "dsa":
            times[s.name] = dsa_ms
        elif s.variant == "hisa":
            times[s.name] = 1.0 + 0.5 * s.multiple
        else:
            times[s.name] = 0.5 + 0.25 * s.active_heads + (1.5 * s.multiple if s.variant == "misa-dagger" else 0)
    return CostTable(times, {"card": "synthetic prices"})


def layer_samples(layers=2, heads=16, seed=0):
    out = {}
    for layer in range(layers):
        w = indexer_workload(700, 37, heads, 32, seed=seed + layer, device=torch.device("cpu"))
        q, kv, weights, ks, ke = w.args
        probs = torch.rand(q.shape[0], int(ke.max()), generator=torch.Generator().manual_seed(layer))
        probs = torch.where(torch.arange(probs.shape[1])[None] < ke[:, None].long(), probs, 0.0)
        out[layer] = [LayerSample(q, kv, weights, ks, ke, probs / probs.sum(1, keepdim=True))]
    return out


def test_setting_names_round_trip_and_bad_names_fail():
    for s in candidate_settings(64):
        assert Setting.parse(s.name) == s
    assert [s.active_heads for s in candidate_settings(8) if s.variant == "misa"] == [2, 2, 4, 4]
    for bad in ("misa h=x gap", "hisa", "misa-dagger h=8 gap", "dense"):
        with pytest.raises(ValueError, match="setting"):
            Setting.parse(bad)


def test_setting_configs_scale_with_k():
    cfg = Setting("misa-dagger", 8, "gap", 4).config(256, 128, 64)
    assert (cfg.variant, cfg.active_heads, cfg.router, cfg.stage1_k, cfg.block_size) == ("misa-dagger", 8, "gap", 1024, 128)
    cfg = Setting("hisa", multiple=2).config(256, 128, 64)
    assert cfg.hisa_block_k * cfg.hisa_block_size == 512


def test_choose_takes_the_cheapest_setting_meeting_the_target():
    sets = [Setting("dsa"), Setting("misa", 2, "gap"), Setting("misa", 8, "gap")]
    costs = cost_table(sets)
    scores = {"dsa": {"recall": 1.0}, "misa h=2 gap": {"recall": 0.80}, "misa h=8 gap": {"recall": 0.96}}
    assert choose(scores, costs, 0.95) == "misa h=8 gap"
    assert choose(scores, costs, 0.5) == "misa h=2 gap"
    assert choose(scores, costs, 0.99) == "dsa"          # nothing cheaper qualifies: stay dense
    with pytest.raises(ValueError, match="metric"):
        choose(scores, costs, 0.9, metric="mass")


def test_calibration_meets_its_target_per_layer_and_round_trips_through_json(tmp_path):
    samples = layer_samples()
    sets = candidate_settings(16, heads=(2, 4, 8), dagger_heads=(4,), dagger_multiples=(2,), hisa_multiples=(2, 4))
    costs = cost_table(sets)
    scores, _ = score_layers(samples, k=64, settings=sets, cost_table=costs, router_block_size=64, hisa_block_size=32)
    for layer in samples:
        assert scores[layer]["dsa"]["recall"] == 1.0 and abs(scores[layer]["dsa"]["mass"] - 1.0) < 1e-6
    for target in (0.5, 0.8, 0.95):
        for metric in ("recall", "mass"):
            cal = calibration_from_scores(scores, costs, target, metric=metric, k=64, router_block_size=64,
                                          hisa_block_size=32)
            for layer, row in cal.table.items():
                chosen = row["settings"][row["chosen"]]
                assert chosen[metric] >= target
                cheaper = [s for s in row["settings"].values() if s["cost"] < chosen["cost"]]
                assert all(s[metric] < target for s in cheaper)
            path = tmp_path / f"{metric}-{target}.json"
            cal.config.to_json(path)
            back = misa.MisaConfig.from_json(path)
            for layer, row in cal.table.items():
                want = Setting.parse(row["chosen"]).config(64, 64, 32)
                assert back.for_layer(layer) == want
            assert back.meta["target"] == target and back.meta["metric"] == metric
    low = calibration_from_scores(scores, costs, 0.01, k=64, router_block_size=64, hisa_block_size=32)
    assert all(row["chosen"] == "misa h=2 abs-sum" or row["chosen"] == "misa h=2 gap" for row in low.table.values())
    assert low.modelled_speedup() > 1


def test_calibrate_layers_checks_its_arguments():
    samples = layer_samples(layers=1)
    sets = [Setting("dsa"), Setting("misa", 2, "gap")]
    costs = cost_table(sets)
    kw = dict(k=64, settings=sets, cost_table=costs, router_block_size=64, hisa_block_size=32)
    with pytest.raises(ValueError, match="target"):
        calibrate_layers(samples, 1.5, **kw)
    with pytest.raises(ValueError, match="metric"):
        calibrate_layers(samples, 0.9, metric="f1", **kw)
    with pytest.raises(ValueError, match="cost_table"):      # an unpriced candidate fails before any work
        calibrate_layers(samples, 0.9, **{**kw, "settings": sets + [Setting("misa", 4, "gap")]})
    no_probs = {0: [LayerSample(s.q, s.kv, s.weights, s.ks, s.ke) for s in samples[0]]}
    with pytest.raises(ValueError, match="mass"):
        calibrate_layers(no_probs, 0.9, metric="mass", **kw)


def test_cost_table_files(tmp_path):
    sets = [Setting("dsa"), Setting("hisa", multiple=4)]
    table = cost_table(sets)
    path = tmp_path / "costs.json"
    table.to_json(path)
    back = CostTable.load(path)
    assert back.relative(Setting("hisa", multiple=4)) == pytest.approx(3.0 / 10.0)
    raw = json.loads(path.read_text())
    for bad in ({**raw, "format": "x"}, {**raw, "times_ms": {"hisa 4k": 1.0}},
                {**raw, "times_ms": {"dsa": 1.0, "misa h=2": 1.0}}, {**raw, "times_ms": {"dsa": -1.0}}):
        with pytest.raises(ValueError, match="cost_table|setting"):
            CostTable.load(bad)


def test_config_files_name_every_routed_layers_router():
    # a written config routes as it was written whatever the library's default router: to_json names
    # the router of every routed setting, and the shipped calibrated config does too
    from importlib.resources import files
    from misa.variants import VARIANTS
    cfg = misa.MisaConfig(variant="dsa", layers=((1, misa.MisaConfig(variant="misa")),
                                                 (2, misa.MisaConfig(variant="misa-dagger", stage1_k=4096,
                                                                     router="abs-sum"))))
    out = cfg.to_json()
    assert "router" not in out["default"]
    assert out["layers"]["1"]["router"] == misa.MisaConfig().router and out["layers"]["2"]["router"] == "abs-sum"
    shipped = json.loads(files("misa").joinpath("data/smollm2-calibrated.json").read_text())
    routed = [v for v in shipped["layers"].values() if VARIANTS[v["variant"]].routed]
    assert routed and all("router" in v for v in routed)


def test_per_layer_config_json_errors_name_the_field(tmp_path):
    ok = {"default": {"variant": "dsa"}, "layers": {"1": {"variant": "misa", "active_heads": 4, "router": "gap"}}}
    cfg = misa.MisaConfig.from_json(ok)
    assert cfg.for_layer(1).active_heads == 4 and cfg.for_layer(0).variant == "dsa"
    assert misa.MisaConfig.from_json(cfg.to_json()) == cfg
    cases = {
        "layers.2.active_heads": {"layers": {"2": {"variant": "misa", "active_heads": 0}}},
        "layers.x": {"layers": {"x": {}}},
        "default.varient": {"default": {"varient": "dsa"}},
        "layers.3.stage1_k": {"layers": {"3": {"variant": "misa-dagger"}}},
        "layers.0.router": {"layers": {"0": {"variant": "misa", "router": "best"}}},
        "format": {"format": "misa-config/9"},
        "extra": {"extra": 1},
    }
    for field, raw in cases.items():
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            misa.MisaConfig.from_json(raw)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="path"):
        misa.MisaConfig.from_json(bad)
    with pytest.raises(ValueError, match=r"layers\.1\.active_heads"):    # checked against the model's indexer
        cfg.check_indexer(num_heads=2, index_topk=64)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_kernel_scores_match_the_reference_at_the_testbed_shapes(monkeypatch):
    """The testbed's calibration runs every candidate on the kernels (H=64, D=64, k=256, 8K)."""
    from misa.calibration import score_settings
    w = indexer_workload(8192, 64, 64, 64, seed=1, device=torch.device("cuda"))
    q, kv, weights, ks, ke = w.args
    sample = [LayerSample(q, kv, weights, ks, ke)]
    sets = candidate_settings(64)
    kernels = score_settings(sample, sets, 256, 128, 64)
    monkeypatch.setenv("MISA_BACKEND", "reference")
    reference = score_settings(sample, sets, 256, 128, 64)
    for name in kernels:      # fp8 accumulation order moves near-ties only
        assert abs(kernels[name]["recall"] - reference[name]["recall"]) < 0.03, name


@cuda
def test_measure_costs_prices_every_setting():
    from misa.calibration import measure_costs
    sets = [Setting("misa", 8, "abs-sum"), Setting("misa-dagger", 8, "gap", 4), Setting("hisa", multiple=4)]
    table = measure_costs(sets, torch.device("cuda"), num_queries=256, context=16384, k=512, rep_ms=20)
    assert set(table.times_ms) == {"dsa"} | {s.name for s in sets}
    assert all(0 < table.relative(s) < 10 for s in sets)
    assert CostTable.load(table.to_json()).times_ms == table.times_ms
