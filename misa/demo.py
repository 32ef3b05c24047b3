"""``misa demo``: DSA, MISA (the paper's abs-sum router and our gap router), MISA-dagger and HISA side
by side on one indexer workload."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import api
from .metrics import recall
from .synthetic import indexer_workload


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


@dataclass
class DemoRow:
    method: str
    setting: str
    recall_mean: float
    recall_min: float
    ms: float


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t) * 1e3


def run_demo(cfg: DemoConfig, device: torch.device, seed: int = 0, workload=None) -> list[DemoRow]:
    """``workload``: anything with ``.args`` = (q, kv, weights, ks, ke); default: the synthetic one."""
    w = workload or indexer_workload(cfg.seq_len, cfg.num_queries, cfg.heads, cfg.head_dim, seed=seed, device=device)
    args = w.args
    api.dsa_select(*args, k=cfg.k)      # warm-up: kernel compilation, allocator
    methods = [
        ("DSA", f"{cfg.heads} heads", lambda: api.dsa_select(*args, k=cfg.k)),
        ("MISA", f"h={cfg.active_heads}, B={cfg.block_size}",
         lambda: api.misa_select(*args, k=cfg.k, active_heads=cfg.active_heads, block_size=cfg.block_size)),
        ("MISA (gap router)", f"h={cfg.active_heads}, B={cfg.block_size}",      # ours: docs/results.md
         lambda: api.misa_select(*args, k=cfg.k, active_heads=cfg.active_heads, block_size=cfg.block_size,
                                 router="gap")),
        ("MISA-dagger", f"h={cfg.active_heads}, k1={cfg.stage1_k}",
         lambda: api.misa_select(*args, k=cfg.k, active_heads=cfg.active_heads, block_size=cfg.block_size,
                                 stage1_k=cfg.stage1_k)),
        ("HISA", f"B={cfg.hisa_block_size}, m={cfg.hisa_block_k}",
         lambda: api.hisa_select(*args, k=cfg.k, block_size=cfg.hisa_block_size, block_k=cfg.hisa_block_k)),
    ]
    rows, reference = [], None
    for name, setting, fn in methods:
        idx, ms = _timed(fn, device)
        if reference is None:
            reference = idx
        r = recall(idx, reference)
        rows.append(DemoRow(name, setting, float(r.mean()), float(r.min()), ms))
    return rows
