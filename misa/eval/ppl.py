"""``misa eval ppl``: perplexity on held-out text with every layer's attention restricted to k tokens."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data
from .common import EvalContext
from .report import md_table, write_result
from .selectors import IN_MODEL, ROUTER_OF, SelectorSettings, check_in_model, describe, display
from .sparse import SparseAttention

PPL_METHODS = [m for m in IN_MODEL if m not in ROUTER_OF]     # the gap methods only when asked for


@dataclass
class PplConfig:
    contexts: list[int] = field(default_factory=lambda: [4096, 8192])
    windows: int = 4
    methods: list[str] = field(default_factory=lambda: list(PPL_METHODS))
    k: int = 256
    settings: SelectorSettings = field(default_factory=SelectorSettings)

    def __post_init__(self):
        check_in_model(self.methods)
        if self.windows < 1:
            raise ValueError(f"windows: must be >= 1, got {self.windows}")


@torch.no_grad()
def nll(ctx: EvalContext, ids: torch.Tensor, sparse, chunk: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood ``[T - 1]`` float32 (the output head applied in chunks)."""
    h = ctx.hidden(ids, sparse)
    target = ids[1:].to(ctx.device)
    out = []
    for t0 in range(0, target.numel(), chunk):
        logits = ctx.model.lm_head(h[t0:t0 + chunk][: target.numel() - t0]).float()
        out.append(torch.nn.functional.cross_entropy(logits, target[t0:t0 + chunk], reduction="none"))
    return torch.cat(out)


def run(ctx: EvalContext, cfg: PplConfig, out_dir: Path, progress=None, deadline: float | None = None) -> dict:
    """Past ``deadline`` (a ``time.perf_counter()`` value) each method keeps the windows it has (at least one)."""
    import time
    tokens = data.heldout_tokens(ctx.tokenizer, ctx.corpus, ctx.token_cache)
    res = {}
    for L in cfg.contexts:
        wins = data.windows(tokens, L, cfg.windows)
        for m in cfg.methods:
            sparse = SparseAttention(ctx.stack, m, cfg.k, cfg.settings)
            allv, tail = [], []
            for wi, w in enumerate(wins):
                if wi > 0 and deadline is not None and time.perf_counter() > deadline:
                    break
                v = nll(ctx, w, sparse)
                allv.append(v)
                tail.append(v[L // 2:])
                if progress is not None:
                    progress(m)
            a, t = torch.cat(allv), torch.cat(tail)
            res[f"{m}/{L}"] = {"ppl": math.exp(float(a.mean())), "ppl_second_half": math.exp(float(t.mean())),
                               "tokens": int(a.numel()), "windows": len(allv)}
    return report(ctx, cfg, res, len(wins), out_dir)


def report(ctx, cfg: PplConfig, res, n_windows, out_dir: Path) -> dict:
    s = cfg.settings
    rows = []
    for m in cfg.methods:
        row = [display(m), describe(m, cfg.k, s)]
        for L in cfg.contexts:
            r = res[f"{m}/{L}"]
            rel = ""
            if "dsa" in cfg.methods and m not in ("dsa", "dense"):
                rel = f" ({100 * (r['ppl'] / res[f'dsa/{L}']['ppl'] - 1):+.2f}% vs DSA)"
            row += [f"{r['ppl']:.3f}{rel}", f"{r['ppl_second_half']:.3f}"]
        rows.append(row)
    cols = ["method", "setting"] + [c for L in cfg.contexts for c in (f"ppl {L}", f"ppl {L}, 2nd half")]
    md = [f"# Perplexity on held-out text ({data.heldout_file(ctx.corpus).name}), k = {cfg.k} tokens per query in "
          f"every layer\n",
          f"Up to {n_windows} windows per context (see 'windows' in the JSON). '2nd half': tokens past the middle of "
          f"each window, where the selection restricts most. Target: MISA within 1% of DSA. This is a small model "
          f"at <= {max(cfg.contexts)}-token context.\n",
          md_table(cols, rows)]
    payload = {**ctx.meta(), "config": asdict(cfg), "results": res}
    write_result(out_dir, "ppl", payload, "\n".join(md))
    return payload
