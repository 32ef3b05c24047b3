"""Texts for training and evaluation: the long texts in a corpus folder, one held out.

Training reads every ``*.txt`` of the corpus except ``HELD_OUT`` (the Paul Graham essays, the usual
needle-in-a-haystack haystack), which only evaluation reads; a corpus that is one file serves both.
The corpus is ``--corpus``, else ``$MISA_CORPUS``, else a ``shared/data/text`` folder in or above
the checkout (``find_default_corpus``). Token ids are cached per file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import torch

HELD_OUT = "paul_graham_essays.txt"
# the corpus folder searched for, relative to the repository checkout or any folder above it
DEFAULT_CORPUS = "shared/data/text"
CORPUS_HELP = (f"the texts: a folder of .txt files (training reads all but {HELD_OUT}, evaluation reads only "
               f"{HELD_OUT}) or one .txt file (read by both). Default: $MISA_CORPUS, else the first "
               f"{DEFAULT_CORPUS} folder in or above the folder that holds the misa checkout; without either, "
               f"pass --corpus FILE")


def find_default_corpus() -> Path | None:
    """``$MISA_CORPUS``, else the first ``shared/data/text`` folder found in the checkout that holds
    this package or in a folder above it (relative to the package, never a fixed path); None when
    there is neither."""
    env = os.environ.get("MISA_CORPUS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]          # misa/eval/data.py -> the checkout
    for folder in (repo, *repo.parents):
        candidate = folder / DEFAULT_CORPUS
        if candidate.is_dir():
            return candidate
    return None


def corpus_path(path: str | os.PathLike | None = None) -> Path:
    """The corpus: ``path`` (a folder of .txt files or one .txt file), else ``find_default_corpus()``.
    Raises ``ValueError`` naming ``corpus`` when there is none."""
    if path:
        p = Path(path)
        if not (p.is_dir() or p.is_file()):
            raise ValueError(f"corpus: no such file or folder {p} (pass --corpus FILE, a .txt file or a folder "
                             f"of them)")
        return p
    p = find_default_corpus()
    if p is None:
        raise ValueError(f"corpus: no corpus found ($MISA_CORPUS is unset and there is no {DEFAULT_CORPUS} folder "
                         f"in or above {Path(__file__).resolve().parents[2]}); pass --corpus FILE (a .txt file, "
                         f"or a folder of .txt files holding {HELD_OUT})")
    if not (p.is_dir() or p.is_file()):
        raise ValueError(f"corpus: MISA_CORPUS={p} is neither a file nor a folder (pass --corpus FILE)")
    return p


def corpus_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the corpus (``corpus_path``'s folder when it is one file)."""
    p = corpus_path(path)
    return p if p.is_dir() else p.parent


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", **options):
    """A file of this process's own beside ``path``, moved onto ``path`` in one step once written
    (removed on failure): processes writing the same file at once, e.g. parallel test workers or
    two demos, never read a half-written one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **options) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        with atomic_file(cache / f"{f.stem}-{key}.pt") as out:
            torch.save(ids, out)
    return ids


def train_tokens(tokenizer, corpus=None, cache: Path | None = None) -> torch.Tensor:
    """All training texts, tokenised and joined with the end-of-text token between them."""
    p = corpus_path(corpus)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*.txt") if f.name != HELD_OUT)
    if not files:
        raise ValueError(f"corpus: no training .txt files (other than {HELD_OUT}) in {p}")
    sep = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    parts = []
    for f in files:
        parts += [_tokens(tokenizer, f, cache), sep]
    return torch.cat(parts)


def heldout_file(corpus=None) -> Path:
    """The evaluation's text: ``HELD_OUT`` in the corpus folder, or the corpus when it is one file."""
    p = corpus_path(corpus)
    if p.is_file():
        return p
    if not (p / HELD_OUT).is_file():
        raise ValueError(f"corpus: the held-out text {HELD_OUT} is missing from {p} (pass --corpus FILE)")
    return p / HELD_OUT


def file_tokens(tokenizer, f: Path, cache: Path | None = None) -> torch.Tensor:
    """One text file, tokenised (cached like the corpus files)."""
    return _tokens(tokenizer, Path(f), cache)


def heldout_tokens(tokenizer, corpus=None, cache: Path | None = None) -> torch.Tensor:
    return _tokens(tokenizer, heldout_file(corpus), cache)


def heldout_text(corpus=None) -> str:
    return heldout_file(corpus).read_text(encoding="utf-8")


def windows(tokens: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` disjoint windows of ``length`` tokens, spread evenly over ``tokens``."""
    n = tokens.numel() // length
    if n == 0:
        raise ValueError(f"context: {length} tokens asked for, the text has {tokens.numel()}")
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()
    return [tokens[i * length:(i + 1) * length].long() for i in picks]
