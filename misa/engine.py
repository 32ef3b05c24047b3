"""MISA with the argument conventions of vLLM's and SGLang's DSA indexer path.

Engines score the indexer with DeepGEMM and then take a per-row top-k:

    prefill  logits = fp8_mqa_logits(q_fp8, (k_fp8, k_scale), weights, cu_seqlen_ks, cu_seqlen_ke)
             top-k per row inside [ks, ke)  -> positions relative to cu_seqlen_ks, -1 padded
    decode   logits = fp8_paged_mqa_logits(q_fp8, kv_cache, weights, context_lens, block_table, ...)
             top-k per row                  -> positions inside the sequence, -1 padded

``prefill_select`` and ``decode_select`` take the same tensors and return those same int32 index
tensors, selected by the ``MisaConfig`` variant (MISA by default), so they replace both calls.
Shapes: ``q_fp8 [T, H, D]`` float8_e4m3fn with its per-(token, head) scale folded into
``weights [T, H]`` float32; keys ``(k_fp8 [S, D], k_scale [S] float32)`` (vLLM keeps the scales as
``uint8 [S, 4]``: pass ``k_scale.view(torch.float32).squeeze(-1)``); the paged cache is DeepGEMM's
(``[num_blocks, 64, 1, D + 4]`` uint8, or vLLM's ``[num_blocks, 64, D + 4]`` view of it).

``prefill_select`` and ``decode_select`` validate their inputs (one device read) and are for eager
use; inside a CUDA graph, call a selector built once: ``misa.engine.PrefillSelector`` for prefill
chunks of a fixed largest shape, ``misa.engine.DecodeSelector`` for decode (docs/integration.md).

On a packed prefill chunk (several sequences' keys concatenated) the router's key blocks are cut
from the packed buffer, so a block may straddle two sequences; MISA's published code pools the
same way, and each query still only scores and selects keys inside its own ``[ks, ke)``.
"""
from __future__ import annotations

import torch

from .config import MisaConfig, as_misa_config
from .decode import DecodeSelector  # noqa: F401  (the CUDA-graph path of decode; docs/integration.md)
from .prefill import PrefillSelector  # noqa: F401  (the CUDA-graph path of prefill chunks)
from .validate import check_int, check_tensor


def prefill_select(q_fp8, kv, weights, cu_seqlen_ks, cu_seqlen_ke, topk_tokens: int,
                   config: MisaConfig | None = None, *, relative: bool = True) -> torch.Tensor:
    """Ragged prefill: ``[T, topk_tokens]`` int32, -1 padded.

    Query ``t`` sees packed keys ``[cu_seqlen_ks[t], cu_seqlen_ke[t])``. Positions are relative to
    ``cu_seqlen_ks[t]`` (the token's position inside its own sequence, what vLLM's
    ``top_k_per_row_prefill`` writes); ``relative=False`` gives positions in the packed buffer.
    """
    check_int("topk_tokens", topk_tokens)
    idx = as_misa_config(config).select(q_fp8, kv, weights, cu_seqlen_ks, cu_seqlen_ke, topk_tokens)
    if not relative:
        return idx
    return torch.where(idx >= 0, idx - cu_seqlen_ks[:, None], idx).int()


def decode_select(q_fp8, kv_cache, weights, context_lens, block_table, topk_tokens: int,
                  config: MisaConfig | None = None) -> torch.Tensor:
    """Paged decode: ``q_fp8 [B, next_n, H, D]``, ``weights [B * next_n, H]``, ``block_table [B, P]``
    int32 and ``context_lens`` int32 ``[B]`` (tokens in the cache, the ``next_n`` new ones included)
    or ``[B, next_n]`` (vLLM's per-token form: query ``i`` sees ``context_lens[b, i]`` keys, which must
    be ``context_lens[b, -1] - next_n + 1 + i``). Returns ``[B * next_n, topk_tokens]`` int32
    positions inside each sequence, -1 padded; the active heads are ``decode_active_heads``."""
    check_int("topk_tokens", topk_tokens)
    check_tensor("q_fp8", q_fp8, 4)
    check_tensor("context_lens", context_lens, None, (torch.int32,))
    if context_lens.ndim == 2:
        next_n = q_fp8.shape[1]
        if context_lens.shape[1] != next_n:
            raise ValueError(f"context_lens: expected [B] or [B, {next_n}], got {tuple(context_lens.shape)}")
        last = context_lens[:, -1:]
        expected = last - next_n + 1 + torch.arange(next_n, device=context_lens.device, dtype=torch.int32)
        if not torch.equal(context_lens, expected):
            raise ValueError("context_lens: per-token lengths must grow by one along next_n "
                             "(query i of a sequence sees one more key than query i - 1)")
        context_lens = last[:, 0].contiguous()
    elif context_lens.ndim != 1:
        raise ValueError(f"context_lens: expected [B] or [B, next_n], got {tuple(context_lens.shape)}")
    check_tensor("kv_cache", kv_cache)
    if kv_cache.ndim == 3:   # vLLM's [num_blocks, block_size, D + 4] allocation
        kv_cache = kv_cache.unsqueeze(-2)
    return as_misa_config(config).paged_select(q_fp8, kv_cache, weights, context_lens, block_table,
                                               topk_tokens)
