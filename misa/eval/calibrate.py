"""``misa calibrate`` on the SmolLM2 testbed: per-layer settings from the trained DSA indexer's traffic.

Calibration text is the corpus's training side (every text but the held-out one that ``misa eval``
measures on), so calibration and evaluation never read the same tokens. For each window, one dense
forward captures every layer's indexer inputs and the model's attention probabilities (averaged over
query heads) for query positions spread over the window's second half; ``misa.calibrate``'s
``calibrate_layers`` then scores every candidate setting per layer against DSA's selection, by
recall or by attention mass, and keeps the cheapest that meets the target.
"""
from __future__ import annotations

import time

import torch

from misa.calibration import (Calibration, LayerSample, Setting, calibrate_layers, calibration_from_scores,
                              score_layers, score_settings)

from . import data
from .common import EvalContext, sync
from .hooks import attention_probs
from .recall import query_positions


@torch.no_grad()
def testbed_samples(ctx: EvalContext, context: int, windows: int, queries: int,
                    heldout: bool = False) -> tuple[dict, dict]:
    """``({layer: [LayerSample, ...]}, provenance)`` from ``windows`` windows of ``context`` tokens
    of the calibration (training-side) text, or of the held-out evaluation text."""
    tokens = (data.heldout_tokens if heldout else data.train_tokens)(ctx.tokenizer, ctx.corpus, ctx.token_cache)
    context = min(context, ctx.geo["max_positions"])
    wins = data.windows(tokens, context, windows)
    qpos = query_positions(context, queries, ctx.device)
    ke = (qpos + 1).int()
    ks = torch.zeros_like(ke)
    layers = ctx.stack.layer_ids
    samples: dict = {layer: [] for layer in layers}
    for win in wins:
        caps = ctx.capture(win, layers)
        for layer in layers:
            cap = caps.pop(layer)
            inp = ctx.stack.inference_inputs(layer, cap["x"])
            probs = attention_probs(cap["q"][:, qpos], cap["k"], ctx.scaling, qpos)
            samples[layer].append(LayerSample(inp.q[qpos], inp.kv, inp.weights[qpos], ks, ke, probs))
        del caps
    if heldout:
        files = [data.heldout_file(ctx.corpus).name]
    elif data.corpus_path(ctx.corpus).is_file():
        files = [data.corpus_path(ctx.corpus).name]
    else:
        files = sorted(f.name for f in data.corpus_dir(ctx.corpus).glob("*.txt") if f.name != data.HELD_OUT)
    return samples, {("evaluation_text" if heldout else "calibration_text"): files, "windows": len(wins), "context": context,
                     "queries_per_window": int(qpos.numel())}


def calibrate_testbed(ctx: EvalContext, target: float, *, metric: str = "recall", k: int = 256,
                      context: int = 8192, windows: int = 2, queries: int = 256, settings=None, cost_table=None,
                      router_block_size: int = 128, hisa_block_size: int = 64) -> Calibration:
    """The testbed's calibration (sizes as ``misa eval``: k = 256 at 8K, router blocks of 128,
    HISA blocks of 64)."""
    t0 = time.perf_counter()
    samples, info = testbed_samples(ctx, context, windows, queries)
    meta = {"model": ctx.model_path.name, "indexer": str(ctx.indexer_path), "indexer_id": ctx.stack.fingerprint(),
            **info}
    cal = calibrate_layers(samples, target, metric=metric, k=k, settings=settings, cost_table=cost_table,
                           router_block_size=router_block_size, hisa_block_size=hisa_block_size,
                           num_heads=ctx.stack.cfg.heads, meta=meta)
    sync(ctx.device)
    cal.config.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return cal


# The evaluation's uniform methods (misa.eval.selectors at its default settings) as calibration settings.
UNIFORM = {"misa-h8": "misa h=8 abs-sum", "misa-gap-h8": "misa h=8 gap",
           "misa-dagger": "misa-dagger h=8 abs-sum k1=4k", "misa-gap-dagger": "misa-dagger h=8 gap k1=4k",
           "hisa": "hisa 4k", "dsa": "dsa"}


def calibration_study(ctx: EvalContext, out_dir, targets=(0.90, 0.95, 0.98), metrics=("recall", "mass"), *,
                      k: int = 256, context: int = 8192, windows: int = 2, queries: int = 256, cost_table=None,
                      router_block_size: int = 128, hisa_block_size: int = 64) -> dict:
    """Calibrate once per (metric, target) from one scoring of the calibration text, write each
    config to ``out_dir/calibrated-<metric>-<target>.json``, and score every chosen setting and
    the uniform methods per layer on held-out text. Returns ``{"configs": {name: path}, "heldout":
    {method: {layer: scores}}, "speedup": {method: x}}`` (method: a config path or a uniform name)."""
    from pathlib import Path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    samples, info = testbed_samples(ctx, context, windows, queries)
    meta = {"model": ctx.model_path.name, "indexer": str(ctx.indexer_path), "indexer_id": ctx.stack.fingerprint(),
            **info}
    scores, costs = score_layers(samples, k=k, cost_table=cost_table, router_block_size=router_block_size,
                                 hisa_block_size=hisa_block_size, num_heads=ctx.stack.cfg.heads)
    del samples
    t_cal = time.perf_counter() - t0
    configs, chosen = {}, {}
    for metric in metrics:
        for target in targets:
            cal = calibration_from_scores(scores, costs, target, metric=metric, k=k,
                                          router_block_size=router_block_size, hisa_block_size=hisa_block_size,
                                          meta=meta)
            path = out_dir / f"calibrated-{metric}-{target:.2f}.json"
            cal.config.to_json(path)
            configs[f"config:{path}"] = cal
            chosen[f"config:{path}"] = {layer: row["chosen"] for layer, row in cal.table.items()}
    for name, setting in UNIFORM.items():
        chosen[name] = {layer: setting for layer in scores}
    # held-out: every setting some method uses, per layer
    wanted = {layer: sorted({c[layer] for c in chosen.values()}) for layer in scores}
    held, held_info = testbed_samples(ctx, context, windows, queries, heldout=True)
    held_scores = {layer: score_settings(held[layer], [Setting.parse(n) for n in wanted[layer]], k,
                                         router_block_size, hisa_block_size) for layer in wanted}
    per_method = {m: {layer: held_scores[layer][c[layer]] for layer in c} for m, c in chosen.items()}
    speedup = {m: len(c) / sum(costs.relative(Setting.parse(s)) for s in c.values()) for m, c in chosen.items()}
    sync(ctx.device)
    return {"configs": configs, "chosen": chosen, "heldout": per_method, "speedup": speedup,
            "calibration_scores": scores, "cost_table": costs.meta, "meta": {**meta, **held_info},
            "seconds": {"calibrate": round(t_cal, 1), "total": round(time.perf_counter() - t0, 1)}}


def _ranks(values) -> torch.Tensor:
    """Ranks with ties sharing their average rank (so a constant list has no order)."""
    x = torch.tensor(values, dtype=torch.float64)
    return ((x[:, None] > x[None, :]).sum(1) + ((x[:, None] == x[None, :]).sum(1) - 1) / 2).double()


def _rank_corr(xs, ys) -> float | None:
    """Spearman's rank correlation of two equally long lists (None below 3 pairs)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    a, b = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    a, b = a - a.mean(), b - b.mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / den if den > 0 else None


def study_report(study: dict, ppl: dict | None, niah: dict | None, out_dir, provenance: dict | None = None) -> dict:
    """The calibrated configs beside the uniform methods: modelled speed-up, held-out recall and
    attention mass per layer (mean and worst layer), perplexity against DSA, NIAH; and which of
    recall and mass ranks the methods' perplexity and NIAH agreement better."""
    from pathlib import Path
    from .report import fmt, md_table, write_result
    from .selectors import label
    held, speed = study["heldout"], study["speedup"]
    ppl_res = (ppl or {}).get("results", {})
    contexts = sorted({int(key.rsplit("/", 1)[1]) for key in ppl_res})
    acc = (niah or {}).get("accuracy", {})
    agree = (niah or {}).get("agrees_with_dsa", {})
    rows, per = [], {}
    for m in held:
        rec = [v["recall"] for v in held[m].values()]
        mass = [v.get("mass") for v in held[m].values() if v.get("mass") is not None]
        deltas = []
        for L in contexts:
            if f"{m}/{L}" in ppl_res and f"dsa/{L}" in ppl_res:
                deltas.append(100 * (ppl_res[f"{m}/{L}"]["ppl"] / ppl_res[f"dsa/{L}"]["ppl"] - 1))
            else:
                deltas.append(None)
        per[m] = {"speedup": speed[m], "recall_mean": sum(rec) / len(rec), "recall_min": min(rec),
                  "mass_mean": sum(mass) / len(mass) if mass else None, "mass_min": min(mass) if mass else None,
                  "ppl_delta_pct": dict(zip(map(str, contexts), deltas)), "niah": acc.get(m), "agrees": agree.get(m)}
        r = per[m]
        rows.append([label(m) if m.startswith("config:") else m, f"{r['speedup']:.2f}x",
                     f"{r['recall_mean']:.3f} ({r['recall_min']:.3f})",
                     f"{fmt(r['mass_mean'])} ({fmt(r['mass_min'])})"]
                    + [("-" if d is None else f"{d:+.2f}%") for d in deltas] + [fmt(r["niah"]), fmt(r["agrees"])])
    cols = (["method", "indexer speed-up (modelled, 128K)", "held-out recall: mean (worst layer)",
             "mass vs DSA: mean (worst)"] + [f"ppl {L} vs DSA" for L in contexts]
            + ["NIAH passed", "NIAH agrees with DSA"])
    methods = [m for m in per if m != "dsa"]
    corr = {}
    for stat in ("recall_mean", "mass_mean"):
        for L in contexts:
            corr[f"{stat} ~ -ppl {L}"] = _rank_corr([per[m][stat] for m in methods],
                                                    [None if per[m]["ppl_delta_pct"][str(L)] is None
                                                     else -per[m]["ppl_delta_pct"][str(L)] for m in methods])
        corr[f"{stat} ~ NIAH agreement"] = _rank_corr([per[m][stat] for m in methods],
                                                      [per[m]["agrees"] for m in methods])
    chosen = study["chosen"]
    configs = [m for m in chosen if m.startswith("config:")]
    layer_rows = [[layer] + [chosen[c][layer] for c in configs] for layer in sorted(chosen[configs[0]], key=int)] \
        if configs else []
    ct = study.get("cost_table", {})
    md = ["# Calibrated per-layer configs against uniform methods\n",
          f"Calibration text: {', '.join(study['meta'].get('calibration_text', []))} ({study['meta'].get('windows')} "
          f"windows x {study['meta'].get('queries_per_window')} queries at {study['meta'].get('context')} tokens); "
          f"evaluation text: {', '.join(study['meta'].get('evaluation_text', []))}. Speed-up: dense DSA's indexer time "
          f"over the method's, summed over layers, from the cost table ({ct.get('card', '?')}, {ct.get('date', '?')}, "
          f"{ct.get('shape', {}).get('num_queries', '?')} queries x {ct.get('shape', {}).get('context', '?')} keys).\n",
          md_table(cols, rows),
          "\nRank correlation (Spearman, over the methods above but DSA) of each held-out statistic with lower "
          "perplexity and with NIAH agreement:\n",
          md_table(["statistic ~ outcome", "rank correlation"], [[k, fmt(v)] for k, v in corr.items()]),
          "\n## Per-layer settings\n",
          md_table(["layer"] + [label(c) for c in configs], layer_rows)]
    payload = {**(provenance or {}), "methods": per, "rank_correlation": corr, "chosen": chosen, "meta": study["meta"],
               "cost_table": ct, "seconds": study.get("seconds")}
    write_result(Path(out_dir), "calibrate", payload, "\n".join(md))
    return payload
