"""``misa eval recall`` and ``misa eval router``: per layer, how well cheaper selectors recover DSA's.

On held-out windows, for query positions spread over the second half of each window (the longest
prefixes), per layer and k:
- recall of DSA's selected tokens (``misa.recall``) for MISA (h = 4, 8, 16), MISA-dagger, HISA, and
  the baselines "h random heads" and "h heads with the largest |w|";
- attention mass: the dense model's attention probability (averaged over query heads) that a
  selection holds; reported as is and divided by the mass DSA's picks hold;
- whether the indexer is worth testing: DSA's mass against sink + window of the same size and the
  oracle top-k of the true attention.
The router study (``misa eval router``) repeats MISA (h = 8) over router statistics and block sizes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import misa
from misa.ops.router.reference import ROUTER_STATISTICS

from . import data
from .common import EvalContext
from .hooks import attention_probs
from .indexer import IndexerInputs
from .report import fmt, md_table, write_result
from .selectors import METHODS, SelectorSettings, describe, label, mass, oracle_select, select

# every method of selectors.METHODS but DSA, the reference
RECALL_METHODS = [m for m in METHODS if m != "dsa"]
RECALL_FLOOR = 0.92       # the paper's floor for MISA h=8: recall of DSA's tokens in the worst layer


@dataclass
class RecallConfig:
    context: int = 8192
    windows: int = 2
    queries: int = 1024               # per window, spread over its second half
    ks: list[int] = field(default_factory=lambda: [128, 256, 512])
    methods: list[str] = field(default_factory=lambda: list(RECALL_METHODS))
    router_study: bool = False
    router_k: int = 256
    router_stats: list[str] = field(default_factory=lambda: list(ROUTER_STATISTICS))
    router_blocks: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    router_heads: int = 8
    skip_recall: bool = False
    settings: SelectorSettings = field(default_factory=SelectorSettings)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}, expected some of {sorted(METHODS)}")
        bad = [s for s in self.router_stats if s not in ROUTER_STATISTICS]
        if bad:
            raise ValueError(f"router: unknown statistics {bad}, expected some of {list(ROUTER_STATISTICS)}")
        if self.queries < 1:
            raise ValueError(f"queries: must be >= 1, got {self.queries}")
        if self.windows < 1:
            raise ValueError(f"windows: must be >= 1, got {self.windows}")
        if any(k < 1 or k >= self.context for k in self.ks):
            raise ValueError(f"k: each k must be in [1, context={self.context}), got {self.ks}")


def query_positions(context: int, n: int, device) -> torch.Tensor:
    return torch.linspace(context // 2, context - 1, min(n, context - context // 2), device=device).round().long().unique()


def _subset(inp: IndexerInputs, rows: torch.Tensor) -> IndexerInputs:
    return IndexerInputs(inp.q[rows], inp.kv, inp.weights[rows], inp.raw_weights[rows])


@torch.no_grad()
def collect(ctx: EvalContext, cfg: RecallConfig, progress=None, deadline: float | None = None) -> dict:
    """Sums per (layer, k, method): recall, mass; and the router grid. Returns per-layer means.
    Past ``deadline`` (a ``time.perf_counter()`` value) no further window is started (one at least)."""
    import time
    stack = ctx.stack
    tokens = data.heldout_tokens(ctx.tokenizer, ctx.corpus, ctx.token_cache)
    wins = data.windows(tokens, cfg.context, cfg.windows)
    qpos = query_positions(cfg.context, cfg.queries, ctx.device)
    ke = (qpos + 1).int()
    ks = torch.zeros_like(ke)
    acc = defaultdict(lambda: defaultdict(list))      # (layer, k) -> metric name -> per-window means
    router = defaultdict(list)                        # (layer, stat, B) -> recalls
    layers = stack.layer_ids
    used = 0
    for wi, win in enumerate(wins):
        if wi > 0 and deadline is not None and time.perf_counter() > deadline:
            break
        used += 1
        caps = ctx.capture(win, layers)
        for layer in layers:
            cap = caps.pop(layer)
            inp = _subset(stack.inference_inputs(layer, cap["x"]), qpos)
            probs = attention_probs(cap["q"][:, qpos], cap["k"], ctx.scaling, qpos)       # [nq, S]
            g = torch.Generator().manual_seed(cfg.settings.seed * 7919 + layer * 31 + wi)
            if not cfg.skip_recall:
                for k in cfg.ks:
                    a = acc[(layer, k)]
                    a["negative_weights"].append(float((inp.raw_weights < 0).float().mean()))
                    ref = select("dsa", inp, ks, ke, k, cfg.settings)
                    m_ref = mass(ref, probs)
                    a["dsa/mass"].append(float(m_ref.mean()))
                    a["oracle/mass"].append(float(mass(oracle_select(probs, ks, ke, k), probs).mean()))
                    for name in cfg.methods:
                        sel = select(name, inp, ks, ke, k, cfg.settings, generator=g)
                        a[f"{name}/recall"].append(float(misa.recall(sel, ref).mean()))
                        a[f"{name}/recall_min"].append(float(misa.recall(sel, ref).min()))
                        a[f"{name}/mass"].append(float(mass(sel, probs).mean()))
            if cfg.router_study:
                ref = select("dsa", inp, ks, ke, cfg.router_k, cfg.settings)
                for stat in cfg.router_stats:
                    for b in cfg.router_blocks:
                        sel = misa.misa_select(inp.q, inp.kv, inp.weights, ks, ke, k=cfg.router_k,
                                               active_heads=cfg.router_heads, block_size=b, router=stat)
                        router[(layer, stat, b)].append(float(misa.recall(sel, ref).mean()))
            if progress is not None:
                progress(wi, layer)
        del caps
    per_layer = {}
    for (layer, k), a in acc.items():
        r = {key: sum(v) / len(v) for key, v in a.items()}
        for name in cfg.methods:
            r[f"{name}/mass_ratio"] = r[f"{name}/mass"] / max(r["dsa/mass"], 1e-12)
        r["oracle/mass_ratio"] = r["oracle/mass"] / max(r["dsa/mass"], 1e-12)
        per_layer[f"{layer}/{k}"] = r
    router_out = {f"{l}/{s}/{b}": sum(v) / len(v) for (l, s, b), v in router.items()}
    return {"per_layer": per_layer, "router": router_out, "windows": used, "queries_per_window": int(qpos.numel())}


# ---------------------------------------------------------------------------------------------
def recall_report(ctx: EvalContext, cfg: RecallConfig, res: dict, out_dir: Path) -> dict:
    layers = ctx.stack.layer_ids
    pl = res["per_layer"]
    s = cfg.settings
    main_k = cfg.ks[len(cfg.ks) // 2]
    g = ctx.geo
    md = ["# Recall of DSA's selection and attention mass, per layer\n",
          f"{ctx.model_path.stem} ({g['layers']} layers) with the DSA indexer named above, context {cfg.context} tokens, "
          f"{res['windows']} held-out windows ({data.heldout_file(ctx.corpus).name}) x {res['queries_per_window']} "
          f"queries spread over each window's second half. Mass = the dense model's attention probability "
          f"(mean over its {g['heads']} query heads) on the selected tokens. This is a small model at "
          f"{cfg.context}-token context, not DeepSeek-V3.2 at 128K.\n"]
    md.append("Methods: " + "; ".join(f"{m} ({label(m)}): {describe(m, main_k, s)}" if label(m) != m
                                      else f"{m}: {describe(m, main_k, s)}" for m in cfg.methods) + "\n")
    md.append("## Is the indexer worth testing? Mass held by k tokens\n\n'w < 0': the share of negative per-head "
              "weights (queries x heads).\n")
    rows = []
    for layer in layers:
        row = [str(layer), f"{pl[f'{layer}/{cfg.ks[0]}']['negative_weights']:.2f}"]
        for k in cfg.ks:
            r = pl[f"{layer}/{k}"]
            row += [fmt(r["dsa/mass"]), fmt(r["sink-window/mass"]) if "sink-window/mass" in r else "-",
                    fmt(r["oracle/mass"])]
        rows.append(row)
    cols = ["layer", "w < 0"] + [f"{name} k={k}" for k in cfg.ks for name in ("DSA", "sink+window", "oracle")]
    md.append(md_table(cols, rows))
    wins = {k: sum(pl[f"{l}/{k}"]["dsa/mass"] > pl[f"{l}/{k}"].get("sink-window/mass", 0) for l in layers)
            for k in cfg.ks}
    md.append("\nLayers where DSA's picks hold more mass than sink + window: "
              + ", ".join(f"k={k}: {v}/{len(layers)}" for k, v in wins.items()) + "\n")
    for k in cfg.ks:
        md.append(f"## Recall of DSA's tokens (mass / DSA's mass), k = {k}\n")
        names = [m for m in cfg.methods if m != "sink-window"] + (["sink-window"] if "sink-window" in cfg.methods else [])
        rows = []
        for layer in layers:
            r = pl[f"{layer}/{k}"]
            rows.append([str(layer)] + [f"{r[f'{m}/recall']:.3f} ({r[f'{m}/mass_ratio']:.3f})" for m in names])
        means = [sum(pl[f"{l}/{k}"][f"{m}/recall"] for l in layers) / len(layers) for m in names]
        mins = [min(pl[f"{l}/{k}"][f"{m}/recall"] for l in layers) for m in names]
        rows.append(["mean"] + [f"{v:.3f}" for v in means])
        rows.append(["min"] + [f"{v:.3f}" for v in mins])
        md.append(md_table(["layer"] + names, rows) + "\n")
    summary = {}
    for k in cfg.ks:
        for m in cfg.methods:
            vals = [pl[f"{l}/{k}"][f"{m}/recall"] for l in layers]
            summary[f"{m}/k={k}"] = {"recall_mean": sum(vals) / len(vals), "recall_min": min(vals),
                                     "mass_ratio_mean": sum(pl[f"{l}/{k}"][f"{m}/mass_ratio"] for l in layers) / len(layers)}
    targets = []
    for k in cfg.ks:
        if "misa-h8" in cfg.methods:
            v = summary[f"misa-h8/k={k}"]
            targets.append(f"k={k}: MISA h=8 recall min {v['recall_min']:.3f} (target >= {RECALL_FLOOR}), mean "
                           f"{v['recall_mean']:.3f} (target >= 0.95)")
        if "misa-dagger" in cfg.methods:
            targets.append(f"k={k}: MISA-dagger recall mean {summary[f'misa-dagger/k={k}']['recall_mean']:.3f} (target >= 0.99)")
    md.append("## Against the paper's floors\n\n" + "\n".join(f"- {t}" for t in targets) + "\n")
    payload = {**ctx.meta(), "config": _cfg_dict(cfg), "summary": summary, **res}
    write_result(out_dir, "recall", payload, "\n".join(md))
    plot_recall(cfg, res, layers, out_dir / "recall.png")
    return payload


def router_report(ctx: EvalContext, cfg: RecallConfig, res: dict, out_dir: Path) -> dict:
    layers = ctx.stack.layer_ids
    r = res["router"]
    rows, best = [], None
    for stat in cfg.router_stats:
        for b in cfg.router_blocks:
            vals = [r[f"{l}/{stat}/{b}"] for l in layers]
            mean, mn = sum(vals) / len(vals), min(vals)
            rows.append([stat, str(b), f"{mean:.4f}", f"{mn:.4f}", str(layers[vals.index(mn)])])
            if best is None or mean > best[2]:
                best = (stat, b, mean, mn)
    md = [f"# Router study: MISA (h = {cfg.router_heads}) recall of DSA's top-{cfg.router_k}, training-free\n",
          f"Context {cfg.context}, {res['windows']} held-out windows x {res['queries_per_window']} queries, "
          f"{len(layers)} layers. Statistics: abs-sum (the paper's), sum (signed), max (largest block), "
          f"qnorm (|w| * ||q||, keys ignored), top-blocks (only the query's 8 best pooled blocks vote), "
          f"gap (w * (pooled score on the best pooled block - mean on the other visible blocks)).\n",
          md_table(["router", "block size", "recall (mean over layers)", "recall (worst layer)", "worst layer"], rows),
          f"\nBest: **{best[0]}, B = {best[1]}**: mean {best[2]:.4f}, worst layer {best[3]:.4f}.\n"]
    per_layer_rows = []
    for l in layers:
        per_layer_rows.append([str(l)] + [f"{r[f'{l}/{s}/{best[1]}']:.3f}" for s in cfg.router_stats])
    md.append(f"## Per layer at B = {best[1]}\n\n" + md_table(["layer"] + cfg.router_stats, per_layer_rows))
    payload = {**ctx.meta(), "config": _cfg_dict(cfg), "best": {"router": best[0], "block_size": best[1],
               "recall_mean": best[2], "recall_min": best[3]}, "router": r, "windows": res["windows"],
               "queries_per_window": res["queries_per_window"]}
    write_result(out_dir, "router", payload, "\n".join(md))
    return payload


def _cfg_dict(cfg: RecallConfig) -> dict:
    d = asdict(cfg)
    return d


def _clip_below(values, floor_share: float = 0.05):
    """The lower y limit of a panel: the ``floor_share`` quantile of its values when the few below
    it would otherwise stretch the axis (more than a quarter of the range below that quantile);
    else the minimum. Returns ``(lo, clipped)``."""
    import numpy as np
    v = np.asarray([x for x in values if x == x])
    lo, q, hi = float(v.min()), float(np.quantile(v, floor_share)), float(v.max())
    if q - lo > 0.25 * max(hi - lo, 1e-9):
        return q - 0.05 * (hi - q), True
    return lo - 0.03 * max(hi - lo, 1e-3), False


def plot_recall(cfg: RecallConfig, res: dict, layers: list[int], out: Path) -> None:
    """Two rows per k: recall of DSA's tokens, and attention mass relative to DSA's. Every
    reference line is labelled; the legend sits below the panels; a mass panel whose few lowest
    points would squash the rest clips them to its bottom edge (open triangles, counted in the
    panel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pl = res["per_layer"]
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, len(cfg.ks), figsize=(max(5 * len(cfg.ks), 7.5), 8.6), dpi=100, squeeze=False)
    style = {"misa-h4": ("tab:blue", ":"), "misa-h8": ("tab:blue", "-"), "misa-h16": ("tab:blue", "--"),
             "misa-dagger": ("tab:purple", "-"), "hisa": ("tab:green", "-"), "random-h8": ("tab:gray", "-"),
             "topw-h8": ("tab:orange", "-"), "sink-window": ("tab:red", "-"),
             "misa-gap-h8": ("tab:cyan", "-"), "misa-gap-dagger": ("tab:pink", "-")}
    shown = [m for m in cfg.methods if m in style]
    for c, k in enumerate(cfg.ks):
        top, bottom = axes[0, c], axes[1, c]
        for m in shown:
            col, ls = style[m]
            top.plot(layers, [pl[f"{l}/{k}"][f"{m}/recall"] for l in layers], color=col, ls=ls, marker=".",
                     label=f"{m} ({label(m)})" if label(m) != m else m)
        top.axhline(RECALL_FLOOR, color="black", lw=0.8, ls="-.",
                    label=f"paper's floor for MISA h=8 (worst layer {RECALL_FLOOR})")
        top.set_ylim(0, 1.02)
        top.set_title(f"recall of DSA's tokens, k={k}")
        series = {m: [pl[f"{l}/{k}"][f"{m}/mass_ratio"] for l in layers] for m in shown}
        oracle = [pl[f"{l}/{k}"]["oracle/mass_ratio"] for l in layers]
        values = [v for vs in series.values() for v in vs] + oracle + [1.0]
        lo, clipped = _clip_below(values)
        hi = max(values) + 0.02 * (max(values) - lo)
        below = 0
        for m, vs in series.items():
            col, ls = style[m]
            bottom.plot(layers, [max(v, lo) for v in vs], color=col, ls=ls, marker=".")
            out_l = [l for l, v in zip(layers, vs) if v < lo]
            below += len(out_l)
            if out_l:
                bottom.plot(out_l, [lo] * len(out_l), ls="none", marker="v", mfc="none", color=col, ms=7, clip_on=False)
        bottom.plot(layers, oracle, color="black", ls="--", label="oracle: top-k of the true attention")
        bottom.axhline(1.0, color="black", lw=0.8, ls="-.", label="DSA's own mass (= 1)")
        bottom.set_ylim(lo, hi)
        title = f"attention mass / DSA's, k={k}"
        if clipped and below:
            title += f"\n\u25bd: {below} points below {lo:.2f}, drawn at the bottom edge"
        bottom.set_title(title, fontsize=10)
        bottom.set_xlabel("layer")
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = [], []
    for ax in (axes[0, 0], axes[1, 0]):
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    ncol = 3 if len(cfg.ks) >= 3 else 2
    rows = -(-len(labels) // ncol)
    legend_h = (0.1 + 0.17 * rows) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"SmolLM2-135M, context {cfg.context}: MISA vs DSA per layer")
    fig.tight_layout(rect=(0, legend_h, 1, 1))
    fig.savefig(out)
    plt.close(fig)
