"""The registry of selection variants: one list that ``MisaConfig``, ``misa demo``, ``misa bench``
and ``misa eval`` all read.

A *variant* is an algorithm (``MisaConfig.variant``); a *method* is a named, ready-to-run setting
of one (the rows of the demo's and the bench's tables, the names ``--methods`` takes). Every
method's selection is ``method_config(name, ...).select(...)``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    summary: str
    routed: bool = False          # a router picks heads per query (active_heads, block_size, router)
    two_stage: bool = False       # keeps stage1_k candidates, re-scored with all heads
    block_pruned: bool = False    # scores pooled key blocks first (hisa_block_size, hisa_block_k)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("dsa", "DSA", "the unmodified indexer: all heads score every visible token"),
    Variant("misa", "MISA", "routed heads: a router over pooled keys picks active_heads heads per query, "
                            "only those score the tokens", routed=True),
    Variant("misa-dagger", "MISA†", "routed heads keep stage1_k candidates, all heads re-score them",
            routed=True, two_stage=True),
    Variant("hisa", "HISA", "block pruning: all heads score pooled key blocks, the best blocks' tokens "
                            "are scored exactly", block_pruned=True),
)}


@dataclass(frozen=True)
class Method:
    name: str
    variant: str
    label: str
    router: str | None = None     # None: MisaConfig's default statistic

    def setting(self, active_heads: int, block_size: int, stage1_k: int, hisa_block_size: int,
                hisa_block_k: int, heads: int | None = None) -> str:
        """What the method's parameters are, in a few words (the demo's and bench's "setting")."""
        v = VARIANTS[self.variant]
        router = f", router {self.router}" if self.router else ""
        if v.two_stage:
            return f"h={active_heads}, B={block_size}, k1={stage1_k}{router}"
        if v.routed:
            return f"h={active_heads}, B={block_size}{router}"
        if v.block_pruned:
            return f"B={hisa_block_size}, m={hisa_block_k}"
        return f"all {heads} heads" if heads else "all heads"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dsa", "dsa", "DSA"),
    Method("misa", "misa", "MISA", router="abs-sum"),
    Method("misa-gap", "misa", "MISA (gap router)", router="gap"),
    Method("misa-dagger", "misa-dagger", "MISA†", router="abs-sum"),
    Method("hisa", "hisa", "HISA"),
)}


def check_methods(names) -> list[str]:
    """Method names (a list or a comma-separated string), checked against ``METHODS``."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ValueError(f"methods: expected at least one of {', '.join(METHODS)}")
    for n in names:
        if n not in METHODS:
            raise ValueError(f"methods: unknown method {n!r} (known: {', '.join(METHODS)})")
    return names


def method_config(name: str, **fields):
    """The ``MisaConfig`` of method ``name``, with ``fields`` (MisaConfig field names) on top;
    fields that the method's variant does not use are dropped, so one set of sizes serves all."""
    from .config import MisaConfig
    m = METHODS[check_methods([name])[0]]
    v = VARIANTS[m.variant]
    keep = {"workspace_bytes", "backend"}
    if v.routed:
        keep |= {"active_heads", "decode_active_heads", "block_size", "router"}
    if v.two_stage:
        keep |= {"stage1_k"}
    if v.block_pruned:
        keep |= {"hisa_block_size", "hisa_block_k"}
    values = {key: val for key, val in fields.items() if key in keep}
    if m.router is not None:
        values.setdefault("router", m.router)
    return MisaConfig(variant=m.variant, **values)
