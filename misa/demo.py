"""``misa demo``: the methods of ``misa.variants.METHODS`` (DSA, MISA with the paper's abs-sum
router and our gap router, MISA-dagger, HISA) side by side on one indexer workload."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .metrics import recall
from .synthetic import indexer_workload
from .variants import METHODS, check_methods, method_config

# MISA's router statistic when a method names none: MisaConfig's default, the paper's
DEFAULT_ROUTER = "abs-sum"


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
    name: str          # the method's name in misa.variants.METHODS
    method: str        # its label
    setting: str
    recall_mean: float
    recall_min: float
    ms: float


def setting(name: str, cfg: DemoConfig, heads: int) -> str:
    """The method's parameters in a few words; the router is named only where the label does not
    say it and it is not the paper's abs-sum."""
    m = METHODS[name]
    if m.router == DEFAULT_ROUTER or (m.router and m.router in m.label):
        m = dataclasses.replace(m, router=None)
    return m.setting(cfg.active_heads, cfg.block_size, cfg.stage1_k, cfg.hisa_block_size, cfg.hisa_block_k,
                     heads=heads)


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t) * 1e3


def run_demo(cfg: DemoConfig, device: torch.device, seed: int = 0, workload=None,
             methods=None) -> list[DemoRow]:
    """One row per method (default: all of ``misa.variants.METHODS``), recall against DSA's selection.

    ``workload``: anything with ``.args`` = (q, kv, weights, ks, ke); default: the synthetic one.
    ``ms`` is the wall time of one call after a warm-up: on CUDA every method is called once first
    (kernel compilation, autotuning, allocator); on the CPU one DSA call warms the allocator (the
    PyTorch reference compiles nothing)."""
    names = check_methods(methods if methods is not None else list(METHODS))
    w = workload or indexer_workload(cfg.seq_len, cfg.num_queries, cfg.heads, cfg.head_dim, seed=seed, device=device)
    args = w.args
    heads = args[0].shape[1]
    reference = method_config("dsa").select(*args, cfg.k)       # DSA's selection; also the warm-up
    rows = []
    for name in names:
        select = method_config(name, **cfg.sizes()).select
        if device.type == "cuda":
            select(*args, cfg.k)
        idx, ms = _timed(lambda: select(*args, cfg.k), device)
        r = recall(idx, reference)
        rows.append(DemoRow(name, METHODS[name].label, setting(name, cfg, heads), float(r.mean()), float(r.min()), ms))
    return rows
