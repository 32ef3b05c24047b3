"""Why MISA's router falls short on the trained SmolLM2 indexer: oracle routers, head statistics and
training-free router statistics, per layer, on the CPU.

    python scripts/router_analysis.py --indexer INDEXER_DIR --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --context 8192 --windows 2 --queries 128 --layers $(seq -s, 0 29) --k 128,256,512 --no-oracle \
        --out results/final-30L-8k

``--indexer`` and ``--model`` default to what ``misa warmup`` uses (the cache), ``--corpus`` to
``$MISA_CORPUS`` or a ``shared/data/text`` folder in or above the checkout (see ``--help``).

(docs/results.md, "Why MISA's router falls short here", lists the runs behind its tables;
scripts/router_analysis_tables.py prints those tables from the ``results.json`` files.)

For each layer and window it captures the dense model's q/k and the layer's indexer inputs (fp8, as
the evaluation uses them), then per query (spread over the window's second half, causal):

- DSA's top-k (``misa.dsa_select``) is the reference; recall = share of its tokens a method keeps;
- the per-head contribution ``C[t, j, s] = w[t, j] relu(q[t, j] . k[s])`` (dequantised fp8 q and k),
  so that DSA's score is ``sum_j C``;
- oracle routers (they read DSA's selection: what a router of 8 heads could reach; heuristic
  searches, so lower bounds on the best 8 heads): ``oracle-greedy`` adds, one at a time, the head
  that most raises the recall of the top-k of the partial sum (ties broken by the margin), then
  swaps single heads while recall rises; ``oracle-backward`` starts from all heads and drops one at
  a time (recall also reported at 16 and 32 heads), then swaps; ``oracle-best`` is the better of
  the two per query;
  ``oracle-gap`` takes the 8 heads with the largest ``mean_{s in DSA} C_j - mean_{s not in DSA} C_j``
  (each head's own contribution to separating DSA's tokens from the rest);
- ``lib-misa`` / ``lib-gap`` / ``lib-gap-dagger``: the library's ``misa.misa_select`` with the
  ``abs-sum`` and ``gap`` routers (cross-checks of the reimplementation: ``lib-gap`` = ``gap-m1``);
- router statistics from pooled keys only (``P[t, j, b] = relu(q[t, j] . kbar[b])``, block size B,
  the library's pooling): see ``router_stats``. ``gap-m<m>`` contrasts the top-m pooled blocks with
  the rest: ``gap-m1`` is the library's ``gap`` router; plain ``gap`` (also behind ``gap-h16`` and
  ``pooled-greedy``) takes the top ceil(k/B)+1 blocks. Routed scoring is the SPEC's (routed heads,
  weights as is), plus a "block residual" variant that adds the dropped heads' pooled contribution
  of the key's block (``sum_{j dropped} w_j P[t, j, b(s)]``: no more products than the router
  already computed);
- head diagnostics: sign of w, activity (share of visible keys with q.k > 0) and contrast
  (std over keys / mean over keys of relu(q.k)) of the heads each router picks.

Writes ``results.json`` and ``results.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

import misa
from misa.eval import data
from misa.eval.cli import default_indexer
from misa.eval.common import EvalContext
from misa.eval.data import CORPUS_HELP
from misa.eval.model import cache_dir
from misa.eval.hooks import attention_probs
from misa.eval.recall import query_positions
from misa.eval.selectors import mass, oracle_select, window_select
from misa.ops.router.reference import pool_keys, visible_blocks


# ---------------------------------------------------------------------------------------------
def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, S]`` bool: the ``k`` largest entries per row (scores already -inf outside the range)."""
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def recall_of(sel_mask: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
    return (sel_mask & ref_mask).sum(1).float() / ref_mask.sum(1).clamp_min(1).float()


def routed_scores(C: torch.Tensor, heads: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """``sum_{j in heads} C[:, j, :]``, -inf outside the visible range."""
    s = torch.gather(C, 1, heads[:, :, None].expand(-1, -1, C.shape[2])).sum(1)
    return s.masked_fill(~vis, float("-inf"))


def _oracle_objective(ref: torch.Tensor, vis: torch.Tensor, k: int):
    """Recall of ``ref`` by the top-``k`` of a score, tie-broken by the (scaled) mean margin of
    ``ref`` over the rest: what the oracle head searches maximise."""
    nref = ref.sum(1).clamp_min(1).float()
    rest = vis & ~ref
    inv = rest.sum(1).clamp_min(1).float()

    def objective(s):
        rec = recall_of(topk_mask(s.masked_fill(~vis, float("-inf")), k), ref)
        gap = (s * ref).sum(1) / nref - (s * rest).sum(1) / inv
        return rec + 1e-4 * torch.tanh(gap / (s.abs().amax(1) + 1e-12))
    return objective


def _best_head(objective, base: torch.Tensor, C: torch.Tensor, allowed: torch.Tensor, sign: int,
               best_val: torch.Tensor, best_j: torch.Tensor, margin: float = 0.0):
    """Per query, the allowed head j whose ``base + sign * C[:, j]`` scores best (strictly above
    ``best_val + margin`` to replace ``best_j``)."""
    for j in range(C.shape[1]):
        v = objective(base + sign * C[:, j])
        v = torch.where(allowed[:, j], v, torch.full_like(v, -1e9))
        better = v > best_val + margin
        best_val = torch.where(better, v, best_val)
        best_j = torch.where(better, torch.full_like(best_j, j), best_j)
    return best_val, best_j


def _swap_pass(objective, C: torch.Tensor, chosen: torch.Tensor, cur: torch.Tensor, h: int):
    """One pass of single-head swaps: each chosen head in turn is replaced by the unchosen head
    that raises the objective most, if any does. Updates ``chosen`` in place; returns ``cur`` and
    the heads ``[T, h]`` with each replacement in its predecessor's slot."""
    T = C.shape[0]
    ar = torch.arange(T)
    heads = chosen.nonzero()[:, 1].view(T, h)
    base = objective(cur)
    for a in range(h):
        out_j = heads[:, a]
        wo = cur - C[ar, out_j]
        best_val, best_j = _best_head(objective, wo, C, ~chosen, 1, base.clone(), out_j.clone(), margin=1e-9)
        moved = best_j != out_j
        chosen[ar[moved], out_j[moved]] = False
        chosen[ar[moved], best_j[moved]] = True
        cur = wo + C[ar, best_j]
        heads[:, a] = best_j
        base = best_val
    return cur, heads


def greedy_oracle(C: torch.Tensor, ref: torch.Tensor, vis: torch.Tensor, k: int, h: int,
                  swaps: int = 1) -> tuple[torch.Tensor, list[float]]:
    """Per query, heads chosen one at a time to maximise recall of ``ref`` (ties: the largest
    gap between DSA's tokens and the rest), then single-head swaps while recall rises.
    Returns ``heads [T, h]`` and the mean recall after each added head."""
    T, H, S = C.shape
    chosen = torch.zeros(T, H, dtype=torch.bool)
    cur = torch.zeros(T, S)
    ar = torch.arange(T)
    objective = _oracle_objective(ref, vis, k)
    curve = []
    for _ in range(h):
        _, best_j = _best_head(objective, cur, C, ~chosen, 1, torch.full((T,), -1e9),
                               torch.zeros(T, dtype=torch.long))
        chosen[ar, best_j] = True
        cur = cur + C[ar, best_j]
        curve.append(float(recall_of(topk_mask(cur.masked_fill(~vis, float("-inf")), k), ref).mean()))
    for _ in range(swaps):
        cur, _ = _swap_pass(objective, C, chosen, cur, h)
    return chosen.nonzero()[:, 1].view(T, h), curve


def backward_oracle(C: torch.Tensor, ref: torch.Tensor, vis: torch.Tensor, k: int, h: int,
                    report: tuple = (32, 16, 8)) -> tuple[torch.Tensor, dict]:
    """Per query, start from all heads (= DSA) and drop, one at a time, the head whose removal keeps
    the recall of ``ref`` highest (ties: the largest margin), down to ``h`` heads; then single-head
    swaps while recall rises. Returns ``heads [T, h]`` and the mean recall at the ``report`` sizes."""
    T, H, _ = C.shape
    chosen = torch.ones(T, H, dtype=torch.bool)
    cur = C.sum(1)
    ar = torch.arange(T)
    objective = _oracle_objective(ref, vis, k)
    curve = {}
    for n in range(H, h, -1):
        _, best_j = _best_head(objective, cur, C, chosen, -1, torch.full((T,), -1e9),
                               torch.zeros(T, dtype=torch.long))
        chosen[ar, best_j] = False
        cur = cur - C[ar, best_j]
        if n - 1 in report:
            curve[n - 1] = float(recall_of(topk_mask(cur.masked_fill(~vis, float("-inf")), k), ref).mean())
    _, heads = _swap_pass(objective, C, chosen, cur, h)
    return heads, curve


def pooled_greedy(w, P, bvis, m: int, h: int, tie: torch.Tensor) -> torch.Tensor:
    """Training-free combinatorial router on pooled keys only: heads added one at a time so that
    the partial pooled score ``sum_{chosen} w_j P_j`` ranks the same top-``m`` blocks as the full
    pooled score (block-level recall), ties broken by the ``tie`` statistic."""
    T, H, NB = P.shape
    contrib = w[:, :, None] * P
    full = contrib.sum(1).masked_fill(~bvis, float("-inf"))
    m = min(m, NB)
    target = torch.zeros_like(bvis).scatter_(1, full.topk(m, 1).indices, True) & bvis
    nt = target.sum(1).clamp_min(1).float()
    chosen = torch.zeros(T, H, dtype=torch.bool)
    cur = torch.zeros(T, NB)
    ar = torch.arange(T)
    tnorm = tie / (tie.abs().amax(1, keepdim=True) + 1e-12)
    for _ in range(h):
        best_val = torch.full((T,), -1e9)
        best_j = torch.zeros(T, dtype=torch.long)
        for j in range(H):
            s = (cur + contrib[:, j]).masked_fill(~bvis, float("-inf"))
            sel = torch.zeros_like(bvis).scatter_(1, s.topk(m, 1).indices, True)
            v = (sel & target).sum(1) / nt + 1e-3 * tnorm[:, j]
            v = torch.where(chosen[:, j], torch.full_like(v, -1e9), v)
            better = v > best_val
            best_val = torch.where(better, v, best_val)
            best_j = torch.where(better, torch.full_like(best_j, j), best_j)
        chosen[ar, best_j] = True
        cur = cur + contrib[ar, best_j]
    return chosen.nonzero()[:, 1].view(T, h)


# ---------------------------------------------------------------------------------------------
def router_stats(w: torch.Tensor, P: torch.Tensor, bvis: torch.Tensor, k: int, block: int,
                 P_lin: torch.Tensor) -> dict:
    """Router statistics ``[T, H]`` from pooled scores ``P [T, H, NB]`` (0 on hidden blocks) and
    ``P_lin = q . kbar`` (before the relu)."""
    n = bvis.sum(1).clamp_min(1).float()[:, None]
    sum_b = P.sum(-1)
    mean_b = sum_b / n
    max_b = P.amax(-1)
    var_b = ((P - mean_b[..., None]) ** 2 * bvis[:, None, :]).sum(-1) / n
    std_b = var_b.sqrt()
    # the pooled DSA block score (all heads: the products the router already has) -> estimated
    # selected blocks: the top ceil(k / B) + 1 visible blocks
    blk = (w[:, :, None] * P).sum(1).masked_fill(~bvis, float("-inf"))

    rank = blk.argsort(1, descending=True).argsort(1)      # 0 = the best visible block

    def gap_stat(m, last: bool = False):
        """``m``: an int, or a [T] tensor (per-query number of blocks counted as selected)."""
        mt_ = torch.as_tensor(m)[..., None] if torch.is_tensor(m) else m
        top = (rank < mt_) & bvis
        if last:      # always count the query's own (last visible) block as selected
            lastb = (bvis.long() * torch.arange(P.shape[-1])[None]).argmax(1)
            top[torch.arange(top.shape[0]), lastb] = True
        rest = bvis & ~top
        mt = (P * top[:, None]).sum(-1) / top.sum(1).clamp_min(1)[:, None]
        mr = (P * rest[:, None]).sum(-1) / rest.sum(1).clamp_min(1)[:, None]
        return w * (mt - mr)

    gap = gap_stat(max(1, math.ceil(k / block)) + 1)
    extra = {f"gap-m{m}": gap_stat(m) for m in (1, 2, 4, 8)}
    extra["gap-m2-last"] = gap_stat(2, last=True)
    nvis = bvis.sum(1)
    extra["gap-f8"] = gap_stat(torch.clamp((nvis + 7) // 8, min=1))
    extra["gap-f4"] = gap_stat(torch.clamp((nvis + 3) // 4, min=1))
    return {**extra,
        "abs-sum": w.abs() * sum_b,
        "pos-sum": w.clamp_min(0) * sum_b,
        "abs-max": w.abs() * max_b,
        "abs-std": w.abs() * std_b,
        "pos-std": w.clamp_min(0) * std_b,
        "abs-contrast": w.abs() * (max_b - mean_b),
        "pos-contrast": w.clamp_min(0) * (max_b - mean_b),
        "gap": gap,
        "abs-gap": gap.abs(),
        "abs-w": w.abs(),
        # |w| relu(q . mean of the visible pooled keys) * blocks: the "DC level" of each head; equal to
        # abs-sum for every head whose q . kbar > 0 on all visible blocks
        "abs-dc": w.abs() * torch.einsum("thb,tb->th", P_lin, bvis.float()).clamp_min(0),
    }


def masked_corr(x: torch.Tensor, y: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Per row, Pearson correlation of ``x`` and ``y [T, S]`` over the visible keys."""
    nv = vis.sum(1, keepdim=True).clamp_min(2).float()
    xc = (x - (x * vis).sum(1, keepdim=True) / nv) * vis
    yc = (y - (y * vis).sum(1, keepdim=True) / nv) * vis
    return (xc * yc).sum(1) / ((xc ** 2).sum(1).sqrt() * (yc ** 2).sum(1).sqrt() + 1e-12)


def masked_sd(x: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Per row, standard deviation of ``x [T, S]`` over the visible keys."""
    nv = vis.sum(1, keepdim=True).clamp_min(2).float()
    return ((((x - (x * vis).sum(1, keepdim=True) / nv) * vis) ** 2).sum(1, keepdim=True) / nv).sqrt()[:, 0]


def head_diag(S_: torch.Tensor, vis: torch.Tensor) -> dict:
    """Per (query, head): share of visible keys with q.k > 0, mean and std of relu(q.k)."""
    n = vis.sum(1).clamp_min(1).float()[:, None]
    v = vis[:, None, :]
    act = ((S_ > 0) & v).sum(-1) / n
    mean = (S_ * v).sum(-1) / n
    std = (((S_ - mean[..., None]) ** 2) * v).sum(-1).div(n).sqrt()
    return {"active": act, "mean": mean, "cv": std / mean.clamp_min(1e-12)}


# ---------------------------------------------------------------------------------------------
def analyse_layer(inp, probs, ke, ks_, block: int, h: int, ks: list[int], g: torch.Generator,
                  acc: dict, layer: int, oracle: bool) -> None:
    T = inp.q.shape[0]
    q = inp.q.float()                                       # fp8 values; scales are folded into w
    kf = inp.kv[0].float() * inp.kv[1][:, None]
    w = inp.weights
    S = kf.shape[0]
    vis = torch.arange(S)[None, :] < ke.long()[:, None]
    S_ = torch.matmul(q, kf.t()).relu_()                    # [T, H, S]
    C = w[:, :, None] * S_
    I = C.sum(1).masked_fill(~vis, float("-inf"))
    kbar = pool_keys(kf, block)
    bvis = visible_blocks(ks_, ke, kbar.shape[0], block)
    P_lin = torch.matmul(q, kbar.t())
    P = P_lin.relu() * bvis[:, None, :]
    bidx = torch.arange(S) // block
    diag = head_diag(S_, vis)
    H = q.shape[1]
    a = acc[(layer, "all")]
    a["w<0"].append(float((w < 0).float().mean()))
    for key in ("active", "cv"):
        a[f"all/{key}"].append(float(diag[key].mean()))
    for k in ks:
        a = acc[(layer, k)]
        ref_sel = misa.dsa_select(inp.q, inp.kv, w, ks_, ke, k=k)
        ref = torch.zeros(T, S + 1, dtype=torch.bool).scatter_(1, torch.where(ref_sel >= 0, ref_sel.long(), S), True)[:, :S]
        a["check/float-dsa"].append(float(recall_of(topk_mask(I, k), ref).mean()))
        # is the indexer meaningful at this context: mass of DSA vs sink + window vs oracle
        a["mass/dsa"].append(float(mass(ref_sel, probs).mean()))
        a["mass/sink-window"].append(float(mass(window_select(ks_, ke, k, 4), probs).mean()))
        a["mass/oracle"].append(float(mass(oracle_select(probs, ks_, ke, k), probs).mean()))
        win = torch.arange(S)[None, :] >= (ke.long()[:, None] - k)
        a["dsa/in-window"].append(float(((ref & win).sum(1).float() / k).mean()))
        # library MISA (abs-sum) as a cross-check of the reimplementation
        lib = misa.misa_select(inp.q, inp.kv, w, ks_, ke, k=k, active_heads=h, block_size=block)
        a["recall/lib-misa"].append(float(misa.recall(lib, ref_sel).mean()))
        lib = misa.misa_select(inp.q, inp.kv, w, ks_, ke, k=k, active_heads=h, block_size=block, router="gap")
        a["recall/lib-gap"].append(float(misa.recall(lib, ref_sel).mean()))
        lib = misa.misa_select(inp.q, inp.kv, w, ks_, ke, k=k, active_heads=h, block_size=block, router="gap",
                               stage1_k=min(4 * k, S))
        a["recall/lib-gap-dagger"].append(float(misa.recall(lib, ref_sel).mean()))
        # separation contribution of each head: mean over DSA's tokens minus mean over the rest
        rest = vis & ~ref
        D = (C * ref[:, None]).sum(-1) / k - (C * rest[:, None]).sum(-1) / rest.sum(1).clamp_min(1)[:, None]
        tot = D.sum(1)
        Ds = D.abs().sort(1, descending=True).values
        a["gap/top8-share-abs"].append(float((Ds[:, :h].sum(1) / Ds.sum(1)).mean()))
        Dp = D.sort(1, descending=True).values
        a["gap/top8/total"].append(float((Dp[:, :h].sum(1) / tot).mean()))
        a["gap/pos/total"].append(float((D.clamp_min(0).sum(1) / tot).mean()))
        a["gap/neg-heads"].append(float((D < 0).float().mean()))
        # participation ratio of |D| (effective number of heads carrying the separation)
        a["gap/eff-heads"].append(float(((D.abs().sum(1) ** 2) / (D ** 2).sum(1)).mean()))
        methods = {}
        if oracle:
            gh, curve = greedy_oracle(C, ref, vis, k, h)
            methods["oracle-greedy"] = gh
            for i, c in enumerate(curve):
                a[f"greedy-curve/{i + 1}"].append(c)
            bh, bcurve = backward_oracle(C, ref, vis, k, h, report=(32, 2 * h, h))
            methods["oracle-backward"] = bh
            for n, c in bcurve.items():
                a[f"backward-curve/{n}"].append(c)
            # the better of the two oracles, per query
            rg = recall_of(topk_mask(routed_scores(C, gh, vis), k), ref)
            rb = recall_of(topk_mask(routed_scores(C, bh, vis), k), ref)
            methods["oracle-best"] = torch.where((rb >= rg)[:, None], bh, gh)
        methods["oracle-gap"] = D.topk(h, 1).indices
        stats = router_stats(w, P, bvis, k, block, P_lin)
        # where is the best pooled block (by the all-head pooled DSA score)?
        blk = (w[:, :, None] * P).sum(1).masked_fill(~bvis, float("-inf"))
        best = blk.argmax(1)
        lastb = (bvis.long() * torch.arange(bvis.shape[1])[None]).argmax(1)
        a["best-block/last"].append(float((best == lastb).float().mean()))
        a["best-block/first"].append(float((best == 0).float().mean()))
        for name, r in stats.items():
            methods[name] = r.topk(h, 1).indices
        methods["random"] = torch.rand(T, H, generator=g).argsort(1)[:, :h]
        methods["pooled-greedy"] = pooled_greedy(w, P, bvis, max(1, math.ceil(k / block)) + 1, h,
                                                 stats["gap"])
        # twice the heads, for the h = 16 comparison
        methods["abs-sum-h16"] = stats["abs-sum"].topk(2 * h, 1).indices
        methods["gap-h16"] = stats["gap"].topk(2 * h, 1).indices
        methods["random-h16"] = torch.rand(T, H, generator=g).argsort(1)[:, :2 * h]
        # cancellation: the positive-weight heads' sum against the negative-weight heads' sum
        Ifull = C.sum(1)
        Ipos = (C * (w > 0)[:, :, None]).sum(1)
        Ineg = Ifull - Ipos
        a["cancel/corr(pos,neg)"].append(float(masked_corr(Ipos, -Ineg, vis).mean()))
        a["cancel/sd(I)/(sd(pos)+sd(neg))"].append(float(
            (masked_sd(Ifull, vis) / (masked_sd(Ipos, vis) + masked_sd(Ineg, vis) + 1e-12)).mean()))
        a["cancel/corr(pos,I)"].append(float(masked_corr(Ipos, Ifull, vis).mean()))
        a["cancel/corr(neg,I)"].append(float(masked_corr(Ineg, Ifull, vis).mean()))
        a["recall/sink-window"].append(float(misa.recall(window_select(ks_, ke, k, 4), ref_sel).mean()))
        for name, heads in methods.items():
            sc = routed_scores(C, heads, vis)
            routed = torch.gather(C, 1, heads[:, :, None].expand(-1, -1, S)).sum(1)
            a[f"corr/{name}"].append(float(masked_corr(routed, Ifull, vis).mean()))
            sel = topk_mask(sc, k)
            a[f"recall/{name}"].append(float(recall_of(sel, ref).mean()))
            a[f"selmass/{name}"].append(float((probs * sel).sum(1).mean()))
            wh = torch.gather(w, 1, heads)
            if heads.shape[1] == h:      # share of the routed heads that abs-sum routes too
                same = torch.zeros(T, H, dtype=torch.bool).scatter_(1, heads, True)
                same &= torch.zeros(T, H, dtype=torch.bool).scatter_(1, methods["abs-sum"], True)
                a[f"overlap-abs-sum/{name}"].append(float(same.sum(1).float().mean() / h))
            a[f"w<0/{name}"].append(float((wh < 0).float().mean()))
            for key in ("active", "cv"):
                a[f"{key}/{name}"].append(float(torch.gather(diag[key], 1, heads).mean()))
            # block residual: the dropped heads' pooled contribution of each key's block
            dropped = torch.ones(T, H, dtype=torch.bool).scatter_(1, heads, False)
            resid = ((w * dropped)[:, :, None] * P).sum(1)                  # [T, NB]
            sc2 = sc + resid[:, bidx]
            a[f"recall+resid/{name}"].append(float(recall_of(topk_mask(sc2, k), ref).mean()))
            # dagger: stage-1 top 4k by the routed score, re-scored by DSA
            s1 = topk_mask(sc, min(4 * k, S))
            a[f"dagger/{name}"].append(float(recall_of(topk_mask(I.masked_fill(~s1, float("-inf")), k), ref).mean()))


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--indexer", default=None,
                   help="the folder `misa warmup` saved (default: the cache, $MISA_CACHE/warmup/indexer or "
                        "~/.cache/misa/warmup/indexer)")
    p.add_argument("--model", default=None, help="the GGUF model file (default: $MISA_MODEL, else the cache)")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--context", type=int, default=4096, help="window length, tokens (default: 4096)")
    p.add_argument("--windows", type=int, default=2, help="held-out windows (default: 2)")
    p.add_argument("--queries", type=int, default=256, help="queries per window (default: 256)")
    p.add_argument("--layers", default="4,10,11,16,17,19,22,28", help="comma-separated layers (default: %(default)s)")
    p.add_argument("--k", default="128,256", help="comma-separated top-k sizes (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="routed heads h (default: 8)")
    p.add_argument("--block", type=int, default=128, help="router block size B (default: 128)")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle routers (slow)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    a = p.parse_args(argv)
    indexer = a.indexer or default_indexer()
    if indexer is None:
        p.error("no trained indexer in the cache: run `misa warmup` first, or pass --indexer DIR")
    torch.set_num_threads(a.threads)
    layers = [int(x) for x in a.layers.split(",")]
    ks = [int(x) for x in a.k.split(",")]
    t0 = time.time()
    ctx = EvalContext.create(model=a.model, device="cpu", indexer=indexer, corpus=a.corpus,
                             token_cache=cache_dir() / "tokens")
    tokens = data.heldout_tokens(ctx.tokenizer, ctx.corpus, ctx.token_cache)
    wins = data.windows(tokens, a.context, a.windows)
    qpos = query_positions(a.context, a.queries, ctx.device)
    ke = (qpos + 1).int()
    ks_ = torch.zeros_like(ke)
    acc = defaultdict(lambda: defaultdict(list))
    for wi, win in enumerate(wins):
        caps = ctx.capture(win, layers)
        for layer in layers:
            cap = caps.pop(layer)
            with torch.no_grad():
                full = ctx.stack.inference_inputs(layer, cap["x"])
                inp = type(full)(full.q[qpos], full.kv, full.weights[qpos], full.raw_weights[qpos])
                probs = attention_probs(cap["q"][:, qpos], cap["k"], ctx.scaling, qpos)
                g = torch.Generator().manual_seed(layer * 31 + wi)
                analyse_layer(inp, probs, ke, ks_, a.block, a.heads, ks, g, acc, layer, not a.no_oracle)
            print(f"window {wi} layer {layer} done, {time.time() - t0:.0f} s", flush=True)
    res = {f"{l}/{k}": {m: sum(v) / len(v) for m, v in d.items()} for (l, k), d in acc.items()}
    meta = {"command": "python scripts/router_analysis.py " + " ".join(argv or __import__("sys").argv[1:]),
            "cpu": platform.processor() or platform.machine(), "threads": a.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "context": a.context, "windows": len(wins), "queries_per_window": int(qpos.numel()),
            "layers": layers, "k": ks, "heads": a.heads, "block": a.block, "seconds": round(time.time() - t0)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    (out / "results.md").write_text(report(meta, res, layers, ks))
    print(report(meta, res, layers, ks))


def report(meta, res, layers, ks) -> str:
    md = [f"<!-- {meta['command']} | {meta['cpu']}, {meta['threads']} threads | {meta['date']} | "
          f"{meta['seconds']} s -->",
          f"context {meta['context']}, {meta['windows']} windows x {meta['queries_per_window']} queries, "
          f"h = {meta['heads']}, B = {meta['block']}\n"]

    def per_layer_table(k, prefix, title):
        """One column per metric ``prefix/<name>``, one row per layer, then the mean over layers."""
        names = sorted({m.split("/", 1)[1] for m in res[f"{layers[0]}/{k}"] if m.startswith(prefix + "/")})
        md.append(title)
        md.append("| layer | " + " | ".join(names) + " |")
        md.append("|---" * (len(names) + 1) + "|")
        for l in layers + ["mean"]:
            if l == "mean":
                vals = [sum(res[f"{x}/{k}"][f"{prefix}/{n}"] for x in layers) / len(layers) for n in names]
            else:
                vals = [res[f"{l}/{k}"][f"{prefix}/{n}"] for n in names]
            md.append(f"| {l} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")

    for k in ks:
        per_layer_table(k, "recall", f"## recall of DSA's top-{k}\n")
        for prefix in ("selmass", "recall+resid", "dagger", "corr", "overlap-abs-sum", "w<0", "active", "cv"):
            per_layer_table(k, prefix, f"\n### {prefix}, k = {k}\n")
        other = sorted(m for m in res[f"{layers[0]}/{k}"] if "/" in m and m.split("/")[0] in
                       ("check", "mass", "dsa", "gap", "greedy-curve", "backward-curve", "best-block", "cancel"))
        md.append(f"\n### diagnostics, k = {k}\n")
        md.append("| layer | " + " | ".join(other) + " |")
        md.append("|---" * (len(other) + 1) + "|")
        for l in layers:
            md.append(f"| {l} | " + " | ".join(f"{res[f'{l}/{k}'][m]:.3f}" for m in other) + " |")
        md.append("")
    md.append("### all heads\n")
    md.append("| layer | w<0 | active | cv |\n|---|---|---|---|")
    for l in layers:
        r = res[f"{l}/all"]
        md.append(f"| {l} | {r['w<0']:.3f} | {r['all/active']:.3f} | {r['all/cv']:.3f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
