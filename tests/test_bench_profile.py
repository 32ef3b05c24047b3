"""``misa bench --profile`` on any machine: kernel times summed per call, its tables, its plumbing
through the interpreter with the profiler replaced (``tests/test_bench.py`` profiles a GPU)."""
import pytest
import torch

from misa import bench_profile as bp
from misa.bench import BenchConfig
from misa.cli import main
from tests.test_bench_table import _check_width


def test_kernel_times_sum_each_kernels_launches_per_call_slowest_first():
    events = [("_select_kernel", 30.0), ("_mqa_logits_kernel", 500.0), ("_mqa_logits_kernel", 20.0),
              ("_select_kernel", 34.0), ("_mqa_logits_kernel", 480.0), ("_mqa_logits_kernel", 22.0),
              ("void at::native::fill", 4.0)]
    rows = bp.kernel_times(events, calls=2)
    assert [r.name for r in rows] == ["_mqa_logits_kernel", "_select_kernel", "void at::native::fill"]
    assert [r.us for r in rows] == [511.0, 32.0, 2.0]
    assert [r.launches for r in rows] == [2.0, 1.0, 0.5]
    assert [r.stage for r in rows] == [bp.STAGES["_mqa_logits_kernel"], "top-k: select", "-"]
    long = "void at::native::elementwise_kernel<128, 2, " + "x" * 300 + ">(int)"
    assert bp.short_name(long) == "void at::native::elementw<...>"
    assert bp.short_name("y" * 60) == "y" * 25 + "<...>" and bp.short_name("_cut_kernel") == "_cut_kernel"
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="calls"):
            bp.kernel_times(events, bad)


def test_profile_needs_a_gpu_and_says_so(capsys):
    with pytest.raises(ValueError, match="^device"):
        bp.profile_selectors(BenchConfig(context_lens=(4096,)), torch.device("cpu"))
    assert main(["bench", "--profile", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("misa: error: device:")


def test_profile_plumbing_on_the_cpu(monkeypatch):
    """Every row's selector (other-dtype rows included) runs through the interpreter and gets its
    table; the profiler and the timer are replaced by fakes that still call the selector."""
    ran = []

    def fake_events(fn, calls):
        for _ in range(calls):
            ran.append(fn().clone())
        return [("_select_kernel", 10.0)] * calls + [("_mqa_logits_kernel", 40.0)] * (2 * calls)

    monkeypatch.setattr(bp, "_kernel_events", fake_events)
    monkeypatch.setattr(bp, "_time", lambda fn, rep_ms: (fn(), 0.125)[1])
    dtypes = []
    build = bp._selector

    def recording_selector(*a):
        sel = build(*a)
        dtypes.append(sel.logits_dtype)
        return sel

    monkeypatch.setattr(bp, "_selector", recording_selector)
    cfg = BenchConfig(num_queries=8, context_lens=(128, 256), heads=16, k=16, active_heads=4, block_size=64,
                      stage1_k=32, hisa_block_size=32, hisa_block_k=4, rep_ms=2, rounds=1,
                      methods=("misa", "misa-dagger", "hisa"), compare_logits_dtypes=True)
    methods = bp._profile_methods(cfg, torch.device("cpu"), calls=3)
    assert list(methods) == ["dsa", "dsa-bf16", "misa", "misa-bf16", "misa-dagger", "misa-dagger-f32", "hisa"]
    assert len(ran) == 3 * len(methods)
    f32, b16 = torch.float32, torch.bfloat16
    assert dtypes == [f32, b16, f32, b16, b16, f32, f32]       # each row's logits dtype
    for out in ran:                                 # k keys a query, at the largest context
        assert out.shape == (8, 16) and 0 <= int(out.min()) and int(out.max()) < 256
    assert max(int(out.max()) for out in ran) >= 128
    for m in methods.values():
        assert m["ms"] == 0.125
        assert [(k["name"], k["us"], k["launches"]) for k in m["kernels"]] == [
            ("_mqa_logits_kernel", 80.0, 2.0), ("_select_kernel", 10.0, 1.0)]
    result = {"config": {"num_queries": 8}, "seq_len": 256, "calls": 3, "methods": methods}
    tables = bp.profile_tables(result)
    assert len(tables) == len(methods)
    assert tables[0].rows[-2] == ["all kernels", "", "90.0", ""]
    assert tables[0].rows[-1] == ["the call (do_bench)", "", "125.0", ""]
    from misa.cli import text_table
    for t in tables:
        _check_width(text_table(t.title, t.columns, t.rows, left=t.left))
