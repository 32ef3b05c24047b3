"""Texts for training and evaluation: the long texts in a corpus folder, one held out.

Training reads every ``*.txt`` of the corpus except ``HELD_OUT`` (the Paul Graham essays, the usual
needle-in-a-haystack haystack), which only evaluation reads. Token ids are cached per file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

HELD_OUT = "paul_graham_essays.txt"
DEFAULT_CORPUS = "/work/shared/data/text"


def _default_corpus() -> Path:
    """``$MISA_CORPUS``, else ``shared/data/text`` beside the checkout (as CI lays it out), else
    ``DEFAULT_CORPUS``."""
    env = os.environ.get("MISA_CORPUS")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text"
    return beside if beside.is_dir() else Path(DEFAULT_CORPUS)


def corpus_dir(path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path else _default_corpus()
    if not p.is_dir():
        raise ValueError(f"corpus: no such folder {p} (pass --corpus DIR of .txt files)")
    return p


def _tokens(tokenizer, f: Path, cache: Path | None) -> torch.Tensor:
    key = None
    if cache is not None:
        st = f.stat()
        key = hashlib.sha1(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}:{tokenizer.__class__.__name__}:"
                           f"{len(tokenizer)}".encode()).hexdigest()[:12]
        c = cache / f"{f.stem}-{key}.pt"
        if c.is_file():
            return torch.load(c)
    ids = torch.tensor(tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"], dtype=torch.int32)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{f.stem}-{key}.pt.tmp"
        torch.save(ids, tmp)
        tmp.rename(cache / f"{f.stem}-{key}.pt")
    return ids


def train_tokens(tokenizer, corpus=None, cache: Path | None = None) -> torch.Tensor:
    """All training texts, tokenised and joined with the end-of-text token between them."""
    files = sorted(f for f in corpus_dir(corpus).glob("*.txt") if f.name != HELD_OUT)
    if not files:
        raise ValueError(f"corpus: no training .txt files (other than {HELD_OUT}) in {corpus_dir(corpus)}")
    sep = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    parts = []
    for f in files:
        parts += [_tokens(tokenizer, f, cache), sep]
    return torch.cat(parts)


def heldout_tokens(tokenizer, corpus=None, cache: Path | None = None) -> torch.Tensor:
    f = corpus_dir(corpus) / HELD_OUT
    if not f.is_file():
        raise ValueError(f"corpus: the held-out text {HELD_OUT} is missing from {corpus_dir(corpus)}")
    return _tokens(tokenizer, f, cache)


def heldout_text(corpus=None) -> str:
    return (corpus_dir(corpus) / HELD_OUT).read_text(encoding="utf-8")


def windows(tokens: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` disjoint windows of ``length`` tokens, spread evenly over ``tokens``."""
    n = tokens.numel() // length
    if n == 0:
        raise ValueError(f"context: {length} tokens asked for, the text has {tokens.numel()}")
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()
    return [tokens[i * length:(i + 1) * length].long() for i in picks]
