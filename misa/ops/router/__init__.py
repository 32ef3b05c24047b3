"""MISA's router: keys mean-pooled in blocks, per-head statistics over the visible blocks, top-h
heads per query. ``reference.py`` in PyTorch (every statistic); ``triton.py`` the pooling and
routing kernels (abs-sum and gap), imported on first use (Triton is optional)."""
from .reference import ROUTER_STATISTICS, head_router_scores, pool_keys, top_heads, visible_blocks

__all__ = ["ROUTER_STATISTICS", "head_router_scores", "pool_keys", "top_heads", "visible_blocks"]
