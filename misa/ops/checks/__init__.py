"""Value checks of the prefill inputs in one pass: ``reference.py`` (PyTorch ops) and ``triton.py``
(one launch), both returning the same flag vector, read back by ``misa.validate`` in one transfer."""
from .reference import FLAGS, PAGED_FLAGS, input_flags, paged_flags

__all__ = ["FLAGS", "PAGED_FLAGS", "input_flags", "paged_flags"]
