"""MISA: a mixture-of-experts view of DeepSeek Sparse Attention's lightning indexer.

A cheap router over block-pooled keys picks a few indexer heads per query and only those score the
tokens; MISA-dagger re-ranks a larger candidate set with all heads. Training-free: the same ``q``,
``k`` and ``weights`` as DSA. See SPEC.md (shipped as docs) for the math and layouts.
"""
from . import engine, nn
from .api import dsa_logits, dsa_select, hisa_select, misa_select, route_heads, topk_indices
from .calibration import Calibration, CostTable, calibrate
from .config import MisaConfig
from .decode import DecodeSelector
from .prefill import PrefillSelector
from .metrics import recall
from .nn import DSAIndexer, MISAIndexer, hadamard_transform, patch_model, unpatch_model
from .paged import (paged_dsa_logits, paged_dsa_select, paged_hisa_select, paged_misa_select,
                    paged_route_heads)
from .ops.pool import pool_paged_kcache
from .quant import (PAGE_SIZE, build_paged_kcache, dequantize_keys, new_paged_kcache, new_pooled_kcache,
                    quantize_keys, quantize_queries, read_paged_kcache, write_paged_kcache)

__version__ = "0.1.0"

__all__ = [
    "dsa_logits", "topk_indices", "dsa_select", "route_heads", "misa_select", "hisa_select",
    "paged_dsa_logits", "paged_dsa_select", "paged_route_heads", "paged_misa_select", "paged_hisa_select",
    "quantize_keys", "quantize_queries", "dequantize_keys", "PAGE_SIZE", "new_paged_kcache",
    "write_paged_kcache", "read_paged_kcache", "build_paged_kcache", "new_pooled_kcache", "pool_paged_kcache",
    "recall",
    "MisaConfig", "patch_model", "unpatch_model", "DSAIndexer", "MISAIndexer", "hadamard_transform",
    "engine", "nn", "DecodeSelector", "PrefillSelector", "calibrate", "Calibration", "CostTable",
]
