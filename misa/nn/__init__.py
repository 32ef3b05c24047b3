"""Indexer modules and HF transformers patching: MISA where a model runs DSA's indexer."""
from .hadamard import hadamard_transform
from .hf import PatchedIndexer, patch_model, unpatch_model
from .indexer import DSAIndexer, MISAIndexer, apply_rope, rope_freqs_cis

__all__ = ["DSAIndexer", "MISAIndexer", "hadamard_transform", "apply_rope", "rope_freqs_cis",
           "patch_model", "unpatch_model", "PatchedIndexer"]
