"""Top-k inside each row's ``[ks, ke)``. ``reference.py`` in PyTorch (ties to the lowest column);
``triton.py`` the three-launch radix/sample top-k for long rows, ``triton_rows.py`` the one-launch
top-k for short rows (imported on first use: Triton is optional); ``topk_launch`` prepares
whichever fits a row width once, for calls without allocation."""
from .launches import topk_launch
from .reference import select_topk, topk_indices

__all__ = ["select_topk", "topk_indices", "topk_launch"]
