"""Every kernel launch the library ships compiles for Hopper (sm_90), on any machine.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (a loop-carried
variable that changes type, for one). Triton compiles to PTX and cubin without a GPU, with the
ptxas its CUDA backend ships; the compile runs in a fresh process because this test session
imports the kernels in interpreter mode. hopper_compile.py records the launches of the library's
entry points with the shipped configs and compiles each distinct one.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def _ptxas() -> bool:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return bool(os.environ.get("TRITON_PTXAS_PATH")
                or any((bin_dir / name).exists() for name in ("ptxas", "ptxas-blackwell")))


@pytest.mark.skipif(not _ptxas(), reason="no ptxas: no CUDA backend in this Triton (nor TRITON_PTXAS_PATH)")
def test_every_shipped_launch_compiles_for_hopper():
    root = Path(__file__).parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MISA_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, str(root / "tests" / "hopper_compile.py")], env=env, cwd=root,
                         capture_output=True, text=True, timeout=1800)
    out = res.stdout
    assert res.returncode == 0 and "FAIL" not in out, out[-6000:] + res.stderr[-3000:]
    n = int(out.split("variants: ")[1].split()[0])
    ok = [line for line in out.splitlines() if line.startswith("ok   ")]
    assert len(ok) == n, out                    # every variant listed compiled, none skipped
    for kernel in ("_mqa_logits_kernel", "_paged_logits_kernel", "_gather_logits_kernel", "_pool_keys_kernel",
                   "_paged_pool_keys_kernel", "_route_kernel", "_cut_kernel", "_compact_kernel", "_select_kernel",
                   "_break_ties_kernel"):
        assert any(line.split()[1] == kernel for line in ok), kernel
