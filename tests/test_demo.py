"""``misa demo``: its rows come from the registry, its output explains itself and flags an
under-trained indexer; ``misa eval`` refuses to start without an indexer or a corpus."""
import pytest
import torch

from misa.cli import WIDTH, main
from misa.demo import DemoConfig, run_demo
from misa.synthetic import indexer_workload
from misa.variants import METHODS

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


def test_an_under_trained_real_indexer_is_flagged(monkeypatch, capsys):
    from misa.eval import common, realdemo

    def fake_real(device, seq_len, num_queries, model=None, indexer=None, fetch=False, **kw):
        meta = {"progress": {"tokens_per_layer": 3072}}
        w = indexer_workload(seq_len, num_queries, 16, 64, device=device)
        desc = "REAL SmolLM2-135M-Instruct layer 15 with an UNDER-TRAINED DSA indexer (3,072 tokens per layer)"
        return realdemo.RealWorkload(w.q, w.weights, w.kv, w.ks, w.ke, desc, 3072,
                                     common.training_warning(meta)), desc
    monkeypatch.setattr(realdemo, "real_workload", fake_real)
    assert main(["demo", "--workload", "real"] + SMALL) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "REAL SmolLM2" in out and "WARNING: UNDER-TRAINED indexer: it saw 3,072 tokens per layer" in out
    assert "of the indexer's 16" in out


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
