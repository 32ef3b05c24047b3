"""What every ``misa eval`` command shares: the loaded model, tokenizer, indexer, device and hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .hooks import Controller, run_layers
from .indexer import IndexerStack
from .model import load_model, model_geometry
from .report import provenance


@dataclass
class EvalContext:
    model: object
    tokenizer: object
    stack: IndexerStack | None
    device: torch.device
    model_path: Path
    indexer_path: Path | None
    corpus: Path | None = None
    token_cache: Path | None = None
    ctl: Controller = field(default_factory=Controller)

    def __post_init__(self):
        self.ctl.install(self.model)
        self.geo = model_geometry(self.model)
        self.scaling = self.geo["head_dim"] ** -0.5

    @classmethod
    def create(cls, model=None, device=None, indexer=None, corpus=None, need_indexer: bool = True,
               token_cache: Path | None = None, loaded=None) -> "EvalContext":
        """``loaded``: an already loaded ``(model, tokenizer, path)`` to reuse (tests, the GPU job)."""
        m, tok, path = loaded if loaded is not None else load_model(model, device)
        dev = next(m.parameters()).device
        stack, ipath = None, None
        if indexer is not None:
            ipath = Path(indexer)
            stack = IndexerStack.load(ipath, device=dev)
        elif need_indexer:
            raise ValueError("indexer: pass --indexer DIR (the folder `misa warmup` saved)")
        return cls(m, tok, stack, dev, Path(path), ipath, corpus, token_cache)

    def meta(self) -> dict:
        out = provenance(self.device)
        out["model"] = self.model_path.name
        if self.stack is not None:
            c = self.stack.cfg
            trained = c.meta.get("progress", {})
            tokens = trained.get("tokens_per_layer")
            if tokens is not None:    # a continued run also counts the training it continued from
                tokens = f"{tokens + trained.get('prior_tokens_per_layer', 0):,}"
            out["indexer"] = (f"{self.indexer_path} ({len(c.layers)} layers, {c.heads} heads x {c.head_dim}, "
                              f"q rank {c.q_rank}, {tokens or '?'} tokens per layer, "
                              f"id {self.stack.fingerprint()})")
            out["indexer_config"] = {k: v for k, v in c.shape_key().items()}
            out["indexer_training"] = trained
        return out

    def capture(self, ids: torch.Tensor, layers) -> dict:
        """One dense forward; ``{layer: {x, q, k}}`` for ``layers``."""
        self.ctl.reset()
        self.ctl.sparse = None
        self.ctl.capture, self.ctl.stop_after = set(layers), max(layers)
        try:
            run_layers(self.model, ids.to(self.device)[None], self.ctl)
        finally:
            self.ctl.capture, self.ctl.stop_after = set(), None
        out = dict(self.ctl.captured)
        self.ctl.captured.clear()
        return out

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, sparse=None) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of one sequence under ``sparse`` attention (None: dense)."""
        self.ctl.reset()
        self.ctl.sparse = sparse
        try:
            h = self.model.model(input_ids=ids.to(self.device)[None], use_cache=False).last_hidden_state[0]
        finally:
            self.ctl.sparse = None
        return h

    def logits_at(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h[positions]).float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
