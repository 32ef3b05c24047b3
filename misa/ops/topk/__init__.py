"""Top-k inside each row's ``[ks, ke)``. ``reference.py`` in PyTorch (ties to the lowest column);
``triton.py`` the three-launch radix/sample top-k for long rows, ``triton_rows.py`` the one-launch
top-k for short rows (imported on first use: Triton is optional)."""
from .reference import select_topk, topk_indices

__all__ = ["select_topk", "topk_indices"]
