"""Ties at a row's k-th value broken by a finer score: a top-k of bfloat16 logits (``topk(...,
record_ties=True)``) meets keys whose logits round to the same bfloat16 value; their float32 scores
(all heads, or each query's routed heads) pick which of them it keeps, so the selection is the
float32 logits' selection up to keys whose float32 scores differ only in the fp8 MMAs' last bits
(the two kernels' MMAs have different shapes). ``reference.py`` in PyTorch, ``triton.py`` the kernel."""
from .reference import break_ties

__all__ = ["break_ties"]
