"""scripts/gpu_tests.sh runs the CUDA test files it finds with grep: every file that can reach the
card must be among them, or a GPU run silently leaves it out."""
import ast
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def reaches_the_card(path: pathlib.Path) -> bool:
    """Imports helpers' DEVICE or BIG (the card when there is one), names "cuda", or asks
    torch.cuda.is_available()."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "helpers":
            if {"DEVICE", "BIG"} & {a.name for a in node.names}:
                return True
        elif isinstance(node, ast.Constant) and node.value == "cuda":
            return True
        elif (isinstance(node, ast.Attribute) and node.attr == "is_available"
              and ast.unparse(node.value) == "torch.cuda"):
            return True
    return False


def test_gpu_test_script_finds_every_file_that_reaches_the_card():
    line = next(x for x in (ROOT / "scripts" / "gpu_tests.sh").read_text().splitlines() if x.startswith("files="))
    finder = re.search(r"\$\((grep .*?tests/test_\*\.py)", line).group(1)
    found = set(subprocess.run(["bash", "-c", finder], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split())
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if reaches_the_card(p)}
    assert "tests/test_kernels.py" in expected
    assert expected <= found, sorted(expected - found)


def test_gpu_test_script_names_the_tree_it_ran(tmp_path):
    # the summary names the code by a digest of the files on disk (a device copy's git metadata may
    # be stale): equal trees give equal digests, any edit to the package or the tests another
    import shutil

    def digest(root):
        return subprocess.run(["bash", str(root / "scripts" / "gpu_tests.sh"), "--digest"], capture_output=True,
                              text=True, check=True).stdout.strip()

    for part in ("misa", "tests", "scripts"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    here = digest(ROOT)
    assert re.fullmatch(r"[0-9a-f]{12}", here) and digest(tmp_path) == here
    helpers = (ROOT / "tests" / "helpers.py").read_text()
    (tmp_path / "tests" / "helpers.py").write_text(helpers + "\n# edit\n")
    assert digest(tmp_path) != here
    (tmp_path / "tests" / "helpers.py").write_text(helpers)
    assert digest(tmp_path) == here
    (tmp_path / "misa" / "extra.py").write_text("")
    assert digest(tmp_path) != here
