"""Decode selection for serving engines: built once, then called every step without host
synchronisation, allocation or Python loops over sequences, so an engine can capture it in a CUDA
graph and replay it with new ``q``, ``weights``, ``context_lens`` and ``block_table``.

    sel = misa.DecodeSelector("hisa", num_heads=64, head_dim=128, k=2048, max_batch=64,
                              max_context=131072, next_n=1, device="cuda", block_k=64)
    sel.check(q, kv_cache, weights, context_lens, block_table, pooled)   # optional: one sync
    idx = sel(q, kv_cache, weights, context_lens, block_table, pooled)   # capturable

Variants: ``"dsa"`` (the dense paged logits and a top-k over each row's cached positions),
``"misa"`` (heads routed over pooled blocks of the pooled-key cache, then the routed paged logits
and the top-k), ``"misa-dagger"`` (MISA†: as ``"misa"``, but the routed logits keep ``stage1_k``
candidates, which all heads re-score reading their keys through the block table, and the top-k of
those scores is kept) and ``"hisa"`` (block-pruned: pooled blocks from the pooled-key cache scored
with all heads, the first, the last and the best ``block_k`` blocks kept, their tokens scored
exactly, top-k; when the blocks kept cover ``max_context``, the dense path, which selects the
same). Every stage is one launch (top-k over rows wider than 16384 columns: three) for
the whole batch; where one program scores all of a sequence's blocks (small batch and context),
the top-m of the blocks runs inside it, one launch fewer.

A selector's buffers are sized by ``max_batch``, ``next_n`` and ``max_context``; each batch size
gets its own launch plan on first use (allocated then: call once at every batch size before
capturing). Per plan of ``batch`` sequences, with ``rows = batch * next_n`` and ``ctx`` the
``max_context`` rounded up to whole 64-token pages:

- ``"dsa"``, ``"misa"``: float32 logits ``rows * ctx * 4`` bytes, plus the top-k's scratch
  (``rows * 8 * (4 * k + 4096 + 2048)`` bytes where ``ctx > 16384``);
- ``"misa-dagger"``: the same with ``stage1_k`` in place of ``k``, plus ``rows * c * 8`` bytes of
  candidates and their scores, ``c = min(stage1_k, ctx)``;
- ``"hisa"``: ``rows * kept * block_size * 8`` bytes of candidate scores and positions (``kept``
  about ``block_k``), plus the block scores ``rows * ctx / block_size * 4``.

``next_n`` may be large: chunked prefill over the paged cache (a chunk's keys written to the cache
first, then its ``next_n`` queries selected, query ``i`` seeing ``context_lens - next_n + i + 1``
keys) runs through the same selector; the dense variants' logits then take ``rows * ctx * 4``
bytes (a 1024-token chunk at 128K context: 512 MiB per sequence), and the scoring kernels read the
cache once per tile of queries (``misa.ops.dsa.paged_triton.query_tile``). Inputs are not
validated by ``__call__`` (that would read the device); ``check`` does it, as the checked
``misa.paged_*`` functions do.
"""
from __future__ import annotations

import torch
import triton

from . import quant
from .ops.blocks.reference import kept_blocks
from .ops.router.reference import DEFAULT_ROUTER
from .ops.topk.launches import topk_launch
from .validate import check_hisa_budget, check_int, check_stage1_k

SELECTOR_VARIANTS = ("dsa", "hisa", "misa", "misa-dagger")
ROUTED_VARIANTS = ("misa", "misa-dagger")


class _Plan:
    """One batch size's buffers and kernel launches."""

    def __init__(self, sel: "DecodeSelector", batch: int):
        dev, n = sel.device, sel.next_n
        rows = batch * n
        i32 = dict(dtype=torch.int32, device=dev)
        self.zeros = torch.zeros(rows, **i32)
        if not sel.block_pruned:
            self.ends = torch.empty(rows, **i32)
            self.offsets = torch.arange(1 - n, 1, **i32)              # query i sees ctx - n + 1 + i keys
            self.logits = torch.empty(rows, sel.max_pages * quant.PAGE_SIZE, dtype=torch.float32, device=dev)
            if sel.variant == "misa-dagger":
                # stage 1: the routed logits' top candidates; stage 2: all heads re-score them and
                # the top-k of those scores maps back to positions through the candidate list
                self.stage1 = topk_launch(self.logits, self.zeros, self.ends, sel.stage1_width)
                self.cand_scores = torch.empty(rows, sel.stage1_width, dtype=torch.float32, device=dev)
                self.width = torch.full((rows,), sel.stage1_width, **i32)
                self.topk = topk_launch(self.cand_scores, self.zeros, self.width, sel.k, cmap=self.stage1.out,
                                        finite_only=True)
            else:
                self.topk = topk_launch(self.logits, self.zeros, self.ends, sel.k)
            if sel.variant in ROUTED_VARIANTS:
                self.heads = torch.empty(rows, sel.active_heads, **i32)
                self.kbar = torch.empty(batch, sel.router_blocks, sel.head_dim, dtype=torch.float32, device=dev)
        else:
            self.block_ends = torch.empty(rows, **i32)
            self.scores = torch.empty(rows, max(sel.max_blocks, 1), dtype=torch.float32, device=dev)
            self.top_blocks = topk_launch(self.scores, self.zeros, self.block_ends, sel.kept)
            width = sel.kept * sel.block_size
            self.cand = torch.empty(rows, width, dtype=torch.float32, device=dev)
            self.positions = torch.empty(rows, width, **i32)
            self.width = torch.full((rows,), width, **i32)
            self.topk = topk_launch(self.cand, self.zeros, self.width, sel.k, cmap=self.positions, finite_only=True)
        self.out = self.topk.out


class DecodeSelector:
    """A decode selector with preallocated buffers; see the module docstring.

    ``variant``: "dsa", "misa", "misa-dagger" or "hisa"; ``num_heads``, ``head_dim``: the indexer's H
    and D; ``k``: tokens kept per query (default 2048); ``max_batch``: sequences per call at most;
    ``max_context``: cached tokens per sequence at most (the block table has ``ceil(max_context /
    64)`` columns); ``next_n``: new tokens per sequence per step (1, 2+ with multi-token
    prediction, or a prefill chunk's length; see the module docstring for the memory).
    HISA: ``block_size`` (a multiple of the 64-token page, default 64) and ``block_k`` (blocks kept,
    default 64; ``block_k * block_size >= k``). MISA and MISA†: ``active_heads`` (default 8, fewer
    than ``num_heads``, a power of two) routed by ``router`` ("gap", the default, or "abs-sum") over
    blocks of ``router_block_size`` tokens (a multiple of 64, default 1024) taken from the pooled-key cache.
    MISA† ("misa-dagger"): ``stage1_k`` (required, at least ``k``), the candidates the routed heads
    keep for all heads to re-score (at most 64 heads); a ``stage1_k`` past ``max_context`` keeps
    every cached position.
    """

    def __init__(self, variant: str = "dsa", *, num_heads: int, head_dim: int, k: int = 2048, max_batch: int,
                 max_context: int, next_n: int = 1, device=None, block_size: int = 64, block_k: int = 64,
                 active_heads: int = 8, router_block_size: int = 1024, router: str = DEFAULT_ROUTER,
                 stage1_k: int | None = None):
        if variant not in SELECTOR_VARIANTS:
            raise ValueError(f"variant: expected one of {SELECTOR_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.num_heads = check_int("num_heads", num_heads)
        self.head_dim = check_int("head_dim", head_dim)
        self.k = check_int("k", k)
        self.max_batch = check_int("max_batch", max_batch)
        self.max_context = check_int("max_context", max_context)
        self.next_n = check_int("next_n", next_n)
        self.device = torch.device(device if device is not None else "cuda")
        self.max_pages = triton.cdiv(max_context, quant.PAGE_SIZE)
        if variant == "hisa":
            check_int("block_size", block_size)
            if block_size % quant.PAGE_SIZE:
                raise ValueError(f"block_size: must be a multiple of the page size ({quant.PAGE_SIZE}), got {block_size}")
            check_hisa_budget(k, block_size, block_k)
            self.block_size, self.block_k = block_size, block_k
            self.kept = kept_blocks(k, block_size, block_k)
            self.max_blocks = triton.cdiv(max_context, block_size)
        # blocks kept cover every cached token: the dense path selects the same, with fewer launches
        self.block_pruned = variant == "hisa" and self.kept < self.max_blocks
        if variant == "misa-dagger":
            from .ops.rescore import MAX_RESCORE_HEADS
            if stage1_k is None:
                raise ValueError("stage1_k: the 'misa-dagger' selector needs the number of stage-1 candidates")
            self.stage1_k = check_stage1_k(stage1_k, self.k)
            check_int("num_heads", num_heads, 1, MAX_RESCORE_HEADS)
            # candidates past the longest context would be -1 anyway: the buffers stop there
            self.stage1_width = min(self.stage1_k, self.max_pages * quant.PAGE_SIZE)
        elif stage1_k is not None:
            raise ValueError(f"stage1_k: only the 'misa-dagger' variant takes it, not {variant!r}")
        if variant in ROUTED_VARIANTS:
            from .ops import power_of_two
            from .ops.router.triton import STATISTICS
            check_int("active_heads", active_heads, 1, num_heads - 1)
            if not power_of_two(active_heads):
                raise ValueError(f"active_heads: the routed kernels take a power of two, got {active_heads}")
            check_int("router_block_size", router_block_size)
            if router_block_size % quant.PAGE_SIZE:
                raise ValueError(f"router_block_size: must be a multiple of the page size ({quant.PAGE_SIZE}), "
                                 f"got {router_block_size}")
            if router not in STATISTICS:
                raise ValueError(f"router: the decode selector routes with one of {STATISTICS}, got {router!r}")
            self.active_heads, self.router_block_size, self.router = active_heads, router_block_size, router
            self.router_blocks = triton.cdiv(max_context, router_block_size)
        self._plans: dict[int, _Plan] = {}

    def plan(self, batch: int) -> _Plan:
        """The buffers and launches for ``batch`` sequences (made on first use)."""
        if batch not in self._plans:
            check_int("batch", batch, 1, self.max_batch)
            self._plans[batch] = _Plan(self, batch)
        return self._plans[batch]

    def check(self, q, kv_cache, weights, context_lens, block_table, pooled=None) -> None:
        """Validate inputs as the checked ``misa.paged_*`` functions do (one device read), and that
        they fit this selector's sizes."""
        from .paged import _check_paged, check_pooled
        longest = _check_paged(q, kv_cache, weights, context_lens, block_table)
        b, n, h, d = q.shape
        if (n, h, d) != (self.next_n, self.num_heads, self.head_dim):
            raise ValueError(f"q: expected [B, {self.next_n}, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        check_int("batch", b, 1, self.max_batch)
        if block_table.shape[1] > self.max_pages:
            raise ValueError(f"block_table: {block_table.shape[1]} columns, this selector holds {self.max_pages} "
                             f"(max_context {self.max_context})")
        if longest > self.max_context:
            raise ValueError(f"context_lens: {longest} tokens exceed max_context ({self.max_context})")
        if self.variant != "dsa":
            if pooled is None:
                raise ValueError(f"pooled: the {self.variant!r} selector reads the pooled-key cache "
                                 "(misa.new_pooled_kcache)")
            check_pooled(pooled, kv_cache)

    def __call__(self, q, kv_cache, weights, context_lens, block_table, pooled=None) -> torch.Tensor:
        """``[B * next_n, k]`` int32 positions inside each sequence, -1 padded: a buffer of this
        selector, overwritten by the next call at the same batch size."""
        p = self.plan(q.shape[0])
        if not self.block_pruned:
            from .ops.dsa.paged_triton import paged_logits
            heads = None
            if self.variant in ROUTED_VARIANTS:
                from .ops.router.triton import paged_route_heads_batched
                heads = paged_route_heads_batched(q, kv_cache, weights, context_lens, block_table, self.active_heads,
                                                  self.router_block_size, self.router, pooled=pooled, out=p.heads,
                                                  kbar=p.kbar, max_blocks=self.router_blocks)
            torch.add(context_lens.view(-1, 1), p.offsets, out=p.ends.view(-1, self.next_n))
            paged_logits(q, kv_cache, weights, context_lens, block_table, p.logits, heads=heads)
            if self.variant == "misa-dagger":
                from .ops.rescore.triton import paged_rescore
                p.stage1.run()
                paged_rescore(q, kv_cache, weights, context_lens, block_table, p.stage1.out, p.cand_scores)
            p.topk.run()
            return p.out
        from .ops.blocks import triton as blocks_triton
        # at small batch and context the scoring pass takes each row's top-m blocks itself
        if not blocks_triton.block_scores(q, pooled, weights, context_lens, block_table, self.block_size, p.scores,
                                          p.block_ends, top=p.top_blocks.out):
            p.top_blocks.run()
        blocks_triton.chosen_block_logits(q, kv_cache, weights, context_lens, block_table, p.top_blocks.out,
                                          self.block_size, p.cand, p.positions)
        p.topk.run()
        return p.out
