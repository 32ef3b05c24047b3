"""Re-scoring of each query's candidate keys with all heads (MISA-dagger's second stage, HISA's
exact stage): ``reference.py`` in PyTorch, ``triton.py`` the gathered kernel."""
from .reference import gather_logits, paged_rescore, rerank

__all__ = ["gather_logits", "paged_rescore", "rerank"]
