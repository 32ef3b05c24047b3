"""``misa eval decode`` on a tiny random Llama with a random indexer: the paged decode selection of
the answer rows against the prefill selection, block-pruned decode covering every page, the report.
On CUDA the same checks run the paged kernels (batched DSA, block-pruned decode over the pooled-key
cache) against the prefill kernels."""
import json
from pathlib import Path

import pytest
import torch

import misa

pytest.importorskip("transformers")

from misa.eval import decode as dec
from misa.eval.common import EvalContext
from misa.eval.indexer import IndexerConfig, IndexerStack
from misa.eval.niah import Sample
from misa.eval.selectors import SelectorSettings, selection_mask
from misa.eval.sparse import SparseAttention
from helpers import check_selection, dsa_logits64, md_rows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
T, ANSWER, K = 300, 292, 32          # 5 pages, the last one partial; 8 answer rows (decode steps)
LAYERS = [0, 1]
SETTINGS = SelectorSettings(block_size=64)


def _ctx(device: str) -> EvalContext:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=512)).eval().to(device)
    stack = IndexerStack(IndexerConfig(layers=LAYERS, hidden=64, heads=16, head_dim=64, q_rank=16)).eval().to(device)
    return EvalContext(model, None, stack, torch.device(device), Path("tiny.gguf"), None)


def _sample(seed: int = 1) -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample(torch.randint(0, 64, (T,), generator=g), ANSWER, "random")


class Recorder:
    """Wraps a ``sparse`` callback; keeps each layer's input and mask."""

    def __init__(self, inner):
        self.inner, self.x, self.masks = inner, {}, {}

    def __call__(self, layer, x, query, key):
        mask = self.inner(layer, x, query, key)
        self.x[layer], self.masks[layer] = x, mask
        return mask


def _same_up_to_near_ties(got: torch.Tensor, want: torch.Tensor, scores64: torch.Tensor, rtol: float,
                          ordered: bool = True):
    """Row by row: the same keys (in the same order when ``ordered``), or, where not, the scores at
    the differing places equal within ``rtol`` (a near-tie taken the other way)."""
    for r in range(got.shape[0]):
        a, b = got[r].cpu().long(), want[r].cpu().long()
        if not ordered:
            a, b = a.sort(descending=True).values, b.sort(descending=True).values
        if torch.equal(a, b):
            continue
        assert torch.equal((a >= 0), (b >= 0)), r
        sa, sb = scores64[r, a[a >= 0]], scores64[r, b[b >= 0]]
        if not ordered:
            sa, sb = sa.sort().values, sb.sort().values
        tol = rtol * max(1.0, float(scores64[r].masked_fill(scores64[r].isinf(), 0).abs().max()))
        assert torch.allclose(sa, sb, rtol=0, atol=tol), (r, a.tolist(), b.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_dsa_decode_selection_equals_its_prefill_selection(device):
    ctx, s = _ctx(device), _sample()
    prefill = Recorder(SparseAttention(ctx.stack, "dsa", K, SETTINGS))
    want = dec.predict(ctx, s, prefill)
    att = dec.DecodeAttention(ctx.stack, "dsa", K, ANSWER, SETTINGS, keep_selections=True)
    decoded = Recorder(att)
    got = dec.predict(ctx, s, decoded)
    rtol = 5e-4 if device == "cuda" else 1e-5
    all_equal = True
    for layer in LAYERS:
        # the prompt rows are the prefill's: the layer's input is the prefill forward's
        if device == "cpu":
            assert torch.equal(decoded.x[layer][:ANSWER], prefill.x[layer][:ANSWER]), layer
        else:
            assert torch.allclose(decoded.x[layer][:ANSWER], prefill.x[layer][:ANSWER], rtol=1e-4, atol=1e-4), layer
        inp = ctx.stack.inference_inputs(layer, decoded.x[layer])
        ke = torch.arange(ANSWER + 1, T + 1, dtype=torch.int32)
        scores = dsa_logits64(inp.q[ANSWER:], inp.kv, inp.weights[ANSWER:], torch.zeros_like(ke), ke)
        rows = att.selections[layer][ANSWER:]
        check_selection(rows, scores, torch.zeros_like(ke), ke, K, rtol=rtol)      # DSA's top-k of each row
        # against the prefill DSA selection of the same rows (the one SparseAttention masks with)
        from misa.eval.selectors import select
        ends = torch.arange(1, T + 1, dtype=torch.int32, device=device)
        pre = select("dsa", inp, torch.zeros_like(ends), ends, K)[ANSWER:]
        # in the same order on the CPU; the kernels promise the keys, not their order
        _same_up_to_near_ties(rows, pre, scores, rtol, ordered=device == "cpu")
        assert float(att.prefill_recall[layer].min()) > 0.9, layer
        assert float(att.recall[layer].min()) == 1.0
        mask_equal = torch.equal(selection_mask(att.selections[layer], T), prefill.masks[layer])
        all_equal &= mask_equal
        if device == "cpu":           # one reference path under both: the very same keys
            assert mask_equal, layer
    if all_equal:                     # the same attention everywhere: the same greedy answers
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_block_pruned_decode_keeping_every_page_is_dsa(device):
    ctx, s = _ctx(device), _sample(seed=2)
    pages = -(-T // 64)
    full = dec.DecodeAttention(ctx.stack, f"hisa-m{pages}", K, ANSWER, SETTINGS, keep_selections=True)
    dsa = dec.DecodeAttention(ctx.stack, "dsa", K, ANSWER, SETTINGS, keep_selections=True)
    full_run, dsa_run = Recorder(full), Recorder(dsa)
    got, want = dec.predict(ctx, s, full_run), dec.predict(ctx, s, dsa_run)
    all_equal = True
    for layer in LAYERS:
        a, b = full.selections[layer], dsa.selections[layer]
        if device == "cpu":
            # recall of DSA's decode selection on the same cache, and the selection against DSA's run
            assert float(full.recall[layer].min()) == 1.0, layer
            assert [set(r.tolist()) for r in a] == [set(r.tolist()) for r in b], layer
        elif torch.equal(full_run.x[layer], dsa_run.x[layer]):
            # the block-pruned kernel scores the kept pages' tokens, the paged DSA kernel every token
            inp = ctx.stack.inference_inputs(layer, full_run.x[layer])
            ke = torch.arange(ANSWER + 1, T + 1, dtype=torch.int32)
            scores = dsa_logits64(inp.q[ANSWER:], inp.kv, inp.weights[ANSWER:], torch.zeros_like(ke), ke)
            _same_up_to_near_ties(a[ANSWER:], b[ANSWER:], scores, 5e-4, ordered=False)
        all_equal &= torch.equal(selection_mask(a, T), selection_mask(b, T))
    if all_equal:
        assert torch.equal(got, want)
    # keeping 3 of the 5 pages loses some of DSA's keys somewhere (the check above can fail)
    pruned = dec.DecodeAttention(ctx.stack, "hisa-m2", K, ANSWER, SETTINGS, keep_selections=True)
    dec.predict(ctx, s, pruned)
    assert min(float(pruned.recall[l].min()) for l in LAYERS) < 1.0
    # layer 0 sees the embeddings in both runs: the prompt rows attend as DSA's prefill does, the answer
    # rows as the pruned decode selection whose recall was recorded
    a, b = pruned.selections[0], dsa.selections[0]
    assert torch.equal(a[:ANSWER], b[:ANSWER])
    assert torch.equal(misa.recall(a[ANSWER:], b[ANSWER:]).cpu(), pruned.recall[0])


def test_the_report_has_one_recall_row_per_layer(tmp_path):
    ctx = _ctx("cpu")
    corpus = tmp_path / "essays.txt"
    corpus.write_text("text")
    ctx.corpus = corpus
    cfg = dec.DecodeConfig(lengths=[T], depths=2, methods=["dsa", "misa-h4", "hisa-m2"], k=K, settings=SETTINGS)
    samples = [_sample(seed) for seed in range(2)]
    calls = []
    res = dec.run_samples(ctx, cfg, samples, [0.0, 1.0], tmp_path, progress=calls.append)
    assert len(calls) == 6
    assert set(res["recall_per_layer"]["misa-h4"]) == {str(l) for l in LAYERS}
    assert all(v == 1.0 for v in res["recall_per_layer"]["dsa"].values())
    assert all(0 < v <= 1 for m in ("misa-h4", "hisa-m2") for v in res["recall_per_layer"][m].values())
    assert res["dsa_prefill_recall_per_layer"] == {"0": 1.0, "1": 1.0}
    assert res["agrees_with_dsa"]["dsa"] == 1.0
    md = (tmp_path / "decode.md").read_text()
    rows = md_rows(md, "layer | dsa | misa-h4")
    assert set(rows) == {"0", "1", "mean", "min"}
    assert rows["0"][1] == f"{res['recall_per_layer']['misa-h4']['0']:.3f}"
    # bytes: the dense formula, and block-pruned reads 3 of the 5 pages + the pooled rows
    d = ctx.stack.cfg.head_dim
    assert res["bytes_per_step_per_layer"]["dsa"][str(T)] == T * (d + 4)
    assert res["bytes_per_step_per_layer"]["hisa-m2"][str(T)] == 5 * 2 * d + 3 * 64 * (d + 4)
    assert res["bytes_per_step_per_layer"]["misa-h4"][str(T)] == T * (d + 4) + 5 * 2 * d
    assert "Command" in md and json.loads((tmp_path / "decode.json").read_text())["grid"] == res["grid"]
    # a run out of time scores nothing; resuming from it fills the grid in
    late = dec.run_samples(ctx, cfg, samples, [0.0, 1.0], tmp_path, late=lambda: True)
    assert all(v is None for g in late["grid"].values() for row in g for v in row)
    again = dec.run_samples(ctx, cfg, samples, [0.0, 1.0], tmp_path, previous=json.loads(json.dumps(res)),
                            progress=calls.append)
    assert len(calls) == 6 and again["grid"] == res["grid"] and again["recall_per_layer"] == res["recall_per_layer"]


def test_bad_methods_and_sizes_name_the_argument():
    with pytest.raises(ValueError, match="^methods: unknown"):
        dec.DecodeConfig(methods=["dsa", "hisa"])            # prefill HISA: decode names its pages
    with pytest.raises(ValueError, match="^methods: unknown"):
        dec.DecodeConfig(methods=["hisa-m0"])
    with pytest.raises(ValueError, match="^methods: hisa-m2 keeps 2 pages"):
        dec.DecodeConfig(methods=["hisa-m2"], k=256)
    with pytest.raises(ValueError, match="^methods: listed twice"):
        dec.DecodeConfig(methods=["dsa", "dsa"])
    with pytest.raises(ValueError, match="^lengths"):
        dec.DecodeConfig(lengths=[128])
    with pytest.raises(ValueError, match="^depths"):
        dec.DecodeConfig(depths=0)
    with pytest.raises(ValueError, match="^k:"):
        dec.DecodeConfig(k=0)
    assert dec.DecodeConfig(methods=["hisa-m4"], k=256).methods == ["hisa-m4"]
