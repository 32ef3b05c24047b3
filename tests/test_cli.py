import subprocess
import sys

from misa.cli import main


def test_demo_prints_a_table(capsys):
    assert main(["demo", "--device", "cpu", "--seq-len", "1024", "--num-queries", "128", "--k", "64",
                 "--workload", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out
    for method in ("DSA", "MISA", "MISA (gap router)", "MISA-dagger", "HISA"):
        assert method in out
    assert "1.0000" in out          # DSA against itself


def test_bad_argument_is_a_clean_error(capsys):
    assert main(["demo", "--device", "cpu", "--seq-len", "100", "--num-queries", "200", "--workload", "synthetic"]) == 2
    assert "num_queries" in capsys.readouterr().err


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "misa.cli", "demo", "--help"], capture_output=True, text=True).stdout
    for opt in ("--device", "--seq-len", "--num-queries", "--k", "--seed"):
        assert opt in out
