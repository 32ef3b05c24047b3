"""``misa eval niah``: needle in a haystack, and RULER-style multi-key and variable-tracking tasks.

The haystack is the held-out Paul Graham essays. Each cell gets its own needle value. The prompt
uses the model's chat template and ends with the start of the answer ("The special magic number
is"), so the answer is a fixed token sequence. Scoring is exact match under greedy decoding, checked
with ONE teacher-forced forward: greedy decoding produces the answer iff the argmax at every answer
position equals the answer's token there (each argmax is conditioned on the answer's earlier tokens,
which is exactly what greedy decoding would have fed back). Each method is a full forward of the
model with every layer's attention restricted to its selector's k tokens.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data
from .common import EvalContext
from .report import fmt, md_table, write_result
from .selectors import SelectorSettings, check_in_model, describe, display
from .sparse import SparseAttention

NIAH_METHODS = ["dense", "dsa", "misa-h8", "misa-dagger", "hisa", "sink-window"]
TEACHER_FORCING_NOTE = ("Exact match under greedy decoding, checked with one teacher-forced forward per cell: greedy "
                        "decoding yields the answer iff the argmax at every answer position equals the answer token.")
WORDS = ("apple river candle violet marble anchor lantern pepper falcon meadow copper harbor velvet orchid "
         "thunder saddle glacier quartz walnut compass ember juniper lagoon mosaic nectar pebble quill raven "
         "sapphire tundra").split()


@dataclass
class NiahConfig:
    lengths: list[int] = field(default_factory=lambda: [1024 * i for i in range(1, 9)])
    depths: int = 11
    methods: list[str] = field(default_factory=lambda: list(NIAH_METHODS))
    k: int = 256
    ruler_lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    ruler_samples: int = 8
    mk_needles: int = 4
    vt_hops: int = 4
    seed: int = 0
    settings: SelectorSettings = field(default_factory=SelectorSettings)

    def __post_init__(self):
        check_in_model(self.methods)
        if self.depths < 1:
            raise ValueError(f"depths: must be >= 1, got {self.depths}")
        if any(n < 256 for n in self.lengths + self.ruler_lengths):
            raise ValueError("lengths: contexts must be >= 256 tokens")


@dataclass
class Sample:
    ids: torch.Tensor          # [T] int64: the prompt followed by the answer
    answer_start: int          # the answer occupies ids[answer_start:]
    label: str


class PromptBuilder:
    def __init__(self, tokenizer, haystack: torch.Tensor):
        self.tok = tokenizer
        self.hay = haystack.long()
        self.period = set(i for t, i in tokenizer.get_vocab().items() if t.endswith("."))

    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chat(self, body_ids: list[int], question: str, answer_prefix: str, answer: str) -> Sample:
        head = self.tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                            add_generation_prompt=True)
        pre, post = head.split("\x00")
        ids = self.enc(pre) + body_ids + self.enc("\n\n" + question + post + answer_prefix)
        ans = self.enc(answer)
        return Sample(torch.tensor(ids + ans), len(ids), answer)

    def overhead(self, question: str, answer_prefix: str, answer: str) -> int:
        return self.chat([], question, answer_prefix, answer).ids.numel()

    def snap(self, pos: int, body: list[int]) -> int:
        """Move an insertion point back to just after a sentence end (within 60 tokens)."""
        for p in range(pos, max(0, pos - 60), -1):
            if p == 0 or body[p - 1] in self.period:
                return p
        return pos

    def haystack(self, n: int, offset: int) -> list[int]:
        start = offset % max(1, self.hay.numel() - n)
        return self.hay[start:start + n].tolist()

    def with_needles(self, total: int, needles: list[tuple[float, str]], question: str, answer_prefix: str,
                     answer: str, offset: int) -> Sample:
        need = [self.enc(" " + text + " ") for _, text in needles]
        n_hay = total - self.overhead(question, answer_prefix, answer) - sum(map(len, need))
        if n_hay < 16:
            raise ValueError(f"lengths: {total} tokens leave no room for a haystack")
        body = self.haystack(n_hay, offset)
        inserts = sorted(((self.snap(round(d * n_hay), body), ids) for (d, _), ids in zip(needles, need)),
                         key=lambda x: x[0])
        out, prev = [], 0
        for pos, ids in inserts:
            out += body[prev:pos] + ids
            prev = pos
        out += body[prev:]
        return self.chat(out, question, answer_prefix, answer)


def single_needle(pb: PromptBuilder, total: int, depth: float, rng: random.Random) -> Sample:
    value = str(rng.randrange(1_000_000, 10_000_000))
    return pb.with_needles(total, [(depth, f"The special magic number is {value}.")],
                           "What is the special magic number mentioned in the text above?",
                           "The special magic number is", " " + value, rng.randrange(1 << 30))


def multi_key(pb: PromptBuilder, total: int, needles: int, rng: random.Random) -> Sample:
    keys = rng.sample(WORDS, needles)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    placed = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys, values)]
    target = rng.randrange(needles)
    return pb.with_needles(total, placed, f"What is the special magic number for {keys[target]} mentioned in the text above?",
                           f"The special magic number for {keys[target]} mentioned in the text above is",
                           " " + values[target], rng.randrange(1 << 30))


def variable_tracking(pb: PromptBuilder, total: int, hops: int, rng: random.Random) -> Sample:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops)]
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops)]
    depths = sorted(rng.random() for _ in chain)
    return pb.with_needles(total, list(zip(depths, chain)),
                           f"Find all variables that are assigned the value {value} in the text above.",
                           f"Answer: According to the chain(s) of variable assignment in the text above, {hops} "
                           f"variables are assigned the value {value}, they are:",
                           " " + " ".join(names), rng.randrange(1 << 30))


@torch.no_grad()
def exact_match(ctx: EvalContext, s: Sample, sparse) -> bool:
    h = ctx.hidden(s.ids, sparse)
    pos = torch.arange(s.answer_start - 1, s.ids.numel() - 1, device=ctx.device)
    pred = ctx.logits_at(h, pos).argmax(dim=-1).cpu()
    return bool(torch.equal(pred, s.ids[s.answer_start:]))


def run(ctx: EvalContext, cfg: NiahConfig, out_dir: Path, progress=None, deadline: float | None = None,
        previous: dict | None = None) -> dict:
    """All cells for every method; past ``deadline`` (a ``time.perf_counter()`` value) the remaining
    cells are left unscored (None, grey in the heatmap) rather than overrunning the time given."""
    import time
    late = lambda: deadline is not None and time.perf_counter() > deadline
    pb = PromptBuilder(ctx.tokenizer, data.heldout_tokens(ctx.tokenizer, ctx.corpus, ctx.token_cache))
    depths = [i / max(1, cfg.depths - 1) for i in range(cfg.depths)]
    rng = random.Random(cfg.seed)
    cells = [(L, d, single_needle(pb, L, d, rng)) for L in cfg.lengths for d in depths]
    rng = random.Random(cfg.seed + 1)
    ruler = [(task, L, fn(pb, L, n, rng)) for L in cfg.ruler_lengths for task, fn, n in
             (("multi-key", multi_key, cfg.mk_needles), ("variable-tracking", variable_tracking, cfg.vt_hops))
             for _ in range(cfg.ruler_samples)]
    grid = {m: [[None] * len(depths) for _ in cfg.lengths] for m in cfg.methods}
    rul: dict = {m: {} for m in cfg.methods}
    if previous and previous.get("config", {}).get("lengths") == cfg.lengths and previous.get("depths") == depths \
            and previous.get("config", {}).get("k") == cfg.k and previous.get("config", {}).get("seed") == cfg.seed:
        for m in cfg.methods:          # resume: keep what an earlier, time-limited run scored
            if m in previous.get("grid", {}):
                grid[m] = previous["grid"][m]
            rul[m] = {key: list(v) for key, v in previous.get("ruler_raw", {}).get(m, {}).items()}
    sparse = {m: SparseAttention(ctx.stack, m, cfg.k, cfg.settings) for m in cfg.methods}
    # cells in a fixed shuffled order, every method per cell: if time runs out, what was scored is
    # spread over the grid and comparable across methods
    order = [(i, j) for i in range(len(cfg.lengths)) for j in range(len(depths))]
    random.Random(cfg.seed + 2).shuffle(order)
    for i, j in order:
        for m in cfg.methods:
            if late() or grid[m][i][j] is not None:
                continue
            grid[m][i][j] = exact_match(ctx, cells[i * len(depths) + j][2], sparse[m])
            if progress is not None:
                progress(m)
    seen: dict = {}
    for task, L, s in ruler:
        key = f"{task}/{L}"
        seen[key] = seen.get(key, 0) + 1
        for m in cfg.methods:
            if late() or len(rul[m].get(key, [])) >= seen[key]:
                continue
            rul[m].setdefault(f"{task}/{L}", []).append(exact_match(ctx, s, sparse[m]))
            if progress is not None:
                progress(m)
    return report(ctx, cfg, grid, rul, depths, out_dir)


def grid_scores(grid: dict, n_lengths: int, n_depths: int):
    """``(cells, scored, passed, agrees)`` of per-method ``[length][depth]`` grids of True / False /
    None (not scored): the scored cells per method, the share passed, and the share of cells scored
    for both where the method's answer matches DSA's (when DSA is in the grid)."""
    cells = [(i, j) for i in range(n_lengths) for j in range(n_depths)]
    scored = {m: [c for c in cells if g[c[0]][c[1]] is not None] for m, g in grid.items()}
    acc = {m: (sum(g[i][j] for i, j in scored[m]) / len(scored[m]) if scored[m] else None) for m, g in grid.items()}
    agree = {}
    if "dsa" in grid:
        for m, g in grid.items():
            both = [(i, j) for i, j in scored[m] if grid["dsa"][i][j] is not None]
            agree[m] = sum(g[i][j] == grid["dsa"][i][j] for i, j in both) / len(both) if both else None
    return cells, scored, acc, agree


def report(ctx, cfg: NiahConfig, grid, rul, depths, out_dir: Path) -> dict:
    s = cfg.settings
    cells, scored, acc, agree = grid_scores(grid, len(cfg.lengths), len(depths))
    md = [f"# Needle in a haystack, k = {cfg.k} tokens per query in every layer\n", TEACHER_FORCING_NOTE + "\n",
          f"Haystack: the held-out text ({data.heldout_file(ctx.corpus).name}); contexts {cfg.lengths}; {len(depths)} "
          f"depths; one needle value per cell (a random 7-digit number). This is a small model at <= "
          f"{max(cfg.lengths + cfg.ruler_lengths)}-token context, not DeepSeek-V3.2 at 128K.\n",
          md_table(["method", "setting", "cells passed", "agrees with DSA (target >= 0.98)", "cells scored"],
                   [[display(m), describe(m, cfg.k, s), fmt(acc[m]), fmt(agree.get(m)), f"{len(scored[m])}/{len(cells)}"]
                    for m in grid]),
          "\n## RULER-style tasks (exact match; fraction of samples)\n"]
    keys = sorted({key for r in rul.values() for key in r}, key=lambda x: (x.split("/")[0], int(x.split("/")[1])))
    md.append(md_table(["method"] + keys, [[display(m)] + [f"{sum(rul[m][key]) / len(rul[m][key]):.2f} (n={len(rul[m][key])})"
                                                  if key in rul[m] else "-" for key in keys] for m in rul]))
    md.append(f"\nmulti-key: {cfg.mk_needles} needles, one asked for; variable tracking: a chain of {cfg.vt_hops} "
              f"assignments, the answer lists all {cfg.vt_hops} names in order; {cfg.ruler_samples} samples each.\n")
    payload = {**ctx.meta(), "config": asdict(cfg), "note": TEACHER_FORCING_NOTE, "depths": depths,
               "grid": grid, "accuracy": acc, "agrees_with_dsa": agree,
               "ruler": {m: {k: sum(v) / len(v) for k, v in r.items()} for m, r in rul.items()}, "ruler_raw": rul}
    write_result(out_dir, "niah", payload, "\n".join(md))
    plot(grid, cfg, depths, out_dir / "niah.png")
    return payload


def plot(grid, cfg: NiahConfig, depths, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    import numpy as np
    n = len(grid)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), dpi=100, squeeze=False)
    cmap = ListedColormap(["#d73027", "#1a9850"])
    for ax, (m, g) in zip(axes.flat, grid.items()):
        a = np.array([[np.nan if v is None else float(v) for v in row] for row in g]).T   # depth x length
        cm = cmap.with_extremes(bad="#bbbbbb")
        ax.imshow(np.ma.masked_invalid(a), cmap=cm, vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(cfg.lengths)), [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in cfg.lengths],
                      fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths], fontsize=7)
        ax.set_title(f"{display(m)}: {np.nanmean(a) if np.isfinite(a).any() else 0:.0%} passed", fontsize=9)
        ax.set_xlabel("context")
        ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    from matplotlib.patches import Patch
    keys = [Patch(color="#1a9850", label="exact match"), Patch(color="#d73027", label="wrong answer"),
            Patch(color="#bbbbbb", label="not scored (out of time)")]
    fig.legend(handles=keys, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"SmolLM2-135M needle in a haystack, k={cfg.k} tokens per query in every layer", fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    fig.savefig(out)
    plt.close(fig)
