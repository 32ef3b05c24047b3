"""``misa bench``'s tables and every command's ``--help``, on any machine (no GPU: fake timings)."""
import os
import sys

import pytest
import torch

from misa import bench
from misa.cli import WIDTH, bench_report, main, text_table
from misa.variants import METHODS


def fake_result(methods=bench.METHODS, sizes=(16384, 131072), compare=False) -> dict:
    """What ``run_bench`` returns, with made-up numbers under the keys ``bench_one`` writes."""
    cfg = bench.BenchConfig(context_lens=sizes, methods=tuple(methods), compare_logits_dtypes=compare)
    owners = bench.stage_owners(cfg.methods)
    rows = []
    for i, s in enumerate(sizes):
        ms = {"dsa.logits": 1.0 + 8 * i, "dsa.topk": 0.4 + i, "torch.topk": 0.9 + 5 * i, "dsa.e2e": 1.3 + 8.5 * i}
        row = {"seq_len": s, "num_queries": 4096, "heads": 64, "head_dim": 128, "k": 2048,
               "dsa.peak_mb": 2560.0, "dsa.logits_tflops": 990.0}
        for name, owner in owners.items():
            if owner == name:
                ms[name + ".router"], ms[name + ".logits"] = 0.07, 0.2 + i
                row[name + ".logits_tflops"] = 800.0
            if bench._config(cfg, name).stage1_k is not None:
                ms[name + ".stage1_topk"], ms[name + ".rerank"] = 1.33, 1.13
            else:
                ms[name + ".topk"] = 1.0
        for name in cfg.methods:
            if name != "dsa":
                ms[name + ".e2e"] = 0.6 + i
                row[name + ".recall"], row[name + ".peak_mb"] = 0.9, 3456.0
        extra = bench.dtype_rows(cfg.methods, compare)
        for name in extra:
            ms[name + ".e2e"] = 0.5 + i
            row[name + ".recall"], row[name + ".peak_mb"] = 0.89, 2345.0
        row["logits_dtypes"] = dtypes = {name: dtype for name, (_, dtype) in extra.items()}
        for name in ["dsa", *cfg.methods]:
            if name != "hisa":
                dtypes[name] = bench.default_logits_dtype(name)
        for _, b16 in bench.dtype_pairs(dtypes).values():
            row[b16 + ".recall_vs_f32"] = 0.9967
        if compare:
            ms["dsa-bf16.logits"], ms["dsa-bf16.topk"], row["dsa-bf16.logits_tflops"] = 0.8 + 7 * i, 0.3 + i, 1100.0
        row["ms"], row["ms_rounds"] = ms, {k: [v] * 3 for k, v in ms.items()}
        rows.append(row)
    from dataclasses import asdict
    return {"gpu": "NVIDIA H200 with a long marketing name", "date": "2026-11-29", "torch": "2.x", "triton": "3.x",
            "config": asdict(cfg), "rows": rows}


def _check_width(text: str):
    wide = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not wide, wide


@pytest.mark.parametrize("methods", [bench.METHODS, ("dsa", "misa-dagger"), ("hisa",)])
@pytest.mark.parametrize("compare", [False, True])
def test_bench_tables_fit_80_columns(methods, compare):
    result = fake_result(methods, compare=compare)
    out = bench_report(result)
    _check_width(out)
    for name in methods:
        assert METHODS[name].label in out, name             # labels come from the registry
    assert "131072" in out and "x DSA" in out and "scoring x" in out
    cols, rows = bench.format_rows(result)
    assert all(len(r) == len(cols) for r in rows)
    # one end-to-end row per size and method (DSA always, as the reference), and comparing the
    # logits dtypes one more for each method but HISA
    names = {"dsa", *methods}
    extra = len(names - {"hisa"}) if compare else 0
    assert len(rows) == len(result["rows"]) * (len(names) + extra)
    assert ("DSA bf16" in out and "0.9967" in out and "vs f32" in out) == compare
    assert ("MISA\u2020 f32" in out) == (compare and "misa-dagger" in methods)
    assert "HISA bf16" not in out and "HISA f32" not in out


def test_bench_other_dtype_rows_follow_their_method():
    # MISA-dagger's default is bfloat16: its other row is float32
    assert bench.row_names(["misa-dagger", "hisa", "misa"], True) == [
        "dsa", "dsa-bf16", "misa-dagger", "misa-dagger-f32", "hisa", "misa", "misa-bf16"]
    assert bench.dtype_rows(["misa"], True) == {"dsa-bf16": ("dsa", "bfloat16"), "misa-bf16": ("misa", "bfloat16")}
    assert bench.row_names(["misa"], False) == ["dsa", "misa"] and not bench.dtype_rows(["misa"], False)
    assert bench.dtype_pairs({"dsa": "float32", "dsa-bf16": "bfloat16", "misa-dagger": "bfloat16",
                              "misa-dagger-f32": "float32", "misa": "float32"}) == {
        "dsa": ("dsa", "dsa-bf16"), "misa-dagger": ("misa-dagger-f32", "misa-dagger")}
    with pytest.raises(ValueError, match="^compare_logits_dtypes"):
        bench.BenchConfig(compare_logits_dtypes="bfloat16")


def test_bench_tables_read_results_saved_before_rows_named_their_dtype():
    """Older results: every method in float32, and with ``logits_dtype: bfloat16`` a "-bf16" row
    each (MISA-dagger's included)."""
    old = fake_result(("dsa", "misa", "misa-dagger"))
    for r in old["rows"]:
        del r["logits_dtypes"]
    del old["config"]["compare_logits_dtypes"]
    assert len(bench.format_rows(old)[1]) == 3 * len(old["rows"])
    old["config"]["logits_dtype"] = "bfloat16"
    for r in old["rows"]:
        for name in ("dsa", "misa", "misa-dagger"):
            r["ms"][name + "-bf16.e2e"], r[name + "-bf16.recall_vs_f32"] = 0.5, 0.9931
    out = bench_report(old)
    assert len(bench.format_rows(old)[1]) == 6 * len(old["rows"])
    assert "MISA\u2020 bf16" in out and "0.9931" in out and "MISA\u2020 f32" not in out


def test_stage_rows_share_the_first_stage_of_the_same_router():
    owners = bench.stage_owners(bench.METHODS)
    assert owners == {"misa": "misa", "misa-gap": "misa-gap", "misa-dagger": "misa"}
    assert bench.stage_owners(["misa-dagger"]) == {"misa-dagger": "misa-dagger"}


def test_a_table_wider_than_the_terminal_is_split_repeating_its_first_column():
    cols = ["keys"] + [f"column {i:02d}" for i in range(12)]
    text = text_table("wide", cols, [["131072"] + [f"{i}.00" for i in range(12)]], left=1)
    _check_width(text)
    assert text.count("keys") >= 2 and "column 11" in text and "11.00" in text


def test_bench_one_plumbing_on_the_cpu(monkeypatch):
    """The bench's timers, recalls and speed-ups on a tiny size through the Triton interpreter,
    with the GPU-only timing and memory calls replaced."""
    monkeypatch.setattr(bench, "_time", lambda fn, rep_ms: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "_peak_mb", lambda fn, device: (fn(), 0.0)[1])
    cfg = bench.BenchConfig(num_queries=32, context_lens=(512,), heads=16, k=32, active_heads=4, block_size=128,
                            stage1_k=64, hisa_block_size=32, hisa_block_k=4, rep_ms=2, rounds=1)
    row = bench.bench_one(cfg, 512, torch.device("cpu"))
    assert set(row["ms"]) == set(row["ms_rounds"])
    for name in bench.METHODS[1:]:
        assert 0.0 < row[name + ".recall"] <= 1.0 and row[f"speedup.{name.replace('-', '_')}_e2e"] == 1.0
    assert {"misa.router", "misa.logits", "misa.topk", "misa-gap.router", "misa-dagger.stage1_topk",
            "misa-dagger.rerank"} <= set(row["ms"])
    from dataclasses import asdict
    out = bench_report({"gpu": "cpu", "date": "-", "config": asdict(cfg), "rows": [row]})
    _check_width(out)


def test_bench_one_bf16_rows_on_the_cpu(monkeypatch):
    """The bfloat16-logits rows' timers, recalls (of DSA and of their float32 method) and
    speed-ups, as above."""
    monkeypatch.setattr(bench, "_time", lambda fn, rep_ms: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "_peak_mb", lambda fn, device: (fn(), 0.0)[1])
    cfg = bench.BenchConfig(num_queries=8, context_lens=(256,), heads=16, k=16, active_heads=4, block_size=64,
                            stage1_k=32, rep_ms=2, rounds=1, methods=("misa", "misa-dagger"),
                            compare_logits_dtypes=True)
    row = bench.bench_one(cfg, 256, torch.device("cpu"))
    assert row["logits_dtypes"] == {"dsa": "float32", "dsa-bf16": "bfloat16", "misa": "float32",
                                    "misa-bf16": "bfloat16", "misa-dagger": "bfloat16", "misa-dagger-f32": "float32"}
    for name in ("dsa-bf16", "misa-bf16", "misa-dagger-f32"):
        assert {name + ".e2e", name + ".checked"} <= set(row["ms"])
        assert 0.0 < row[name + ".recall"] <= 1.0
        assert row[f"speedup.{name.replace('-', '_')}_e2e"] == 1.0
    for name in ("dsa-bf16", "misa-bf16", "misa-dagger"):       # the bfloat16 row of each pair
        assert 0.9 <= row[name + ".recall_vs_f32"] <= 1.0
    assert "misa-dagger-f32.recall_vs_f32" not in row
    assert {"dsa-bf16.logits", "dsa-bf16.topk"} <= set(row["ms"])
    from dataclasses import asdict
    _check_width(bench_report({"gpu": "cpu", "date": "-", "config": asdict(cfg), "rows": [row]}))


@pytest.mark.parametrize("argv, shown", [
    (["demo"], ["(default: auto)", "(default: 0)", "(default: real 4096 on CPU, 8192 on GPU; synthetic 8192 on CPU, 32768 on GPU)"]),
    (["bench"], ["(default: 4096)", "(default: 2048)", "(default: 1024)", "(default: 8192)", "(default: 200)",
                 "(default: 3)", "dsa, misa", "--compare-logits-dtypes"]),
    (["warmup"], ["(default: 64)", "(default: 128)", "(default: 256)", "(default: 0.8)", "(default: 0.001)"]),
    (["eval", "recall"], ["(default: 128)", "(default: abs-sum)", "(default: misa-results)", "2048 CPU"]),
    (["eval", "niah"], ["(default: 11 CUDA, 3 CPU)", "(default: 8 CUDA, 1 CPU)"]),
    (["eval", "ppl"], ["(default: 4096,8192 CUDA, 1024 CPU)"]),
])
def test_help_shows_the_defaults(argv, shown, capsys):
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    out = " ".join(capsys.readouterr().out.split())      # argparse wraps lines
    for s in shown:
        assert " ".join(s.split()) in out, s


def test_bench_methods_come_from_the_registry():
    assert bench.METHODS == tuple(METHODS)
    with pytest.raises(ValueError, match="methods"):
        bench.BenchConfig(methods=("dsa", "fast"))


def test_decode_tables_show_misa_dagger_and_read_older_results():
    # the decode bench's table from made-up rows: MISA-dagger's row where measured, and results
    # saved before it was measured still render
    from dataclasses import asdict
    from misa.bench_decode import DecodeBenchConfig, decode_tables, format_row
    row = {"batch": 8, "context": 131072, "next_n": 1, "dsa.logits_ms": 0.5, "dsa.logits_GBps": 2500.0,
           "dsa.logits_share_of_copy": 0.8, "dsa.graph_ms": 0.8, "dsa.eager_ms": 0.9,
           "dsa.eager_overhead_ms": 0.05,
           "misa-h8.graph_ms": 0.4, "misa-h8.eager_ms": 0.5, "misa-h8.recall_mean": 0.95,
           "misa-dagger-h8.graph_ms": 0.5, "misa-dagger-h8.eager_ms": 0.6, "misa-dagger-h8.recall_mean": 0.99,
           "misa-dagger-h8.recall_min": 0.97}
    old = {k: v for k, v in row.items() if not k.startswith("misa-dagger")}
    row.update({"hisa-m64.graph_ms": 0.2, "hisa-m64.speedup": 4.0, "hisa-m64.recall_mean": 0.9,
                "hisa-m64.recall_min": 0.8, "hisa-m64.oracle_recall_mean": 0.95, "f32-pooled.hisa-m64.graph_ms": 0.25,
                "f32-pooled.hisa-m64.recall_mean": 0.91})
    result = {"card": "NVIDIA H100", "copy_GBps": 3000.0, "config": asdict(DecodeBenchConfig(stage1_k=4096)),
              "rows": [row, old]}
    table, = decode_tables(result)
    methods = [r[1] for r in table.rows]
    assert methods == ["DSA dense", "block-pruned m=64", "MISA h=8", "MISA† h=8 k1=4096", "DSA dense", "MISA h=8"]
    assert table.rows[3][2:7] == ["500.0", "600.0", "1.60", "1.60", "0.990"]   # no DeepGEMM: best dense is ours
    assert table.rows[0][3] == "900.0 (+50.0)" and table.rows[1][3] == "-"    # what the checked call adds
    assert "misa-dagger-h8 graph 500.0 us" in format_row(row) and "dagger" not in format_row(old)
    assert "float32 pooled cache: 250.0 us graph, recall 0.910" in format_row(row)
    assert table.rows[1][6] == "0.900 (best 0.950)" and "best pages 0.950" in format_row(row)
    # the DeepGEMM baseline, where it ran, follows dense DSA; where it could not, the line says why
    row.update({"deepgemm.graph_ms": 0.64, "deepgemm.logits_ms": 0.4, "deepgemm.logits_GBps": 2700.0,
                "deepgemm.logits_share_of_copy": 0.9, "deepgemm.recall_mean": 1.0, "deepgemm.logits_max_rel_err": 1e-4})
    result["deepgemm"] = "2.3.0"
    row.update({"deepgemm-ourtopk.graph_ms": 0.5, "deepgemm-ourtopk.recall_mean": 1.0, "best-dense.graph_ms": 0.5})
    table, = decode_tables(result)
    assert table.rows[1] == ["8x128K n=1", "DSA, DeepGEMM logits + torch.topk", "640.0", "-", "1.25", "0.78", "1.000",
                             "2700 (90%)"]
    assert table.rows[2] == ["8x128K n=1", "DSA, DeepGEMM logits + our top-k", "500.0", "-", "1.60", "1.00", "1.000", ""]
    assert table.rows[0][4:6] == ["1.00", "0.62"] and table.rows[3][4:6] == ["4.00", "2.50"]   # block-pruned m=64
    assert "deepgemm logits + our topk 500.0 us graph, recall 1.0000" in format_row(row)
    assert "DeepGEMM: 2.3.0" in table.title and "deepgemm logits 400.0 us (2700 GB/s)" in format_row(row)
    assert "deepgemm skipped: no" in format_row({**old, "deepgemm.skipped": "no"})


def test_page_recall_bound_is_the_best_choice_of_pages():
    # brute force over every choice of pages on small random selections: the bound is the best
    from itertools import combinations
    from misa.metrics import page_recall_bound
    g = torch.Generator().manual_seed(4)
    for trial in range(20):
        width, k, page = 10 * 8, 12, 8
        ref = torch.stack([torch.randperm(width, generator=g)[:k] for _ in range(3)])
        ref[0, -3:] = -1                                     # a padded row
        for pages in (0, 1, 2, 3):
            got = page_recall_bound(ref, pages, page)
            for r in range(3):
                toks = [int(t) for t in ref[r] if t >= 0]
                best = max((sum(t // page in set(c) for t in toks) for c in combinations(range(10), pages)), default=0)
                assert abs(float(got[r]) - best / len(toks)) < 1e-6, (trial, pages, r)
    assert float(page_recall_bound(torch.full((1, 4), -1), 2)[0]) == 1.0     # an empty row
    with pytest.raises(ValueError, match="^pages"):
        page_recall_bound(ref, -1)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")     # garbage bytes in unused cache slots
def test_decode_bench_shape_plumbing_on_the_cpu(monkeypatch):
    """The decode bench's captures, recalls, interleaved timing rounds and speed-ups on a tiny shape
    through the Triton interpreter, with the GPU-only CUDA graph and timing calls replaced: each
    timer returns the next tick, so a round's figures follow the order the timers run in."""
    from misa import bench_decode
    ticks = iter(range(1, 1000))
    calls = []
    host_timed = []
    monkeypatch.setattr(bench, "_time", lambda fn, rep_ms: (calls.append(fn), fn(), float(next(ticks)))[2])
    monkeypatch.setattr(bench, "_time_host", lambda fn, rep_ms: (calls.append(fn), host_timed.append(fn), fn(),
                                                                 float(next(ticks)))[3])
    monkeypatch.setattr(bench_decode, "_graph", lambda fn: (fn(), fn)[1])
    cfg = bench_decode.DecodeBenchConfig(heads=16, head_dim=32, k=64, block_ks=(2, 64), stage1_k=128, distinct=1,
                                         rep_ms=2, rounds=2)
    row = bench_decode.bench_shape(cfg, 1, 600, 1, torch.device("cpu"), FakeDeepGemm())
    timed = ["dsa.logits_ms", "dsa.graph_ms", "dsa.eager_ms", "deepgemm.logits_ms", "deepgemm.graph_ms",
             "deepgemm-ourtopk.graph_ms", "hisa-m2.graph_ms", "hisa-m2.eager_ms", "hisa-m64.graph_ms", "hisa-m64.eager_ms",
             "f32-pooled.hisa-m64.graph_ms", "misa-h8.graph_ms", "misa-h8.eager_ms", "misa-dagger-h8.graph_ms",
             "misa-dagger-h8.eager_ms"]
    eager = [name[:-len(".eager_ms")] for name in timed if name.endswith(".eager_ms")]
    timed += [f"{method}.replay_wall_ms" for method in eager]
    assert list(row["ms_rounds"]) == timed and len(calls) == 2 * len(timed)
    # the checked (eager) calls by wall clock, host work included, and their graphs' replays timed the
    # same way beside them; the graphs and kernels by CUDA events
    assert len(host_timed) == 2 * 2 * len(eager)
    assert all(isinstance(fn, bench.HostTimed) for fn in host_timed)
    for method in eager:
        assert calls[timed.index(f"{method}.replay_wall_ms")].fn is calls[timed.index(f"{method}.graph_ms")]
        assert row[f"{method}.eager_overhead_ms"] == row[f"{method}.eager_ms"] - row[f"{method}.replay_wall_ms"]
    for i, name in enumerate(timed):            # interleaved: round r times every method before round r + 1
        assert row["ms_rounds"][name] == [i + 1.0, len(timed) + i + 1.0]
        assert row[name] == len(timed) / 2 + i + 1.0                     # the median of its two rounds
    assert row["best-dense.graph_ms"] == min(row[n] for n in ("dsa.graph_ms", "deepgemm.graph_ms",
                                                              "deepgemm-ourtopk.graph_ms"))
    for m in (2, 64):
        assert row[f"hisa-m{m}.speedup"] == row["dsa.graph_ms"] / row[f"hisa-m{m}.graph_ms"]
        assert row[f"hisa-m{m}.speedup_vs_best_dense"] == row["best-dense.graph_ms"] / row[f"hisa-m{m}.graph_ms"]
        assert 0.0 < row[f"hisa-m{m}.recall_mean"] <= row[f"hisa-m{m}.oracle_recall_mean"] + 1e-9
    assert row["hisa-m64.recall_mean"] == 1.0          # 64 pages cover 600 tokens: the dense path
    assert 0.0 < row["misa-h8.recall_mean"] <= 1.0 and 0.0 < row["misa-dagger-h8.recall_min"] <= 1.0
    assert row["dsa.logits_GBps"] > 0 and row["deepgemm.logits_GBps"] > 0
    # the baseline's logits agree with ours where a row has keys, and it selects what DSA selects
    assert row["deepgemm.logits_max_rel_err"] < 1e-5 and row["deepgemm.recall_mean"] == 1.0
    assert row["deepgemm-ourtopk.recall_mean"] == 1.0
    with pytest.raises(ValueError, match="^rounds:"):
        bench_decode.DecodeBenchConfig(rounds=0)


class FakeDeepGemm:
    """DeepGEMM's paged-logits contract as its own test states it, computed in float64: row ``(b, j)``
    scores the first ``context_lens[b, j]`` keys of sequence ``b`` with ``sum_h w * relu(q_h . k)``;
    the rest of the row is left as it was (garbage here, large enough to win a top-k)."""

    def __init__(self):
        self.calls = []

    def get_paged_mqa_logits_metadata(self, context_lens, block_kv, num_sms):
        assert context_lens.dtype == torch.int32 and context_lens.dim() == 2 and context_lens.is_contiguous()
        assert block_kv == 64
        return torch.zeros(num_sms + 1, 2, dtype=torch.int32)

    def fp8_paged_mqa_logits(self, q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                             clean_logits):
        import misa
        self.calls.append(max_context_len)
        b, n, h, _ = q.shape
        assert q.is_contiguous() and weights.dtype == torch.float32 and weights.shape == (b * n, h)
        assert block_table.dtype == torch.int32 and not clean_logits and context_lens.shape == (b, n)
        out = torch.rand(b * n, max_context_len, generator=torch.Generator().manual_seed(len(self.calls))) * 1e6
        for i in range(b):
            for j in range(n):
                length = int(context_lens[i, j])
                keys = misa.dequantize_keys(*misa.read_paged_kcache(kv_cache, block_table[i], length)).double()
                scores = (q[i, j].double() @ keys.T).relu() * weights[i * n + j].double()[:, None]
                out[i * n + j, :length] = scores.sum(0).float()
        return out


@pytest.mark.parametrize("lens,next_n,k", [([5, 700, 1000], 2, 64), ([300, 129], 1, 32)])
def test_deepgemm_baseline_selects_what_dsa_selects(lens, next_n, k, monkeypatch):
    # the decode bench's DeepGEMM baseline: per-row context lengths, the rows' tails masked, top-k;
    # a sequence shorter than k keeps all its tokens, -1 padded
    from misa.bench_decode import DeepGemmDense
    from misa.ops.topk import triton_rows
    short = []
    real = triton_rows.short_rows_topk
    monkeypatch.setattr(triton_rows, "short_rows_topk", lambda *a, **kw: short.append(1) or real(*a, **kw))
    from helpers import as_sets, paged_batch_on
    import misa
    _, q, w, cache, table, clens = paged_batch_on("cpu", lens, next_n, 16, 32, seed=5)
    dg = DeepGemmDense(FakeDeepGemm(), q, cache, w, clens, table, k)
    want = misa.paged_dsa_select(q, cache, w, clens, table, k=k, backend="reference")
    got = dg.positions()
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert as_sets(got) == as_sets(want)
    assert dg.width == table.shape[1] * 64 and dg.dg.calls == [dg.width]
    ours = dg.select_our_topk()                      # our top-k on its logits: the tails past each row's end unread
    assert ours.dtype == torch.int32 and ours.shape == want.shape and as_sets(ours) == as_sets(want)
    assert short == [1]             # rows this short take the one-launch top-k, as the selectors do


@pytest.mark.parametrize("behaviour,why", [
    ("crash", "killed by signal 11"), ("raise", "exit 1: RuntimeError: no kernel for this card"),
    ("missing", "has no fp8_paged_mqa_logits"), ("works", None)])
def test_deepgemm_is_probed_in_a_child_process(tmp_path, monkeypatch, behaviour, why):
    # a deep_gemm whose schedule metadata crashes the process (as a build on the card did) or
    # raises is reported, and the bench goes on without it; a working one is returned
    from misa import bench_decode
    body = {"crash": "import os, signal\n    os.kill(os.getpid(), signal.SIGSEGV)",
            "raise": "raise RuntimeError('no kernel for this card')", "works": "return None", "missing": "return None"}
    src = f"def get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms):\n    {body[behaviour]}\n"
    if behaviour != "missing":
        src += "def fp8_paged_mqa_logits(*args):\n    pass\n"
    (tmp_path / "deep_gemm.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delitem(sys.modules, "deep_gemm", raising=False)
    module, got = bench_decode.load_deepgemm("cpu")
    if why is None:
        assert got is None and module.__name__ == "deep_gemm"
    else:
        assert module is None and why in got, got
