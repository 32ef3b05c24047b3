"""The token selectors compared in the evaluation: the library's methods (``misa.variants``) at
the evaluation's settings, and research baselines.

Each takes one layer's fp8 indexer inputs for some queries (``ks = 0``, ``ke = position + 1``) and
returns ``[T, k]`` int32 absolute key positions, -1 padded.

The library's methods run as ``misa.variants.method_config(base, ...).select(...)``: ``dsa``,
``misa-h4/h8/h16`` (the registry's ``misa`` with 4, 8 or 16 routed heads), ``misa-dagger``, ``hisa``,
and the gap-router twins ``misa-gap-h8/h16`` (the registry's ``misa-gap``) and ``misa-gap-dagger``.
Settings scaled to 8K context (the paper's are for 128K): MISA's router pools blocks of
``block_size`` (128: 64 blocks at 8K); MISA-dagger routes ``dagger_heads`` heads and keeps
``stage1_mult * k`` stage-1 candidates (the paper's k1 = 4k); HISA keeps ``stage1_mult * k``
candidate tokens too, as blocks of ``hisa_block`` (64) tokens.

Baselines, not library methods: ``random-h*`` (h random heads per query), ``topw-h*`` (the h heads
of largest |w| per query), ``sink-window`` (the first ``sink`` tokens and the last ``k - sink``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import misa
from misa.calibration import attention_mass
from misa.variants import METHODS as LIBRARY_METHODS, VARIANTS, method_config

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


@dataclass(frozen=True)
class EvalMethod:
    """One method of the evaluation: a library method (``base``, a ``misa.variants.METHODS`` name,
    with ``active_heads`` / ``router`` overriding the settings) or a baseline (``baseline``)."""
    name: str
    base: str | None = None
    active_heads: int | None = None
    router: str | None = None          # None: the settings' router (the gap methods fix "gap")
    baseline: str | None = None        # "random", "topw", "window"


def _library(name: str, base: str, active_heads: int | None = None, router: str | None = None) -> EvalMethod:
    if base not in LIBRARY_METHODS:
        raise AssertionError(base)
    return EvalMethod(name, base=base, active_heads=active_heads, router=router)


_ALL = (
    [_library("dsa", "dsa")]
    + [_library(f"misa-h{h}", "misa", h) for h in (4, 8, 16)]
    + [_library("misa-dagger", "misa-dagger"), _library("hisa", "hisa")]
    + [EvalMethod(f"random-h{h}", active_heads=h, baseline="random") for h in (4, 8, 16)]
    + [EvalMethod(f"topw-h{h}", active_heads=h, baseline="topw") for h in (4, 8, 16)]
    + [EvalMethod("sink-window", baseline="window")]
    # MISA with the "gap" router statistic instead of settings.router (docs/results.md, CPU analysis)
    + [_library(f"misa-gap-h{h}", "misa-gap", h, LIBRARY_METHODS["misa-gap"].router) for h in (8, 16)]
    + [_library("misa-gap-dagger", "misa-dagger", router=LIBRARY_METHODS["misa-gap"].router)]
)
METHODS: dict[str, EvalMethod] = {m.name: m for m in _ALL}
ROUTER_OF = {m.name: m.router for m in _ALL if m.router is not None}
# methods the model evaluations (ppl, niah) accept; their default lists leave out the gap methods
IN_MODEL = ["dense", "dsa", "misa-h4", "misa-h8", "misa-h16", "misa-dagger", "hisa", "sink-window",
            "misa-gap-h8", "misa-gap-h16", "misa-gap-dagger"]


CONFIG_PREFIX = "config:"      # "config:FILE.json": a per-layer config (misa calibrate's output) as a method


def is_config_method(name: str) -> bool:
    return name.startswith(CONFIG_PREFIX)


def display(name: str) -> str:
    """A method's name in report tables (a config method by its file name)."""
    return label(name) if is_config_method(name) else name


def check_in_model(methods) -> list[str]:
    """Methods the in-model evaluations (ppl, niah) accept: ``IN_MODEL`` names and ``config:FILE``."""
    bad = [m for m in methods if m not in IN_MODEL and not is_config_method(m)]
    if bad:
        raise ValueError(f"methods: unknown {bad}, expected some of {IN_MODEL} or config:FILE.json")
    for m in methods:
        if is_config_method(m):
            per_layer_config(m)          # a bad file fails here, naming the field
    return list(methods)


_CONFIGS: dict = {}


def per_layer_config(name: str) -> misa.MisaConfig:
    """The per-layer ``MisaConfig`` of a ``config:FILE`` method (read once)."""
    path = name[len(CONFIG_PREFIX):]
    if path not in _CONFIGS:
        _CONFIGS[path] = misa.MisaConfig.from_json(path)
    return _CONFIGS[path]


def config_summary(cfg: misa.MisaConfig) -> str:
    """``"12 x MISA h=4 (gap), 3 x DSA, ..."``: what a per-layer config runs."""
    from collections import Counter
    meta = cfg.meta or {}
    names = Counter(row["chosen"] for row in (meta.get("layers") or {}).values())
    if not names:
        names = Counter(c.variant for _, c in cfg.layers)
    head = f"calibrated ({meta['metric']} >= {meta['target']}): " if "metric" in meta else "per-layer: "
    return head + ", ".join(f"{n} x {name}" for name, n in names.most_common())


def library_config(name: str, k: int, s: SelectorSettings = SelectorSettings(), router: str | None = None,
                   block_size: int | None = None) -> misa.MisaConfig:
    """The ``MisaConfig`` a library method of the evaluation runs at ``k`` (``router`` and
    ``block_size``, when given, replace the method's and the settings')."""
    m = METHODS[name]
    if m.base is None:
        raise ValueError(f"method: {name!r} is a baseline, not a library method")
    v = VARIANTS[LIBRARY_METHODS[m.base].variant]
    return method_config(m.base, active_heads=m.active_heads or s.dagger_heads,
                         block_size=block_size or s.block_size, router=router or m.router or s.router,
                         stage1_k=s.stage1_mult * k if v.two_stage else None,
                         hisa_block_size=s.hisa_block, hisa_block_k=max(2, s.stage1_mult * k // s.hisa_block))


def label(name: str) -> str:
    """The method's name in tables: the registry's label for a library method."""
    if is_config_method(name):
        stem = name[len(CONFIG_PREFIX):].rsplit("/", 1)[-1]
        return stem[:-5] if stem.endswith(".json") else stem
    m = METHODS.get(name)
    if m is None or m.base is None:
        return name
    base = LIBRARY_METHODS[m.base]
    return base.label + (f" h={m.active_heads}" if m.active_heads else "") + \
        (f" (router {m.router})" if m.router and m.router != base.router else "")


def describe(name: str, k: int, s: SelectorSettings) -> str:
    if name == "dense":
        return "full causal attention"
    if name == "oracle":
        return "top-k of the true attention"
    if is_config_method(name):
        return config_summary(per_layer_config(name))
    m = METHODS[name]
    if m.base is not None:
        cfg = library_config(name, k, s)
        method = dataclasses.replace(LIBRARY_METHODS[m.base], router=cfg.router)
        return method.setting(cfg.active_heads, cfg.block_size, cfg.stage1_k, cfg.hisa_block_size,
                              cfg.hisa_block_k, heads=None)
    return {
        "random": f"{m.active_heads} random heads per query",
        "topw": f"the {m.active_heads} heads of largest |w| per query",
        "window": f"{s.sink} sink + {k - s.sink} latest",
    }[m.baseline]


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
    m = METHODS[name]
    if m.base is not None:
        cfg = library_config(name, k, s, router=router, block_size=block_size)
        return cfg.select(inp.q, inp.kv, inp.weights, ks, ke, k)
    if m.baseline == "random":
        g = generator or torch.Generator().manual_seed(s.seed)
        heads = torch.rand(inp.q.shape[0], inp.q.shape[1], generator=g).argsort(dim=1)[:, :m.active_heads]
        return _routed(inp, heads.to(inp.q.device), ks, ke, k)
    if m.baseline == "topw":
        heads = inp.raw_weights.abs().topk(m.active_heads, dim=1).indices
        return _routed(inp, heads, ks, ke, k)
    if m.baseline == "window":
        return window_select(ks, ke, k, s.sink)
    raise AssertionError(m)


def oracle_select(probs: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of the true attention ``probs [T, S]`` (the best any selector of k tokens can hold)."""
    return misa.topk_indices(probs.float().contiguous(), ks, ke, k)


mass = attention_mass          # the attention mass a selection holds (what calibration scores with)


def selection_mask(sel: torch.Tensor, width: int) -> torch.Tensor:
    """``[T, width]`` bool, True at the selected positions."""
    m = torch.zeros(sel.shape[0], width + 1, dtype=torch.bool, device=sel.device)
    idx = torch.where(sel >= 0, sel.long(), width)        # -1 padding goes to a spare column
    m.scatter_(1, idx, True)
    return m[:, :width]
