"""Re-scoring of each query's candidate keys with all heads (MISA-dagger's second stage, HISA's
exact stage): ``reference.py`` in PyTorch, ``triton.py`` the gathered kernel."""
from .reference import gather_logits, paged_rescore, rerank

# heads the paged re-scoring kernel takes: all heads' queries stay in registers beside a key tile
MAX_RESCORE_HEADS = 64

__all__ = ["MAX_RESCORE_HEADS", "gather_logits", "paged_rescore", "rerank"]
