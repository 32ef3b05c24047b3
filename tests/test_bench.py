"""``misa bench``: its arguments on any machine; a small run of every method on a GPU."""
import pytest
import torch

from misa.bench import METHODS, BenchConfig, format_rows, run_bench
from misa.bench_profile import profile_selectors


def test_bad_methods_and_devices_name_the_argument():
    with pytest.raises(ValueError, match="methods"):
        BenchConfig(methods=("dsa", "fast"))
    with pytest.raises(ValueError, match="rounds"):
        BenchConfig(rounds=0)
    with pytest.raises(ValueError, match="device"):
        run_bench(BenchConfig(context_lens=(4096,)), torch.device("cpu"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the GPU kernels")
def test_every_method_runs():
    cfg = BenchConfig(num_queries=512, context_lens=(20000,), k=256, stage1_k=1024, rep_ms=6, rounds=2,
                      methods=METHODS)
    res = run_bench(cfg, torch.device("cuda"), progress=False)
    row = res["rows"][0]
    # every timer ran in each interleaved round, and the reported time is their median
    assert set(row["ms_rounds"]) == set(row["ms"])
    for name, times in row["ms_rounds"].items():
        assert len(times) == 2 and min(times) <= row["ms"][name] <= max(times), name
    for name in ("misa", "misa-gap", "misa-dagger", "hisa"):
        assert 0.0 < row[name + ".recall"] <= 1.0, name
    assert row["misa-dagger.recall"] >= row["misa.recall"] - 0.01
    cols, rows = format_rows(res)
    assert len(rows[0]) == len(cols)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="profiles the GPU kernels")
def test_profile_finds_each_methods_kernels():
    cfg = BenchConfig(num_queries=256, context_lens=(20000,), k=256, stage1_k=1024, rep_ms=5,
                      methods=("misa", "misa-dagger", "hisa"))
    res = profile_selectors(cfg, torch.device("cuda"), calls=4)
    kernels = {name: {k["name"]: k for k in m["kernels"]} for name, m in res["methods"].items()}
    for name in ("dsa", "misa", "misa-dagger"):
        assert {"_mqa_logits_kernel", "_select_kernel"} <= set(kernels[name]), name
    assert "_route_kernel" not in kernels["dsa"] and "_gather_logits_kernel" not in kernels["misa"]
    assert kernels["misa"]["_route_kernel"]["launches"] == 1.0
    assert "_gather_logits_kernel" in kernels["misa-dagger"]
    for name, m in res["methods"].items():
        total_us = sum(k["us"] for k in m["kernels"])
        assert 0 < total_us and m["ms"] > 0, name
        # every kernel profiled runs inside the call: their sum cannot exceed it by much
        assert total_us <= 1.5e3 * m["ms"], name
