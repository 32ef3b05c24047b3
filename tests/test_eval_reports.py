"""The evaluation's reports say what was run: recall.md names the context actually used."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")

from misa.eval.recall import RecallConfig, recall_report


def test_recall_report_states_the_context_used(tmp_path):
    corpus = tmp_path / "essays.txt"
    corpus.write_text("text")
    layers, ks = [0, 2], [16, 32]
    cfg = RecallConfig(context=2048, ks=ks, methods=["misa-h8", "misa-dagger", "sink-window"])
    per_layer = {}
    for layer in layers:
        for k in ks:
            r = {"negative_weights": 0.4, "dsa/mass": 0.8, "oracle/mass": 0.85, "oracle/mass_ratio": 1.06}
            for m in cfg.methods:
                r.update({f"{m}/recall": 0.9, f"{m}/recall_min": 0.5, f"{m}/mass": 0.7, f"{m}/mass_ratio": 0.05
                          if (m, layer) == ("sink-window", 2) else 0.95})
            per_layer[f"{layer}/{k}"] = r
    ctx = SimpleNamespace(stack=SimpleNamespace(layer_ids=layers), geo={"layers": 30, "heads": 9},
                          model_path=Path("SmolLM2-135M-Instruct.Q4_1.gguf"), corpus=corpus,
                          meta=lambda: {"command": "misa eval recall", "device": "cpu", "date": "today",
                                        "warning": "UNDER-TRAINED indexer: it saw 3,072 tokens per layer"})
    recall_report(ctx, cfg, {"per_layer": per_layer, "router": {}, "windows": 1, "queries_per_window": 8}, tmp_path)
    md = (tmp_path / "recall.md").read_text()
    assert "context 2048 tokens" in md and "2048-token context" in md
    assert not re.search(r"(?<![0-9])8K|8192", md)          # no hard-coded 8K context
    assert "essays.txt" in md and "9 query heads" in md and "(30 layers)" in md
    assert "**Warning**: UNDER-TRAINED" in md
    assert "misa-dagger (MISA\u2020)" in md
    assert (tmp_path / "recall.png").stat().st_size > 0
    assert json.loads((tmp_path / "recall.json").read_text())["config"]["context"] == 2048
