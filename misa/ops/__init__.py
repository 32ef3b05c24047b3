"""One folder per operation: ``reference.py`` (the math in plain PyTorch) beside its kernels."""
from __future__ import annotations

import functools


def power_of_two(n: int) -> bool:
    """The kernels tile heads, (query, head) pairs and the head dimension by powers of two."""
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def kernels_available() -> bool:
    """True when Triton imports and the kernel modules are present."""
    try:
        import triton  # noqa: F401
        from .dsa import triton as _  # noqa: F401
    except ImportError:
        return False
    return True
