import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

try:
    import torch
    if not torch.cuda.is_available():
        # kernels run through Triton's CPU interpreter; must be set before triton.jit runs
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture
def kernels_on(monkeypatch):
    """The documented override: every call without an explicit backend runs the kernels (through
    the interpreter on the CPU). Kernel test files use it for all their tests (pytestmark)."""
    monkeypatch.setenv("MISA_BACKEND", "triton")
