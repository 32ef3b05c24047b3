"""``misa demo`` on the real model: one layer's fp8 indexer traffic from SmolLM2 + a trained indexer.

Used when the model file and a trained indexer are on this machine (the cache that `misa warmup`
fills, or ``--model`` / ``--indexer``); nothing is downloaded for a demo in ``auto`` mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RealWorkload:
    q: torch.Tensor
    weights: torch.Tensor
    kv: tuple
    ks: torch.Tensor
    ke: torch.Tensor
    description: str

    @property
    def args(self):
        return self.q, self.kv, self.weights, self.ks, self.ke


def real_workload(device: torch.device, seq_len: int, num_queries: int, model=None, indexer=None,
                  corpus=None, layer: int | None = None, fetch: bool = False) -> tuple[RealWorkload | None, str]:
    """``(workload, description)``, or ``(None, why not)`` when the model or indexer is missing."""
    from .cli import default_indexer
    from .model import find_model
    try:
        gguf = find_model(model, fetch=fetch)
    except (ValueError, OSError, RuntimeError) as e:
        return None, f"no real model ({e})"
    ipath = Path(indexer) if indexer else default_indexer()
    if ipath is None:
        return None, "no trained indexer (run `misa warmup` first)"
    from . import data
    from .common import EvalContext
    ctx = EvalContext.create(str(gguf), device, ipath, corpus)
    seq_len = min(seq_len, ctx.geo["max_positions"])
    if not 1 <= num_queries <= seq_len:
        raise ValueError(f"num_queries: must be in [1, seq_len={seq_len}], got {num_queries}")
    layers = ctx.stack.layer_ids
    layer = layers[len(layers) // 2] if layer is None else layer
    ids = data.windows(data.heldout_tokens(ctx.tokenizer, corpus), seq_len, 1)[0]
    cap = ctx.capture(ids, [layer])[layer]
    inp = ctx.stack.inference_inputs(layer, cap["x"])
    pos = torch.arange(seq_len - num_queries, seq_len, device=ctx.device)
    ke = (pos + 1).int()
    c = ctx.stack.cfg
    desc = (f"REAL SmolLM2-135M-Instruct layer {layer} with its trained DSA indexer ({c.heads} heads x {c.head_dim}, "
            f"fp8), held-out text, {num_queries} causal queries at the end of a {seq_len}-token context")
    return RealWorkload(inp.q[pos], inp.weights[pos], inp.kv, torch.zeros_like(ke), ke, desc), desc
