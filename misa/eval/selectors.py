"""The token selectors compared in the evaluation, all through the library's public functions.

Each takes one layer's fp8 indexer inputs for some queries (``ks = 0``, ``ke = position + 1``) and
returns ``[T, k]`` int32 absolute key positions, -1 padded. Settings scaled to 8K context (the paper's
are for 128K): MISA's router pools blocks of ``block_size`` (128: 64 blocks at 8K); MISA-dagger keeps
``stage1_mult * k`` stage-1 candidates (the paper's k1 = 4k); HISA keeps ``stage1_mult * k`` candidate
tokens too, as blocks of ``hisa_block`` (64) tokens; sink + window keeps the first ``sink`` tokens and
the last ``k - sink``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import misa

from .indexer import IndexerInputs


@dataclass(frozen=True)
class SelectorSettings:
    block_size: int = 128
    router: str = "abs-sum"
    stage1_mult: int = 4
    dagger_heads: int = 8
    hisa_block: int = 64
    sink: int = 4
    seed: int = 0


# name -> (kind, active heads)
METHODS = {
    "dsa": ("dsa", None),
    "misa-h4": ("misa", 4), "misa-h8": ("misa", 8), "misa-h16": ("misa", 16),
    "misa-dagger": ("dagger", None),
    "hisa": ("hisa", None),
    "random-h4": ("random", 4), "random-h8": ("random", 8), "random-h16": ("random", 16),
    "topw-h4": ("topw", 4), "topw-h8": ("topw", 8), "topw-h16": ("topw", 16),
    "sink-window": ("window", None),
    # MISA with the "gap" router statistic instead of settings.router (docs/results.md, CPU analysis)
    "misa-gap-h8": ("misa", 8), "misa-gap-h16": ("misa", 16), "misa-gap-dagger": ("dagger", None),
}
ROUTER_OF = {"misa-gap-h8": "gap", "misa-gap-h16": "gap", "misa-gap-dagger": "gap"}
# methods the model evaluations (ppl, niah) accept; their default lists leave out the gap methods
IN_MODEL = ["dense", "dsa", "misa-h4", "misa-h8", "misa-h16", "misa-dagger", "hisa", "sink-window",
            "misa-gap-h8", "misa-gap-h16", "misa-gap-dagger"]


def describe(name: str, k: int, s: SelectorSettings) -> str:
    kind, h = METHODS.get(name, (name, None))
    router = ROUTER_OF.get(name, s.router)
    return {
        "dense": "full causal attention",
        "dsa": "all indexer heads",
        "misa": f"h={h}, router {router}, B={s.block_size}",
        "dagger": f"h={s.dagger_heads}, k1={s.stage1_mult * k}" + (f", router {router}" if name in ROUTER_OF else ""),
        "hisa": f"B={s.hisa_block}, m={max(2, s.stage1_mult * k // s.hisa_block)}",
        "random": f"{h} random heads per query",
        "topw": f"the {h} heads of largest |w| per query",
        "window": f"{s.sink} sink + {k - s.sink} latest",
        "oracle": "top-k of the true attention",
    }[kind]


def _routed(inp: IndexerInputs, heads: torch.Tensor, ks, ke, k: int) -> torch.Tensor:
    idx = heads.long()
    raw = inp.q.view(torch.uint8) if inp.q.dtype == torch.float8_e4m3fn else inp.q   # gather has no fp8 kernel
    q = torch.gather(raw, 1, idx[:, :, None].expand(-1, -1, inp.q.shape[2])).view(inp.q.dtype)
    w = torch.gather(inp.weights, 1, idx)
    return misa.dsa_select(q, inp.kv, w, ks, ke, k=k)


def window_select(ks: torch.Tensor, ke: torch.Tensor, k: int, sink: int) -> torch.Tensor:
    """The first ``sink`` visible tokens and the latest ``k - sink``: ``[T, k]`` int32, -1 padded."""
    sink = min(sink, k)
    j = torch.arange(k, device=ke.device)
    ks_, ke_ = ks.long()[:, None], ke.long()[:, None]
    n = ke_ - ks_
    first = ks_ + j[None, :sink]
    last = ke_ - (k - sink) + j[None, : k - sink]
    sel = torch.cat([first, last], dim=1)
    # when fewer than k tokens are visible: all of them, in order
    short = ks_ + j[None, :]
    sel = torch.where(n <= k, torch.where(j[None, :] < n, short, -1), sel)
    return sel.int()


def select(name: str, inp: IndexerInputs, ks: torch.Tensor, ke: torch.Tensor, k: int,
           s: SelectorSettings = SelectorSettings(), generator: torch.Generator | None = None,
           router: str | None = None, block_size: int | None = None) -> torch.Tensor:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    kind, h = METHODS[name]
    router = router or ROUTER_OF.get(name)
    args = (inp.q, inp.kv, inp.weights, ks, ke)
    if kind == "dsa":
        return misa.dsa_select(*args, k=k)
    if kind == "misa":
        return misa.misa_select(*args, k=k, active_heads=h, block_size=block_size or s.block_size,
                                router=router or s.router)
    if kind == "dagger":
        return misa.misa_select(*args, k=k, active_heads=s.dagger_heads, block_size=block_size or s.block_size,
                                stage1_k=s.stage1_mult * k, router=router or s.router)
    if kind == "hisa":
        return misa.hisa_select(*args, k=k, block_size=s.hisa_block,
                                block_k=max(2, s.stage1_mult * k // s.hisa_block))
    if kind == "random":
        g = generator or torch.Generator().manual_seed(s.seed)
        heads = torch.rand(inp.q.shape[0], inp.q.shape[1], generator=g).argsort(dim=1)[:, :h]
        return _routed(inp, heads.to(inp.q.device), ks, ke, k)
    if kind == "topw":
        heads = inp.raw_weights.abs().topk(h, dim=1).indices
        return _routed(inp, heads, ks, ke, k)
    if kind == "window":
        return window_select(ks, ke, k, s.sink)
    raise AssertionError(kind)


def oracle_select(probs: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of the true attention ``probs [T, S]`` (the best any selector of k tokens can hold)."""
    return misa.topk_indices(probs.float().contiguous(), ks, ke, k)


def mass(sel: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Attention mass ``[T]`` that the selected tokens hold under ``probs [T, S]``."""
    idx = sel.long()
    return torch.where(idx >= 0, torch.gather(probs, 1, idx.clamp_min(0)), 0.0).sum(dim=1)


def selection_mask(sel: torch.Tensor, width: int) -> torch.Tensor:
    """``[T, width]`` bool, True at the selected positions."""
    m = torch.zeros(sel.shape[0], width + 1, dtype=torch.bool, device=sel.device)
    idx = torch.where(sel >= 0, sel.long(), width)        # -1 padding goes to a spare column
    m.scatter_(1, idx, True)
    return m[:, :width]
