"""``misa demo`` on the real model: one layer's fp8 indexer traffic from SmolLM2 + a trained indexer.

Used when the model file, a trained indexer and the corpus are on this machine (the cache that
`misa warmup` fills, or ``--model`` / ``--indexer`` / ``$MISA_CORPUS``); nothing is downloaded for a
demo in ``auto`` mode. An indexer trained on fewer than ``common.TRAINED_TOKENS_PER_LAYER`` tokens
per layer (a short CPU warm-up) still runs, but the description says UNDER-TRAINED and
``RealWorkload.warning`` says why.
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
    tokens_per_layer: int | None = None     # the indexer's training, from its indexer.json
    warning: str | None = None              # set when the indexer is under-trained

    @property
    def args(self):
        return self.q, self.kv, self.weights, self.ks, self.ke


def real_workload(device: torch.device, seq_len: int, num_queries: int, model=None, indexer=None,
                  corpus=None, layer: int | None = None, fetch: bool = False) -> tuple[RealWorkload | None, str]:
    """``(workload, description)``, or ``(None, why not)`` when the model, indexer or corpus is missing."""
    from . import data
    from .cli import default_indexer
    from .common import EvalContext, indexer_dir, trained_tokens_per_layer, training_warning
    from .model import find_model
    ipath = Path(indexer) if indexer else default_indexer()
    if ipath is None:
        return None, "no trained indexer (run `misa warmup` first)"
    try:
        ipath = indexer_dir(ipath)
        data.heldout_file(corpus)
        gguf = find_model(model, fetch=fetch)
    except (ValueError, OSError, RuntimeError) as e:
        return None, str(e)
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
    tokens = trained_tokens_per_layer(c.meta)
    warning = training_warning(c.meta)
    seen = "training not recorded" if tokens is None else f"{tokens:,} tokens per layer"
    trained = (f"an UNDER-TRAINED DSA indexer ({seen})" if warning else
               f"the DSA indexer `misa warmup` trained ({seen})")
    desc = (f"REAL SmolLM2-135M-Instruct layer {layer} with {trained}, {c.heads} heads x {c.head_dim}, fp8; "
            f"held-out text, {num_queries} causal queries at the end of a {seq_len}-token context")
    return RealWorkload(inp.q[pos], inp.weights[pos], inp.kv, torch.zeros_like(ke), ke, desc, tokens, warning), desc
