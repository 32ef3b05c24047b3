"""Block-pruned decode over the paged cache (HISA over pages): score each sequence's pooled key
blocks with all heads, keep the first, the last and the best ``m`` blocks, score their tokens
exactly. ``reference.py`` in PyTorch; ``triton.py`` the two batched kernels (imported on first use:
Triton is optional)."""
from .reference import block_scores, chosen_block_logits, kept_blocks

__all__ = ["block_scores", "chosen_block_logits", "kept_blocks"]
