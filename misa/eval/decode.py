"""``misa eval decode``: needle in a haystack and per-layer recall with the selection made at decode,
through the paged index-K cache, as an engine makes it.

Each needle cell is one teacher-forced forward (``niah``'s prompts and check: greedy decoding yields
the answer iff the argmax at every answer position equals the answer token). In every layer with an
indexer:

- the prompt rows (prefill) keep DSA's prefill selection (``misa.dsa_select`` over the sequence),
  whatever the method, so that only the decode-time selection differs between methods;
- the answer rows are the decode steps: the layer's fp8 indexer keys are written into a paged cache
  of 64-token pages under a shuffled block table (``misa.write_paged_kcache`` with the pooled-key
  cache), and each answer row selects with the method's paged function (``misa.paged_dsa_select``,
  ``misa.paged_misa_select``, ``misa.paged_hisa_select``) as one decode step of a sequence whose
  context ends at that row (the answer rows of a cell are a batch of sequences sharing the table).

Writing every key first and then selecting is the same as decoding step by step: a key depends only
on the tokens up to its own position, and a row never reads keys past its context. The one cached
value a row could see early is the pooled sum of its own, partial, last page, and block-pruned
decode always keeps that page whatever its score. The first answer token is predicted by the last
prompt row, i.e. by prefill, so it is the same for every method.

Per-layer recall compares each method's decode selection with DSA's paged decode selection made on
the same cache in the same forward. Bytes read per decode step and layer are a formula over the
cache layout (``bytes_per_step``).
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import misa
from misa import quant
from misa.ops.blocks.reference import kept_blocks
from misa.variants import METHODS as LIBRARY_METHODS, VARIANTS

from . import data
from .common import EvalContext
from .indexer import IndexerInputs, IndexerStack
from .niah import TEACHER_FORCING_NOTE, PromptBuilder, Sample, grid_scores, single_needle
from .report import fmt, md_table, write_result
from .selectors import METHODS, SelectorSettings, describe, label, library_config, select, selection_mask

DECODE_METHODS = ["dsa", "misa-h8", "misa-gap-h8", "misa-dagger", "hisa-m32", "hisa-m64", "hisa-m128"]
# block-pruned decode keeping N pages of 64 tokens (the pooled-key cache scores the pages)
BLOCK_PRUNED = re.compile(r"hisa-m([1-9][0-9]*)$")
# methods with a paged decode function: DSA and the MISA family (prefill HISA's "hisa" is replaced
# here by the block-pruned decode names)
PAGED_LIBRARY = [n for n, m in METHODS.items() if m.base is not None and LIBRARY_METHODS[m.base].variant != "hisa"]
PROMPT_NOTE = ("Prompt rows (prefill) use DSA's prefill selection for every method; only the answer rows, "
               "each a decode step over the paged cache, use the method's decode selection. The first answer "
               "token comes from the last prompt row (prefill), so it is the same for every method.")


def block_pages(name: str) -> int | None:
    """Pages kept by a block-pruned decode method ``hisa-m<N>``; None for any other name."""
    m = BLOCK_PRUNED.match(name)
    return int(m.group(1)) if m else None


def check_methods(methods: list[str], k: int) -> list[str]:
    """``methods``, each a paged library method or ``hisa-m<N>`` whose N pages hold at least k tokens;
    raises ValueError naming ``methods``."""
    if not methods:
        raise ValueError("methods: need at least one method")
    bad = [m for m in methods if m not in PAGED_LIBRARY and block_pages(m) is None]
    if bad:
        raise ValueError(f"methods: unknown {bad}, expected some of {PAGED_LIBRARY} or hisa-m<pages> "
                         f"(block-pruned decode keeping that many 64-token pages)")
    for m in methods:
        pages = block_pages(m)
        if pages is not None and pages * quant.PAGE_SIZE < k:
            raise ValueError(f"methods: {m} keeps {pages} pages of {quant.PAGE_SIZE} tokens "
                             f"({pages * quant.PAGE_SIZE}), fewer than k = {k}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods: listed twice in {methods}")
    return list(methods)


def decode_methods(decode_names: list[str] | None, shared_names: list[str] | None, strict: bool) -> list[str] | None:
    """The methods a command line asks decode for: its own list, else the shared ``--methods`` (all of
    them with ``strict``, checked by ``DecodeConfig``; else those decode can run, as ``misa eval all``
    shares one list with the prefill evaluations); None: the default list."""
    if decode_names:
        return list(decode_names)
    if not shared_names:
        return None
    if strict:
        return list(shared_names)
    return [m for m in shared_names if m in PAGED_LIBRARY or block_pages(m) is not None] or None


@dataclass
class DecodeConfig:
    lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    depths: int = 11
    methods: list[str] = field(default_factory=lambda: list(DECODE_METHODS))
    k: int = 256
    seed: int = 0
    settings: SelectorSettings = field(default_factory=SelectorSettings)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k: must be a positive int, got {self.k!r}")
        check_methods(self.methods, self.k)
        if not isinstance(self.depths, int) or self.depths < 1:
            raise ValueError(f"depths: must be >= 1, got {self.depths!r}")
        if not self.lengths or any(not isinstance(n, int) or n < 256 for n in self.lengths):
            raise ValueError(f"lengths: contexts must be ints >= 256 tokens, got {self.lengths!r}")


# ---------------------------------------------------------------------------------------------
def paged_cache(kv: tuple, generator: torch.Generator, spare_pages: int = 2):
    """``kv = (k_fp8 [S, D], k_scale [S])`` written into a fresh paged cache and its pooled-key
    cache through a shuffled block table: ``(kv_cache, pooled, block_table_row [pages] int32)``.
    The spare pages hold random bytes, so a reader that strays from the table reads noise."""
    k_fp8, k_scale = kv
    s, d = k_fp8.shape
    dev = k_fp8.device
    pages = -(-s // quant.PAGE_SIZE)
    total = pages + spare_pages
    order = torch.randperm(total, generator=generator).to(device=dev, dtype=torch.int32)
    cache = misa.new_paged_kcache(total, d, device=dev)
    cache.random_(0, 256, generator=None)
    pooled = misa.new_pooled_kcache(total, d, device=dev)
    table = order[:pages].contiguous()
    pos = torch.arange(s, device=dev)
    slots = table[pos // quant.PAGE_SIZE].long() * quant.PAGE_SIZE + pos % quant.PAGE_SIZE
    misa.write_paged_kcache(cache, slots, k_fp8, k_scale, pooled=pooled)
    return cache, pooled, table


def decode_select(name: str, inp: IndexerInputs, rows: torch.Tensor, cache, pooled, table_row, k: int,
                  settings: SelectorSettings) -> torch.Tensor:
    """Method ``name``'s decode selection for the query rows ``rows`` (positions), each a decode step
    of one sequence whose context ends at that row: ``[len(rows), k]`` int32 positions, -1 padded."""
    n = rows.numel()
    q = inp.q[rows].unsqueeze(1).contiguous()                      # [n, next_n = 1, H, D]
    weights = inp.weights[rows].contiguous()
    context_lens = (rows + 1).to(torch.int32)
    block_table = table_row[None].expand(n, -1).contiguous()
    pages = block_pages(name)
    if pages is not None:
        return misa.paged_hisa_select(q, cache, weights, context_lens, block_table, k,
                                      block_size=quant.PAGE_SIZE, block_k=pages, pooled=pooled)
    # MISA's router pools the keys from the cache itself (an engine's pooled-key cache gives the same
    # routing up to float rounding, but the one built here holds a row's future keys in its last page)
    return library_config(name, k, settings).paged_select(q, cache, weights, context_lens, block_table, k)


class DecodeAttention:
    """``hooks.Controller``'s ``sparse`` callback for one cell: DSA's prefill selection on the prompt
    rows, method ``method``'s paged decode selection on the answer rows (``answer_start`` onwards).

    After a forward, ``recall[layer]`` holds the per-answer-row recall of DSA's decode selection
    (same cache, same forward) and ``selections[layer]`` the ``[T, k]`` selection the mask came from;
    for ``dsa`` also ``prefill_recall[layer]``: its decode rows against DSA's prefill selection."""

    def __init__(self, stack: IndexerStack, method: str, k: int, answer_start: int,
                 settings: SelectorSettings = SelectorSettings(), seed: int = 0, keep_selections: bool = False):
        check_methods([method], k)
        self.stack, self.method, self.k, self.answer_start = stack, method, k, answer_start
        self.settings, self.seed, self.keep_selections = settings, seed, keep_selections
        self.recall: dict[int, torch.Tensor] = {}
        self.prefill_recall: dict[int, torch.Tensor] = {}
        self.selections: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        t = x.shape[0]
        if t <= self.k or layer not in self.stack:     # every row keeps all its keys: causal attention
            return None
        a = self.answer_start
        if not 0 < a < t:
            raise ValueError(f"answer_start: must be in (0, {t}), got {a}")
        inp = self.stack.inference_inputs(layer, x)
        dev = x.device
        ends = torch.arange(1, t + 1, device=dev, dtype=torch.int32)
        prefill_rows = t if self.method == "dsa" else a    # DSA: its answer rows too, for the check
        prefill = select("dsa", _rows(inp, prefill_rows), torch.zeros_like(ends[:prefill_rows]),
                         ends[:prefill_rows], self.k, self.settings)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        cache, pooled, table = paged_cache(inp.kv, g)
        rows = torch.arange(a, t, device=dev)
        dec = decode_select(self.method, inp, rows, cache, pooled, table, self.k, self.settings)
        if self.method == "dsa":
            self.recall[layer] = torch.ones(rows.numel())
            self.prefill_recall[layer] = misa.recall(dec, prefill[a:]).cpu()
        else:
            ref = decode_select("dsa", inp, rows, cache, pooled, table, self.k, self.settings)
            self.recall[layer] = misa.recall(dec, ref).cpu()
        sel = torch.cat([prefill[:a], dec])
        if self.keep_selections:
            self.selections[layer] = sel
        return selection_mask(sel, t)


def _rows(inp: IndexerInputs, n: int) -> IndexerInputs:
    return IndexerInputs(inp.q[:n], inp.kv, inp.weights[:n], inp.raw_weights[:n])


@torch.no_grad()
def predict(ctx: EvalContext, s: Sample, sparse) -> torch.Tensor:
    """Greedy predictions ``[answer tokens]`` under teacher forcing (niah's check, one forward)."""
    h = ctx.hidden(s.ids, sparse)
    pos = torch.arange(s.answer_start - 1, s.ids.numel() - 1, device=ctx.device)
    return ctx.logits_at(h, pos).argmax(dim=-1).cpu()


def bytes_per_step(name: str, context: int, k: int, head_dim: int, settings: SelectorSettings) -> int:
    """Index-cache bytes one decode step reads in one layer at ``context`` tokens (keys only: q and
    weights are the same for every method). A cached token is ``D + 4`` bytes (fp8 key + fp32
    scale), a pooled-key row ``2 D`` (bfloat16), P = ceil(context / 64) pages:

    - DSA: every token, ``context (D + 4)``;
    - MISA (h heads): every token (the heads share the keys) + the router's P pooled rows;
    - MISA-dagger: that + its ``stage1_k`` candidates gathered again for all heads;
    - block-pruned, m pages: P pooled rows + the kept pages, ``min(m', P) 64 (D + 4)`` with
      m' = max(m, ceil(k / 64) + 2) (the first and last pages are always kept)."""
    tok, row = head_dim + 4, quant.POOLED_DTYPE.itemsize * head_dim
    pages = -(-context // quant.PAGE_SIZE)
    m = block_pages(name)
    if m is not None:
        kept = min(kept_blocks(k, quant.PAGE_SIZE, m), pages)
        return pages * row + min(kept * quant.PAGE_SIZE, context) * tok
    variant = VARIANTS[LIBRARY_METHODS[METHODS[name].base].variant]
    out = context * tok
    if variant.routed:
        out += pages * row
    if variant.two_stage:
        out += min(library_config(name, k, settings).stage1_k, context) * tok
    return out


def method_setting(name: str, k: int, s: SelectorSettings) -> str:
    m = block_pages(name)
    if m is None:
        return describe(name, k, s)
    kept = kept_blocks(k, quant.PAGE_SIZE, m)
    return (f"block-pruned: pooled keys of {quant.PAGE_SIZE}-token pages scored, {kept} pages kept "
            f"(the first and the last always){'' if kept == m else f', m = {m} raised to hold k'}")


def method_label(name: str) -> str:
    return "block-pruned" if block_pages(name) is not None else label(name)


# ---------------------------------------------------------------------------------------------
def run(ctx: EvalContext, cfg: DecodeConfig, out_dir: Path, progress=None, deadline: float | None = None,
        previous: dict | None = None) -> dict:
    """Every cell for every method; past ``deadline`` (a ``time.perf_counter()`` value) the remaining
    cells stay unscored (None). ``previous``: an earlier, time-limited run's JSON to resume from."""
    if ctx.stack is None:
        raise ValueError("indexer: the decode evaluation needs a trained indexer")
    late = lambda: deadline is not None and time.perf_counter() > deadline
    pb = PromptBuilder(ctx.tokenizer, data.heldout_tokens(ctx.tokenizer, ctx.corpus, ctx.token_cache))
    depths = [i / max(1, cfg.depths - 1) for i in range(cfg.depths)]
    rng = random.Random(cfg.seed)
    samples = [single_needle(pb, L, d, rng) for L in cfg.lengths for d in depths]
    return run_samples(ctx, cfg, samples, depths, out_dir, progress, late, previous)


def run_samples(ctx: EvalContext, cfg: DecodeConfig, samples: list[Sample], depths: list[float], out_dir: Path,
                progress=None, late=lambda: False, previous: dict | None = None) -> dict:
    """``run`` on given samples, ``samples[i * len(depths) + j]`` the cell of length i, depth j."""
    nd = len(depths)
    grid = {m: [[None] * nd for _ in cfg.lengths] for m in cfg.methods}
    # per method and layer: [sum of recall over answer rows, answer rows], summed over the cells
    sums = {m: {} for m in cfg.methods}
    prefill_sums: dict = {}
    if previous and previous.get("config", {}).get("lengths") == cfg.lengths and previous.get("depths") == depths \
            and previous.get("config", {}).get("k") == cfg.k and previous.get("config", {}).get("seed") == cfg.seed:
        for m in cfg.methods:          # resume: keep what an earlier, time-limited run scored
            if m in previous.get("grid", {}):
                grid[m] = previous["grid"][m]
                sums[m] = {int(l): list(v) for l, v in previous.get("recall_sums", {}).get(m, {}).items()}
        prefill_sums = {int(l): list(v) for l, v in previous.get("dsa_prefill_sums", {}).items()}
    order = [(i, j) for i in range(len(cfg.lengths)) for j in range(nd)]
    random.Random(cfg.seed + 2).shuffle(order)       # if time runs out, what was scored is spread out
    for i, j in order:
        s = samples[i * nd + j]
        for m in cfg.methods:
            if late() or grid[m][i][j] is not None:
                continue
            att = DecodeAttention(ctx.stack, m, cfg.k, s.answer_start, cfg.settings, cfg.seed)
            grid[m][i][j] = bool(torch.equal(predict(ctx, s, att), s.ids[s.answer_start:]))
            for layer, r in att.recall.items():
                acc = sums[m].setdefault(layer, [0.0, 0])
                acc[0] += float(r.sum())
                acc[1] += r.numel()
            for layer, r in att.prefill_recall.items():
                acc = prefill_sums.setdefault(layer, [0.0, 0])
                acc[0] += float(r.sum())
                acc[1] += r.numel()
            if progress is not None:
                progress(m)
    answer_tokens = [int(s.ids.numel() - s.answer_start) for s in samples]
    return report(ctx, cfg, grid, sums, prefill_sums, depths, answer_tokens, out_dir)


def report(ctx, cfg: DecodeConfig, grid, sums, prefill_sums, depths, answer_tokens, out_dir: Path) -> dict:
    s = cfg.settings
    cells, scored, acc, agree = grid_scores(grid, len(cfg.lengths), len(depths))
    layers = ctx.stack.layer_ids
    recall = {m: {str(l): (sums[m][l][0] / sums[m][l][1] if sums[m].get(l) and sums[m][l][1] else None)
                  for l in layers} for m in cfg.methods}
    head_dim = ctx.stack.cfg.head_dim
    nbytes = {m: {str(L): bytes_per_step(m, L, cfg.k, head_dim, s) for L in cfg.lengths} for m in cfg.methods}
    dense = {L: bytes_per_step("dsa", L, cfg.k, head_dim, s) for L in cfg.lengths}
    md = [f"# Decode-time needle in a haystack, k = {cfg.k} tokens per query in every layer\n",
          TEACHER_FORCING_NOTE + " " + PROMPT_NOTE + "\n",
          f"Haystack: the held-out text ({data.heldout_file(ctx.corpus).name}); contexts {cfg.lengths}; {len(depths)} "
          f"depths; one needle value per cell (a random 7-digit number); {min(answer_tokens)}-{max(answer_tokens)} "
          f"answer tokens (decode steps) per cell. Decode selection reads a paged index-K cache of "
          f"{quant.PAGE_SIZE}-token pages through a shuffled block table, with the pooled-key cache beside it. "
          f"This is a small model at <= {max(cfg.lengths)}-token context, not DeepSeek-V3.2 at 128K.\n",
          md_table(["method", "setting", "cells passed", "agrees with DSA (both right or both wrong)",
                    "cells scored"] + [f"KB read per step and layer at {L}" for L in cfg.lengths],
                   [[m, method_setting(m, cfg.k, s), fmt(acc[m]), fmt(agree.get(m)), f"{len(scored[m])}/{len(cells)}"]
                    + [f"{nbytes[m][str(L)] / 1024:.1f} ({nbytes[m][str(L)] / dense[L]:.2f}x DSA)" for L in cfg.lengths]
                    for m in grid]),
          f"\nBytes: index-cache bytes one decode step reads in one layer (indexer head dim D = {head_dim}): a "
          f"token is D + 4 bytes (fp8 key + fp32 scale), a pooled-key row 2D bytes (bfloat16), P = ceil(context / 64) pages. "
          f"DSA: context x (D + 4); MISA: the same (its heads share the keys) + P pooled rows for the router "
          f"(routing from an engine's pooled-key cache; here it pools the cached keys, the same routing up to "
          f"rounding); "
          f"MISA-dagger: that + k1 x (D + 4) for the re-scored candidates; block-pruned with m pages: P pooled rows "
          f"+ min(m', P) x 64 x (D + 4), m' = max(m, ceil(k / 64) + 2).\n",
          "## Per cell (rows: context; columns: needle depth; 1 = found)\n"]
    for m in grid:
        md.append(f"**{m}**\n")
        md.append(md_table(["context"] + [f"{round(100 * d)}%" for d in depths],
                           [[str(L)] + ["-" if v is None else str(int(v)) for v in grid[m][i]]
                            for i, L in enumerate(cfg.lengths)]) + "\n")
    md.append("## Recall of DSA's decode selection per layer (mean over the answer rows of the scored cells)\n\n"
              "Each method's paged decode selection against DSA's paged decode selection on the same cache in the "
              "same forward.\n")
    rows = [[str(l)] + [fmt(recall[m][str(l)]) for m in cfg.methods] for l in layers]
    means = {m: [v for v in recall[m].values() if v is not None] for m in cfg.methods}
    rows.append(["mean"] + [fmt(sum(v) / len(v)) if v else "-" for v in means.values()])
    rows.append(["min"] + [fmt(min(v)) if v else "-" for v in means.values()])
    md.append(md_table(["layer"] + list(cfg.methods), rows))
    prefill_recall = {str(l): v[0] / v[1] for l, v in prefill_sums.items() if v[1]}
    if prefill_recall:
        vals = list(prefill_recall.values())
        md.append(f"\nDSA's decode selection against its prefill selection on the same rows (recall, the paged path "
                  f"checked against the prefill path): mean {sum(vals) / len(vals):.4f}, min {min(vals):.4f}.\n")
    payload = {**ctx.meta(), "config": asdict(cfg), "note": TEACHER_FORCING_NOTE + " " + PROMPT_NOTE,
               "depths": depths, "grid": grid, "accuracy": acc, "agrees_with_dsa": agree,
               "recall_per_layer": recall, "recall_sums": {m: {str(l): v for l, v in d.items()} for m, d in sums.items()},
               "dsa_prefill_recall_per_layer": prefill_recall,
               "dsa_prefill_sums": {str(l): v for l, v in prefill_sums.items()},
               "bytes_per_step_per_layer": nbytes, "answer_tokens": answer_tokens}
    write_result(out_dir, "decode", payload, "\n".join(md))
    return payload
