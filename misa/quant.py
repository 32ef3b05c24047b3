"""fp8 quantisation as the DSA engines do it, and the paged index-K cache layout.

Keys: one float8_e4m3fn vector per token plus one float32 scale, ``scale = max(amax, 1e-4) / 448``,
optionally rounded up to a power of two ("ue8m0", as DeepSeek-V3.2's inference code does).
Queries: one scale per (token, head), folded into the head weights; this is exact for the indexer
because ``w * relu(s * x) == (w * s) * relu(x)`` for ``s > 0``.

Paged cache: pages of ``PAGE_SIZE`` tokens. A page holds ``PAGE_SIZE * D`` fp8 values (token-major)
followed by ``PAGE_SIZE`` float32 scales, i.e. ``D + 4`` bytes per token (132 at D=128). The tensor is
uint8 ``[num_pages, PAGE_SIZE, 1, D + 4]`` like DeepGEMM's ``fp8_paged_mqa_logits`` takes it; only
its flat per-page byte order matters.

Pooled-key cache: bfloat16 ``[num_pages, D]`` beside the paged cache (``2 D`` bytes a page, 4 bytes
per token at D = 128; float32 is accepted too), row ``p`` the sum of the dequantised keys (``fp8
value * scale``) of the page's tokens, summed in float32 and rounded once. Readers derive a page's
token count from the sequence's context length: its mean key is ``pooled[p] / count``.
``write_paged_kcache`` keeps it current; ``misa.pool_paged_kcache`` builds it from a cache
(``misa/ops/pool``).
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-4
PAGE_SIZE = 64
POOLED_DTYPE = torch.bfloat16
POOLED_DTYPES = (torch.bfloat16, torch.float32)


def _scale_from_amax(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    scale = amax.float().clamp_min(SCALE_FLOOR) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # |x / scale| <= 448 by construction; the clamp only absorbs the last-bit rounding of the division.
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_keys(k: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``k [S, D]`` float -> ``(k_fp8 [S, D] float8_e4m3fn, k_scale [S] float32)``."""
    if k.ndim != 2 or not k.is_floating_point():
        raise ValueError(f"k: expected a floating [S, D] tensor, got {tuple(k.shape)} {k.dtype}")
    scale = _scale_from_amax(k.abs().amax(dim=-1), ue8m0)
    return _to_fp8(k, scale[:, None]), scale


def dequantize_keys(k_fp8: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """The key the logit uses: ``k_fp8 * k_scale``, float32 ``[S, D]``."""
    return k_fp8.float() * k_scale.float()[:, None]


def quantize_queries(q: torch.Tensor, weights: torch.Tensor, ue8m0: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [T, H, D]``, ``weights [T, H]`` -> ``(q_fp8 [T, H, D], weights * q_scale [T, H] float32)``."""
    if q.ndim != 3 or not q.is_floating_point():
        raise ValueError(f"q: expected a floating [T, H, D] tensor, got {tuple(q.shape)} {q.dtype}")
    if weights.shape != q.shape[:2]:
        raise ValueError(f"weights: expected shape {tuple(q.shape[:2])}, got {tuple(weights.shape)}")
    scale = _scale_from_amax(q.abs().amax(dim=-1), ue8m0)
    return _to_fp8(q, scale[..., None]), weights.float() * scale


# ---------------------------------------------------------------------------------------------
# Paged index-K cache
# ---------------------------------------------------------------------------------------------

def paged_bytes_per_token(head_dim: int) -> int:
    return head_dim + 4


def new_paged_kcache(num_pages: int, head_dim: int, device=None) -> torch.Tensor:
    """An uninitialised cache ``[num_pages, PAGE_SIZE, 1, head_dim + 4]`` uint8."""
    return torch.empty(num_pages, PAGE_SIZE, 1, head_dim + 4, dtype=torch.uint8, device=device)


def paged_head_dim(cache: torch.Tensor) -> int:
    """D of a paged cache ``[num_pages, PAGE_SIZE, 1, D + 4]`` uint8, checked from its shape alone
    (the checked decode functions call this every step: no views made)."""
    if cache.dtype != torch.uint8 or cache.ndim < 2 or cache.shape[1] != PAGE_SIZE:
        raise ValueError(f"kv_cache: expected uint8 [num_pages, {PAGE_SIZE}, 1, D + 4], "
                         f"got {tuple(cache.shape)} {cache.dtype}")
    if not cache.is_contiguous():
        raise ValueError("kv_cache: must be contiguous")
    per_page = math.prod(cache.shape[1:])
    head_dim = per_page // PAGE_SIZE - 4
    if head_dim <= 0 or per_page != PAGE_SIZE * (head_dim + 4):
        raise ValueError(f"kv_cache: page of {per_page} bytes is not {PAGE_SIZE} * (D + 4)")
    return head_dim


def _page_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Views of a cache as (values ``[P, PAGE_SIZE, D]`` uint8, scales ``[P, PAGE_SIZE]`` float32, D)."""
    head_dim = paged_head_dim(cache)
    num_pages = cache.shape[0]
    flat = cache.view(num_pages, PAGE_SIZE * (head_dim + 4))
    values = flat[:, : PAGE_SIZE * head_dim].view(num_pages, PAGE_SIZE, head_dim)
    scales = flat[:, PAGE_SIZE * head_dim:].view(torch.float32)  # [P, PAGE_SIZE]
    return values, scales, head_dim


def new_pooled_kcache(num_pages: int, head_dim: int, device=None, dtype: torch.dtype = POOLED_DTYPE) -> torch.Tensor:
    """A pooled-key cache ``[num_pages, head_dim]`` of zeros, bfloat16 (default) or float32 (see the
    module docstring)."""
    check_pooled_dtype(dtype)
    return torch.zeros(num_pages, head_dim, dtype=dtype, device=device)


def check_pooled_dtype(dtype: torch.dtype) -> None:
    if dtype not in POOLED_DTYPES:
        raise ValueError(f"dtype: the pooled-key cache is bfloat16 or float32, got {dtype}")


def check_pooled(pooled, num_pages: int, head_dim: int, device: torch.device) -> None:
    """``pooled``: a pooled-key cache for ``num_pages`` pages of ``head_dim``, on ``device``."""
    if not isinstance(pooled, torch.Tensor):
        raise ValueError(f"pooled: expected a torch.Tensor, got {type(pooled).__name__}")
    if pooled.dtype not in POOLED_DTYPES or tuple(pooled.shape) != (num_pages, head_dim):
        raise ValueError(f"pooled: expected bfloat16 or float32 [{num_pages}, {head_dim}] (one row per cache page), "
                         f"got {tuple(pooled.shape)} {pooled.dtype}")
    if pooled.device != device:
        raise ValueError(f"pooled: on {pooled.device}, kv_cache on {device}")


def write_paged_kcache(cache: torch.Tensor, slot_mapping: torch.Tensor, k_fp8: torch.Tensor,
                       k_scale: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
    """Store tokens at cache slots (``slot = page * PAGE_SIZE + offset``), as engines do at prefill.

    With ``pooled`` (``misa.new_pooled_kcache``), also keep the pooled-key cache current: each page
    the call writes to is re-summed from the cache up to the highest offset the call writes on it
    (tokens are appended in order, so that is the page's last token; a page written from offset 0
    again, e.g. freed and reused, holds only its new tokens; a slot written twice, e.g. a rejected
    speculative token, counts once). On the kernels this is a sort of the slots and one launch
    reading the written pages (``misa/ops/pool``), with no host sync. All arguments are checked
    before anything is written.
    """
    values, scales, head_dim = _page_views(cache)
    if k_fp8.dtype != FP8 or k_fp8.ndim != 2 or k_fp8.shape[1] != head_dim:
        raise ValueError(f"k_fp8: expected float8_e4m3fn [N, {head_dim}], got {tuple(k_fp8.shape)} {k_fp8.dtype}")
    if k_scale.shape != k_fp8.shape[:1] or k_scale.dtype != torch.float32:
        raise ValueError("k_scale: expected float32 [N] matching k_fp8")
    if slot_mapping.shape != k_fp8.shape[:1]:
        raise ValueError("slot_mapping: expected [N] matching k_fp8")
    if pooled is not None:
        check_pooled(pooled, values.shape[0], head_dim, cache.device)
    slots = slot_mapping.long()
    if slots.numel() and (slots.min() < 0 or slots.max() >= values.shape[0] * PAGE_SIZE):
        raise ValueError("slot_mapping: slot outside the cache")
    page, offset = slots // PAGE_SIZE, slots % PAGE_SIZE
    values[page, offset] = k_fp8.view(torch.uint8)
    scales[page, offset] = k_scale
    if pooled is not None and slots.numel():
        from .ops import pool
        pool.repool_written_pages(cache, pooled, slots)


def read_paged_kcache(cache: torch.Tensor, block_table_row: torch.Tensor, length: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` tokens of one sequence: ``(k_fp8 [length, D], k_scale [length])``."""
    values, scales, head_dim = _page_views(cache)
    pages = -(-length // PAGE_SIZE)
    if pages > block_table_row.numel():
        raise ValueError(f"block_table: {length} tokens need {pages} pages, the row has {block_table_row.numel()}")
    ids = block_table_row[:pages].long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= values.shape[0]):
        raise ValueError("block_table: page id outside the cache")
    k = values[ids].reshape(-1, head_dim)[:length].view(FP8)
    s = scales[ids].reshape(-1)[:length]
    return k, s


def build_paged_kcache(keys: list[tuple[torch.Tensor, torch.Tensor]], extra_pages: int = 0,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack sequences ``[(k_fp8 [L_b, D], k_scale [L_b])]`` into a cache with shuffled pages.

    Returns ``(kv_cache, block_table [B, max_pages] int32, context_lens [B] int32)``; unused table
    entries are 0, as engines leave them. Pages are handed out in a random order so that readers
    which ignore the block table fail tests.
    """
    if not keys:
        raise ValueError("keys: need at least one sequence")
    head_dim = keys[0][0].shape[1]
    device = keys[0][0].device
    pages_per_seq = [-(-k.shape[0] // PAGE_SIZE) for k, _ in keys]
    total = sum(pages_per_seq) + extra_pages
    order = torch.randperm(max(total, 1), generator=generator).to(device)
    cache = new_paged_kcache(max(total, 1), head_dim, device)
    cache.random_(0, 256)  # garbage where nothing is written: a reader that strays reads noise
    table = torch.zeros(len(keys), max(max(pages_per_seq), 1), dtype=torch.int32, device=device)
    lens = torch.tensor([k.shape[0] for k, _ in keys], dtype=torch.int32, device=device)
    start = 0
    for b, ((k, s), n) in enumerate(zip(keys, pages_per_seq)):
        ids = order[start:start + n]
        start += n
        table[b, :n] = ids.int()
        slots = (ids[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE, device=device)).reshape(-1)[: k.shape[0]]
        write_paged_kcache(cache, slots, k, s)
    return cache, table, lens
