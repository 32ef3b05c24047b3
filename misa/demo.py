"""``misa demo``: the methods of ``misa.variants.METHODS`` (DSA, MISA with the paper's abs-sum
router and our gap router, MISA-dagger, HISA) side by side on one indexer workload: synthetic
traffic, or the real model's over several layers (``misa.eval.realdemo``), where a per-layer
config (``misa calibrate``'s) adds a row that runs each layer's own setting."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from .config import MisaConfig
from .metrics import recall
from .synthetic import indexer_workload
from .variants import METHODS, VARIANTS, Method, check_methods, method_config

# the paper's router statistic: the table names a router only where it is another (the "MISA" and
# "MISA†" rows are the paper's; the library's default, gap, is named)
PAPER_ROUTER = "abs-sum"


@dataclass
class DemoConfig:
    seq_len: int
    num_queries: int
    k: int
    active_heads: int
    block_size: int
    stage1_k: int
    hisa_block_size: int
    hisa_block_k: int
    heads: int = 64
    head_dim: int = 128

    @classmethod
    def for_device(cls, device: torch.device) -> "DemoConfig":
        if device.type == "cuda":   # the paper's settings at 32K context
            return cls(32768, 4096, 2048, 8, 1024, 8192, 128, 64)
        # CPU: 8K context, everything scaled by 1/4 so k / context stays 1/16 as at 32K with k=2048
        return cls(8192, 1024, 512, 8, 256, 2048, 64, 32)

    def sizes(self) -> dict:
        """The ``MisaConfig`` fields every method takes its sizes from."""
        return dict(active_heads=self.active_heads, block_size=self.block_size, stage1_k=self.stage1_k,
                    hisa_block_size=self.hisa_block_size, hisa_block_k=self.hisa_block_k)


@dataclass
class DemoRow:
    name: str          # the method's name in misa.variants.METHODS, or CALIBRATED
    method: str        # its label
    setting: str
    recall_mean: float
    recall_min: float
    ms: float          # one call; with several layers, the mean over them
    layer_recall: dict = field(default_factory=dict)     # {layer: mean recall}, with several layers
    layer_settings: dict = field(default_factory=dict)   # {layer: (label, setting)}, the calibrated row's


# the row of a per-layer config (``misa calibrate``'s output): every layer runs its own setting
CALIBRATED = "calibrated"


def setting(name: str, cfg: DemoConfig, heads: int) -> str:
    """The method's parameters in a few words; the router is named only where the label does not
    say it and it is not the paper's abs-sum."""
    m = METHODS[name]
    if m.router == PAPER_ROUTER or (m.router and m.router in m.label):
        m = dataclasses.replace(m, router=None)
    return m.setting(cfg.active_heads, cfg.block_size, cfg.stage1_k, cfg.hisa_block_size, cfg.hisa_block_k,
                     heads=heads)


def config_setting(config: MisaConfig, heads: int) -> tuple[str, str]:
    """``(label, setting)`` of one layer's ``MisaConfig`` in the table's words, e.g.
    ``("MISA (gap)", "h=4, B=128")``; the router is named where it is not the paper's."""
    v = VARIANTS[config.variant]
    label = v.label + (f" ({config.router})" if v.routed and config.router != PAPER_ROUTER else "")
    method = Method(config.variant, config.variant, label)
    return label, method.setting(config.active_heads, config.block_size, config.stage1_k, config.hisa_block_size,
                                 config.hisa_block_k, heads=heads)


def calibration_target(config: MisaConfig) -> str:
    """What a per-layer config was chosen for, from its ``calibration`` meta: ``"recall >= 0.95"``."""
    meta = config.meta or {}
    if "metric" in meta and "target" in meta:
        return f"{meta['metric']} >= {meta['target']}"
    return "per-layer config"


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t) * 1e3


def run_demo(cfg: DemoConfig, device: torch.device, seed: int = 0, workload=None,
             methods=None, config: MisaConfig | None = None) -> list[DemoRow]:
    """One row per method (default: all of ``misa.variants.METHODS``), recall against DSA's selection.

    ``workload``: anything with ``.args`` = (q, kv, weights, ks, ke), or with ``.layers`` =
    ``{layer: args}`` (then each row also has its recall per layer, its worst query over all
    layers and its mean time per layer); default: the synthetic one. ``config``: a per-layer
    ``MisaConfig`` whose ``for_layer(layer)`` runs in an extra row, ``CALIBRATED``.
    ``ms`` is the wall time of one call after a warm-up: on CUDA every method is called once first
    (kernel compilation, autotuning, allocator); on the CPU one DSA call warms the allocator (the
    PyTorch reference compiles nothing)."""
    names = check_methods(methods if methods is not None else list(METHODS))
    if workload is None:
        workload = indexer_workload(cfg.seq_len, cfg.num_queries, cfg.heads, cfg.head_dim, seed=seed, device=device)
    layered = hasattr(workload, "layers")
    per_layer = workload.layers if layered else {None: workload.args}
    heads = next(iter(per_layer.values()))[0].shape[1]
    selectors = [(name, method_config(name, **cfg.sizes())) for name in names]
    if config is not None:
        listed = {index for index, _ in config.layers}
        for layer in per_layer:             # only the layers shown: a config may cover a larger model
            try:
                config.for_layer(layer).check_indexer(heads, cfg.k)
            except ValueError as e:
                raise ValueError(f"config: {f'layers.{layer}' if layer in listed else 'default'}.{e}") from None
        selectors.append((CALIBRATED, config))
    recalls = {name: {} for name, _ in selectors}
    times = {name: [] for name, _ in selectors}
    for layer, args in per_layer.items():
        reference = method_config("dsa").select(*args, cfg.k)       # DSA's selection; also the warm-up
        for name, sel_cfg in selectors:
            select = (sel_cfg.for_layer(layer) if name == CALIBRATED else sel_cfg).select
            if device.type == "cuda":
                select(*args, cfg.k)
            idx, ms = _timed(lambda: select(*args, cfg.k), device)
            recalls[name][layer] = recall(idx, reference)
            times[name].append(ms)
    rows = []
    for name, sel_cfg in selectors:
        every = torch.cat(list(recalls[name].values()))
        if name == CALIBRATED:
            label, text = CALIBRATED, calibration_target(config)
            layer_settings = {layer: config_setting(config.for_layer(layer), heads) for layer in per_layer}
        else:
            label, text, layer_settings = METHODS[name].label, setting(name, cfg, heads), {}
        rows.append(DemoRow(name, label, text, float(every.mean()), float(every.min()),
                            sum(times[name]) / len(times[name]),
                            {layer: float(r.mean()) for layer, r in recalls[name].items()} if layered else {},
                            layer_settings))
    return rows
