import re
import subprocess
import sys

import pytest
import torch

import misa
from misa.cli import main
from misa.synthetic import indexer_workload
from helpers import set_recall

METHODS = ["DSA", "MISA", "MISA (gap router)", "MISA\u2020", "HISA"]


def demo_table(out: str) -> dict[str, list[str]]:
    """The rows of the demo's table, ``{method: [setting, recall mean, recall min, ms]}``, in order:
    the lines between the dashed rule under the header and the next blank line, cells apart by two
    or more spaces."""
    rows, inside = {}, False
    for line in out.splitlines():
        if line.startswith("-----"):
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_prints_a_table(capsys):
    assert main(["demo", "--device", "cpu", "--seq-len", "1024", "--num-queries", "128", "--k", "64",
                 "--workload", "synthetic", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    # the options reached the workload (the header wraps at 80 columns)
    m = re.search(r"SYNTHETIC .* (\d+) heads x (\d+) dims, fp8; (\d+) causal queries at\s+the\s+end\s+of\s+a\s+"
                  r"(\d+)-token\s+context,\s+top-k\s+=\s+(\d+)", out, re.S)
    assert m, out
    heads, dim, nq, seq, k = map(int, m.groups())
    assert (nq, seq, k) == (128, 1024, 64)
    rows = demo_table(out)
    assert list(rows) == METHODS, rows
    for method, (setting, mean, low, ms) in rows.items():
        assert 0.0 <= float(low) <= float(mean) <= 1.0 and float(ms) > 0, method

    # every row recomputed from the settings it prints: the library's selections on the same workload,
    # recall by set intersection with DSA's
    h, b = map(int, re.fullmatch(r"h=(\d+), B=(\d+)", rows["MISA"][0]).groups())
    assert rows["MISA (gap router)"][0] == rows["MISA"][0]
    h1, b1, k1 = map(int, re.fullmatch(r"h=(\d+), B=(\d+), k1=(\d+)", rows["MISA\u2020"][0]).groups())
    hb, hm = map(int, re.fullmatch(r"B=(\d+), m=(\d+)", rows["HISA"][0]).groups())
    assert rows["DSA"][0] == f"all {heads} heads" and b1 == b
    args = indexer_workload(seq, nq, heads, dim, seed=3).args
    dsa = misa.dsa_select(*args, k=k)
    sel = {
        "DSA": dsa,
        "MISA": misa.misa_select(*args, k=k, active_heads=h, block_size=b, router="abs-sum"),
        "MISA (gap router)": misa.misa_select(*args, k=k, active_heads=h, block_size=b, router="gap"),
        "MISA\u2020": misa.misa_select(*args, k=k, active_heads=h1, block_size=b, stage1_k=k1, router="abs-sum"),
        "HISA": misa.hisa_select(*args, k=k, block_size=hb, block_k=hm),
    }
    for method, idx in sel.items():
        r = set_recall(idx, dsa)
        assert abs(float(rows[method][1]) - sum(r) / len(r)) <= 5.1e-5, method
        assert abs(float(rows[method][2]) - min(r)) <= 5.1e-5, method

    # what the numbers must be: 8 of the 64 heads lose tokens on this workload; MISA-dagger's k1 and
    # HISA's m * B candidates cover the whole 1024-token context here, so both re-score every token with
    # all heads and must pick exactly DSA's tokens
    assert h < heads and float(rows["MISA"][1]) < 0.95 and float(rows["MISA (gap router)"][1]) < 0.95
    assert k1 >= seq and hb * hm >= seq
    assert rows["MISA\u2020"][1:3] == ["1.0000", "1.0000"] and rows["HISA"][1:3] == ["1.0000", "1.0000"]
    # and MISA routing all heads is DSA
    assert min(set_recall(misa.misa_select(*args, k=k, active_heads=heads, block_size=b), dsa)) == 1.0


def test_bad_argument_is_a_clean_error(capsys):
    assert main(["demo", "--device", "cpu", "--seq-len", "100", "--num-queries", "200", "--workload", "synthetic"]) == 2
    assert "num_queries" in capsys.readouterr().err


@pytest.mark.parametrize("argv, name", [(["bench", "--decode", "--device", "cpu", "--decode-shapes", "64by4096"],
                                          "--decode-shapes"),
                                         (["bench", "--decode", "--device", "cpu", "--decode-shapes", "x4096"],
                                          "--decode-shapes")]
                         + ([(["bench", "--device", "cuda"], "--device")] if not torch.cuda.is_available() else []))
def test_bad_bench_arguments_name_the_option(argv, name, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"misa: error: {name}:")


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "misa.cli", "demo", "--help"], capture_output=True, text=True).stdout
    for opt in ("--device", "--seq-len", "--num-queries", "--k", "--seed"):
        assert opt in out
