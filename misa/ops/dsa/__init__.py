"""DSA's indexer logits: dense (all heads), routed (each query's heads, MISA's scoring) and paged
(decode over the paged cache). ``reference.py`` in PyTorch; ``triton.py`` (prefill) and
``paged_triton.py`` (decode) the kernels, imported on first use (Triton is optional)."""
from .reference import dsa_logits, gather_heads, head_scores, routed_logits, visible_mask

__all__ = ["dsa_logits", "gather_heads", "head_scores", "routed_logits", "visible_mask"]
