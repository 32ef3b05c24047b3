"""Block-pruned decode over the paged cache (HISA over pages): score each sequence's pooled key
blocks with all heads, keep the first, the last and the best ``m`` blocks, score their tokens
exactly. ``reference.py`` in PyTorch; ``triton.py`` the batched kernels (imported on first use:
Triton is optional). Prefill HISA's per-query block ranges and its forced first and last block
are here too (``prefill_block_ranges``, ``force_edge_blocks``), and its kept blocks' key positions
(``block_positions``)."""
from .reference import (block_positions, block_scores, chosen_block_logits, force_edge_blocks, kept_blocks,
                        prefill_block_ranges)

__all__ = ["block_scores", "chosen_block_logits", "kept_blocks", "prefill_block_ranges", "force_edge_blocks",
           "block_positions"]
