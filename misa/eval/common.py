"""What every ``misa eval`` command shares: the loaded model, tokenizer, indexer, device and hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .hooks import Controller, run_layers
from .indexer import CONFIG_FILE, IndexerStack
from .model import load_model, model_geometry
from .report import provenance

# Below this many training tokens per layer an indexer is called under-trained: its picks are far
# from what a trained DSA indexer selects, so recall / NIAH / perplexity against it say little.
# The documented indexers saw 4.8M and 19.7M tokens per layer (docs/results.md); a 2-minute CPU
# warm-up sees a few thousand.
TRAINED_TOKENS_PER_LAYER = 1_000_000
DOCUMENTED_TOKENS_PER_LAYER = 19_700_000


def indexer_dir(indexer) -> Path:
    """The folder of a saved indexer (``indexer`` may name its ``indexer.json``); raises
    ``ValueError`` naming ``indexer`` when there is none, before anything is loaded."""
    p = Path(indexer)
    if p.is_file():
        p = p.parent
    if not (p / CONFIG_FILE).is_file():
        raise ValueError(f"indexer: no {CONFIG_FILE} in {p} (train one with `misa warmup`, or pass --indexer DIR, "
                         f"the folder `misa warmup` saved)")
    return p


def trained_tokens_per_layer(meta: dict) -> int | None:
    """Tokens per layer an indexer was trained on, from its ``indexer.json`` ``meta`` (a run
    continued from another indexer counts that one's too); None when not recorded."""
    progress = (meta or {}).get("progress") or {}
    tokens = progress.get("tokens_per_layer")
    if tokens is None:
        return None
    return int(tokens) + int(progress.get("prior_tokens_per_layer", 0))


def training_warning(meta: dict) -> str | None:
    """A warning when the indexer is under-trained (or its training is not recorded), else None."""
    tokens = trained_tokens_per_layer(meta)
    if tokens is None:
        return ("the indexer's training is not recorded in its indexer.json: results are only meaningful for an "
                f"indexer trained on well over {TRAINED_TOKENS_PER_LAYER:,} tokens per layer")
    if tokens < TRAINED_TOKENS_PER_LAYER:
        return (f"UNDER-TRAINED indexer: it saw {tokens:,} tokens per layer, below the {TRAINED_TOKENS_PER_LAYER:,} "
                f"this tool calls trained (the documented indexer saw {DOCUMENTED_TOKENS_PER_LAYER / 1e6:.1f}M); its "
                f"picks are not what a trained DSA indexer selects, so these numbers do not measure MISA. Train "
                f"longer (`misa warmup --minutes N`, on a GPU: docs/results.md)")
    return None


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
        ipath = None
        if indexer is not None:        # checked before the model is loaded (or downloaded)
            ipath = indexer_dir(indexer)
        elif need_indexer:
            raise ValueError("indexer: no trained indexer; run `misa warmup` first, or pass --indexer DIR "
                             "(the folder `misa warmup` saved)")
        m, tok, path = loaded if loaded is not None else load_model(model, device)
        dev = next(m.parameters()).device
        stack = IndexerStack.load(ipath, device=dev) if ipath is not None else None
        return cls(m, tok, stack, dev, Path(path), ipath, corpus, token_cache)

    def meta(self) -> dict:
        out = provenance(self.device)
        out["model"] = self.model_path.name
        if self.stack is not None:
            c = self.stack.cfg
            trained = c.meta.get("progress", {})
            tokens = trained_tokens_per_layer(c.meta)     # a continued run counts the training before it
            out["indexer"] = (f"{self.indexer_path} ({len(c.layers)} layers, {c.heads} heads x {c.head_dim}, "
                              f"q rank {c.q_rank}, {'?' if tokens is None else f'{tokens:,}'} tokens per layer, "
                              f"id {self.stack.fingerprint()})")
            out["indexer_config"] = {k: v for k, v in c.shape_key().items()}
            out["indexer_training"] = trained
            out["indexer_tokens_per_layer"] = tokens
            warning = training_warning(c.meta)
            if warning:
                out["warning"] = warning
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
