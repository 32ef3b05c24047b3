"""``misa warmup``: train a DSA indexer for every layer of the frozen model, DeepSeek-V3.2's two stages.

Stage 1 (dense warm-up): target ``p[t, :]`` = the layer's attention probabilities summed over its
query heads and L1-normalised (the mean over heads); loss ``KL(p || softmax(I))`` over the causal
prefix. Stage 2 (sparse): the same KL restricted to the indexer's own top-``k`` tokens (both sides
renormalised over them). AdamW, lr 1e-3 (linear warm-up, cosine decay by elapsed time).

All layers train from ONE frozen forward per step: hooks capture each layer's normalised input and
post-RoPE q/k, then each layer's loss is computed in query chunks, each chunk against the keys up
to its end only (the causal upper triangle is skipped), under bf16 autocast on CUDA. Gradients of
the keys are accumulated over chunks on a detached leaf and pushed through the key projection once.

Time-bounded: ``minutes`` of training (the stage split is a fraction of it); it checkpoints to the
run dir every ``save_every_s`` and when time is up, and resumes from there. ``total_minutes`` plans
one schedule (lr decay, stage split) over several such calls, as a GPU machine with a 10-minute
limit per command needs. Or step-bounded: ``max_steps`` trains exactly that many steps in the call
whatever the time, with the lr schedule and the stage split planned over the steps, so that the
same config trains the same steps on any machine (what tests use). ``init_from`` continues from
an indexer trained elsewhere (weights only: a new schedule and a fresh optimizer; its tokens are
counted as prior training).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data
from .hooks import Controller, attention_probs, run_layers
from .indexer import IndexerConfig, IndexerStack, indexer_logits
from .model import model_geometry
from .report import provenance

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.json"


@dataclass
class WarmupConfig:
    minutes: float = 6.0
    dense_fraction: float = 0.8      # share of the time in stage 1; the rest is the sparse stage
    lengths: list[int] = field(default_factory=lambda: [8192])   # window lengths, drawn at random per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    k_sparse: int = 256              # stage 2 restricts the KL to the indexer's top-k
    chunk: int = 1024                # queries per chunk (the [H, chunk, keys] intermediate)
    heads: int = 64
    head_dim: int = 64
    q_rank: int = 128
    layers: list[int] | None = None  # None: all
    seed: int = 0
    # a step count: this call trains exactly max_steps steps (fewer only when interrupted); the time
    # budget then does not stop it, and the lr schedule and stage split are planned over the steps
    # (prior steps + max_steps) instead of seconds. None: bounded by ``minutes``.
    max_steps: int | None = None
    save_every_s: float = 120.0
    reserve_s: float = 5.0
    kernel: str = "auto"             # auto: fused Triton kernels where they run and check out, else eager
    total_minutes: float | None = None   # training time the schedule is planned over (None: this call's)
    init_from: str | None = None     # an indexer folder to continue from when the run dir has none

    def __post_init__(self):
        if not self.minutes > 0:
            raise ValueError(f"minutes: must be > 0, got {self.minutes}")
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ValueError(f"dense_fraction: must be in [0, 1], got {self.dense_fraction}")
        if not self.lengths or any(int(n) < 2 for n in self.lengths):
            raise ValueError(f"lengths: expected window lengths >= 2, got {self.lengths}")
        if self.total_minutes is not None and not self.total_minutes > 0:
            raise ValueError(f"total_minutes: must be > 0, got {self.total_minutes}")
        if self.kernel not in ("auto", "fused", "eager"):
            raise ValueError(f"kernel: expected auto, fused or eager, got {self.kernel!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        for name in ("k_sparse", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def _chunk_kl(logits, p, logp, causal, sparse: bool, k_sparse: int):
    """(stage KL summed over the chunk's queries [differentiable], dense KL [detached])."""
    logits = logits.masked_fill(~causal, float("-inf"))
    logq = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        dense = torch.where(causal, p * (logp - logq.masked_fill(~causal, 0.0)), 0.0).sum()
    if sparse:
        top = torch.topk(logits.detach(), min(k_sparse, logits.shape[1]), dim=-1).indices
        valid = torch.zeros_like(causal).scatter_(1, top, True) & causal
        pt = p * valid
        pt = pt / pt.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
        logpt = torch.log(pt.clamp_min(1e-30))
    else:
        valid, pt, logpt = causal, p, logp
    kl = torch.where(valid, pt * (logpt - logq.masked_fill(~valid, 0.0)), 0.0).sum()
    return kl, dense


def _target(qm, km, scaling, qpos, width):
    with torch.no_grad():
        p = attention_probs(qm, km, scaling, qpos, width=width)                    # [C, width] f32
        return p, torch.log(p.clamp_min(1e-30))


def _layer_loss(idx, cap, pos, scaling, sparse: bool, k_sparse: int, chunk: int, amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of one layer's KL over all queries (eager PyTorch, query chunks of ``chunk``);
    returns (stage KL, dense KL) per query, detached."""
    x, qm, km = cap["x"], cap["q"], cap["k"]
    t = x.shape[0]
    with amp:
        k = idx.keys(x, pos)
    k_leaf = k.detach().requires_grad_(True)
    cols = torch.arange(t, device=x.device)
    stage_kl = torch.zeros((), device=x.device)
    dense_kl = torch.zeros((), device=x.device)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        qpos = pos[t0:t1]
        causal = cols[None, :t1] <= qpos[:, None]
        p, logp = _target(qm[:, t0:t1], km, scaling, qpos, t1)
        with amp:
            q, w = idx.queries(x[t0:t1], qpos)
            logits = indexer_logits(q, k_leaf[:t1], w)                            # [C, t1] f32
        kl, dense = _chunk_kl(logits, p, logp, causal, sparse, k_sparse)
        (kl / t).backward()
        stage_kl += kl.detach()
        dense_kl += dense
    k.backward(k_leaf.grad)
    return stage_kl / t, dense_kl / t


def _layer_loss_fused(idx, cap, pos, scaling, sparse: bool, k_sparse: int, chunk: int, amp):
    """The same loss with the fused Triton logits (no [T, H, S] intermediate); one backward."""
    from .fused import fused_logits
    x, qm, km = cap["x"], cap["q"], cap["k"]
    t = x.shape[0]
    with amp:
        q, w = idx.queries(x, pos)
        k = idx.keys(x, pos)
    dtype = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    logits = fused_logits(q.to(dtype), k.to(dtype), w.float())                    # [T, T] f32, causal
    cols = torch.arange(t, device=x.device)
    total = torch.zeros((), device=x.device)
    dense_kl = torch.zeros((), device=x.device)
    rows = max(chunk, 2048)
    for t0 in range(0, t, rows):
        t1 = min(t, t0 + rows)
        qpos = pos[t0:t1]
        p, logp = _target(qm[:, t0:t1], km, scaling, qpos, t1)
        kl, dense = _chunk_kl(logits[t0:t1, :t1], p, logp, cols[None, :t1] <= qpos[:, None], sparse, k_sparse)
        total = total + kl
        dense_kl += dense
    (total / t).backward()
    return total.detach() / t, dense_kl / t


def choose_kernel(stack, cap, pos, scaling, k_sparse, chunk, amp, want: str) -> tuple[str, str]:
    """'fused' when the Triton kernels run here and agree with the eager formula on this batch
    (loss within 5%, every gradient's cosine similarity >= 0.95), else 'eager'; and why."""
    from . import fused
    if want == "eager":
        return "eager", "asked for"
    if not fused.available(pos.device):
        if want == "fused":
            raise ValueError("kernel: the fused Triton kernels need CUDA (or TRITON_INTERPRET=1)")
        return "eager", "no CUDA/Triton"
    idx = stack
    n = min(pos.numel(), 2048)
    sub = {"x": cap["x"][:n], "q": cap["q"][:, :n], "k": cap["k"][:, :n]}
    results = {}
    try:
        for name, fn in (("eager", _layer_loss), ("fused", _layer_loss_fused)):
            idx.zero_grad(set_to_none=True)
            if pos.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, _ = fn(idx, sub, pos[:n], scaling, False, k_sparse, chunk, amp)
            if pos.device.type == "cuda":
                torch.cuda.synchronize()
            results[name] = (float(loss), {k: p.grad.detach().float().clone() for k, p in idx.named_parameters()},
                             time.perf_counter() - t0)
        idx.zero_grad(set_to_none=True)
    except Exception as e:          # a kernel that does not compile or run here: keep training eagerly
        idx.zero_grad(set_to_none=True)
        if want == "fused":
            raise
        return "eager", f"fused kernels failed: {type(e).__name__}: {str(e)[:300]}"
    le, ge, te = results["eager"]
    lf, gf, tf = results["fused"]
    cos = min(float(torch.nn.functional.cosine_similarity(ge[k].flatten(), gf[k].flatten(), dim=0)) for k in ge)
    rel = abs(lf - le) / max(abs(le), 1e-12)
    why = f"check on {n} tokens: loss {le:.5f} eager vs {lf:.5f} fused, min grad cosine {cos:.4f}, {te * 1e3:.0f} ms vs {tf * 1e3:.0f} ms (incl. first-call compile)"
    # loose bounds: eager rounds the logits to bf16, the fused kernel keeps them in fp32; a real bug
    # shows as a cosine far below these
    if rel <= 0.05 and cos >= 0.95 and math.isfinite(lf):
        return "fused", why
    if want == "fused":
        raise ValueError(f"kernel: the fused kernels disagree with eager ({why})")
    return "eager", "fused kernels disagree: " + why


def _lr(cfg: WarmupConfig, step: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cos = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr * warm * cos


def _save(stack, opt, run_dir: Path, progress: dict, log: list, cfg: WarmupConfig, extra_meta: dict) -> None:
    stack.cfg.meta = {**extra_meta, "warmup": asdict(cfg), "progress": dict(progress)}
    stack.save(run_dir / "indexer")
    state = {"model": {k: v.detach().cpu() for k, v in stack.state_dict().items()},
             "opt": opt.state_dict(), "progress": progress, "shape": stack.cfg.shape_key()}
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE_FILE)
    (run_dir / LOG_FILE).write_text(json.dumps({"progress": progress, "steps": log}))


def warmup(model, tokenizer, cfg: WarmupConfig, run_dir: str | Path, corpus=None, progress_bar: bool = True,
           token_cache: Path | None = None) -> dict:
    """Train (or resume training) the indexers in ``run_dir``; returns a summary dict.

    ``cfg.minutes`` counts from this call: tokenising the corpus and resuming come out of it. With
    ``cfg.max_steps`` the step count alone decides when the call stops and where the schedule is."""
    t_call = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    geo = model_geometry(model)
    layers = list(range(geo["layers"])) if cfg.layers is None else sorted(set(cfg.layers))
    if any(i >= geo["layers"] for i in layers):
        raise ValueError(f"layers: the model has {geo['layers']} layers, got {layers}")
    if max(cfg.lengths) > geo["max_positions"]:
        raise ValueError(f"lengths: the model handles {geo['max_positions']} positions, got {max(cfg.lengths)}")
    icfg = IndexerConfig(layers=layers, hidden=geo["hidden"], heads=cfg.heads, head_dim=cfg.head_dim,
                         q_rank=cfg.q_rank, rope_theta=geo["rope_theta"])
    torch.manual_seed(cfg.seed)
    stack = IndexerStack(icfg).to(device)
    opt = torch.optim.AdamW(stack.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    progress = {"step": 0, "elapsed_s": 0.0, "tokens_per_layer": 0, "sparse_from_step": None}
    log: list[dict] = []
    state_file = run_dir / STATE_FILE
    resumed = "no"
    if state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state["shape"] == icfg.shape_key():
            stack.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            progress = state["progress"]
            if (run_dir / LOG_FILE).is_file():
                log = json.loads((run_dir / LOG_FILE).read_text())["steps"]
            resumed = f"yes (step {progress['step']}, {progress['elapsed_s']:.0f} s trained)"
        else:
            print(f"misa warmup: {state_file} is for another indexer shape; starting afresh", file=sys.stderr)
    elif (run_dir / "indexer" / "indexer.json").is_file():
        old = IndexerStack.load(run_dir / "indexer", device=device)
        if old.cfg.shape_key() == icfg.shape_key():
            stack.load_state_dict(old.state_dict())
            progress.update(old.cfg.meta.get("progress", {}))
            resumed = f"weights only (step {progress['step']}; optimizer state lost)"
    elif cfg.init_from is not None:
        src = Path(cfg.init_from)
        if not (src / "indexer.json").is_file():
            raise ValueError(f"init_from: no indexer.json in {src}")
        old = IndexerStack.load(src, device=device)
        if old.cfg.shape_key() != icfg.shape_key():
            raise ValueError(f"init_from: {src} holds an indexer of shape {old.cfg.shape_key()}, "
                             f"this run trains {icfg.shape_key()}")
        stack.load_state_dict(old.state_dict())
        before = old.cfg.meta.get("progress", {})
        progress["prior_tokens_per_layer"] = before.get("tokens_per_layer", 0) + before.get("prior_tokens_per_layer", 0)
        resumed = (f"continued from {src} ({progress['prior_tokens_per_layer']:,} tokens per layer before; "
                   f"new schedule, fresh optimizer)")

    tokens = data.train_tokens(tokenizer, corpus, token_cache)
    rng = random.Random(cfg.seed * 1000003 + progress["step"])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    ctl = Controller().install(model)
    ctl.capture, ctl.stop_after = set(layers), max(layers)
    scaling = geo["head_dim"] ** -0.5
    budget = cfg.minutes * 60.0 - (time.perf_counter() - t_call)
    if cfg.total_minutes is not None:
        progress["planned_s"] = cfg.total_minutes * 60.0
    planned_total = progress.get("planned_s") or progress["elapsed_s"] + budget
    by_steps = cfg.max_steps is not None
    planned_steps = progress["step"] + cfg.max_steps if by_steps else None
    meta = provenance(device)
    meta.update(model_geometry=geo, train_tokens=int(tokens.numel()), resumed=resumed)

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps if by_steps else max(1, round(budget)), unit="step" if by_steps else "s",
                   desc="warmup", dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    last_save = last_print = t_start
    kernel, kernel_why = None, ""
    step_time = None
    steps_here = 0
    stopped = "time"
    try:
        while True:
            now = time.perf_counter() - t_start
            if by_steps:
                if steps_here >= cfg.max_steps:
                    stopped = "max_steps"
                    break
            elif (step_time is not None and now + step_time > budget - cfg.reserve_s) or now >= budget:
                break
            t0 = time.perf_counter()
            frac = progress["step"] / planned_steps if by_steps else progress["elapsed_s"] / planned_total
            sparse = frac >= cfg.dense_fraction
            if sparse and progress["sparse_from_step"] is None:
                progress["sparse_from_step"] = progress["step"]
            length = rng.choice(cfg.lengths)
            start = rng.randrange(0, tokens.numel() - length)
            ids = tokens[start:start + length].long()[None].to(device)
            lr = _lr(cfg, progress["step"], frac)
            for g in opt.param_groups:
                g["lr"] = lr
            ctl.reset()
            with amp:
                run_layers(model, ids, ctl)
            pos = torch.arange(length, device=device)
            if kernel is None:
                kernel, kernel_why = choose_kernel(stack[layers[0]], ctl.captured[layers[0]], pos, scaling,
                                                   cfg.k_sparse, cfg.chunk, amp, cfg.kernel)
                meta["kernel"] = f"{kernel} ({kernel_why})"
                print(f"misa warmup: {kernel} indexer loss ({kernel_why})", file=sys.stderr, flush=True)
            loss_fn = _layer_loss_fused if kernel == "fused" else _layer_loss
            stage_kl, dense_kl = [], []
            for layer in layers:
                s, d = loss_fn(stack[layer], ctl.captured.pop(layer), pos, scaling, sparse, cfg.k_sparse,
                               cfg.chunk, amp)
                stage_kl.append(s)
                dense_kl.append(d)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stage_v = torch.stack(stage_kl).tolist()     # one sync per step
            dense_v = torch.stack(dense_kl).tolist()
            dt = time.perf_counter() - t0
            step_time = dt if step_time is None else 0.8 * step_time + 0.2 * dt
            progress["step"] += 1
            progress["elapsed_s"] += dt
            progress["tokens_per_layer"] += length
            steps_here += 1
            log.append({"step": progress["step"], "t": round(progress["elapsed_s"], 3), "len": length,
                        "stage": "sparse" if sparse else "dense", "lr": lr, "tok_s": length / dt,
                        "kl": [round(v, 5) for v in stage_v], "dense_kl": [round(v, 5) for v in dense_v]})
            if bar is not None:
                bar.n = steps_here if by_steps else min(round(time.perf_counter() - t_start), bar.total)
                bar.set_postfix_str(f"{'sparse' if sparse else 'dense'} step {progress['step']} "
                                    f"KL {sum(dense_v) / len(dense_v):.3f} {length / dt:,.0f} tok/s")
                bar.refresh()
            elif time.perf_counter() - last_print > 30:
                last_print = time.perf_counter()
                print(f"[warmup] {last_print - t_start:5.0f} s  step {progress['step']}  "
                      f"{'sparse' if sparse else 'dense '}  {progress['tokens_per_layer']:,} tokens/layer  "
                      f"mean dense KL {sum(dense_v) / len(dense_v):.4f}  {length / dt:,.0f} tok/s", file=sys.stderr, flush=True)
            if time.perf_counter() - last_save > cfg.save_every_s:
                _save(stack, opt, run_dir, progress, log, cfg, meta)
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
        ctl.capture, ctl.stop_after = set(), None
    _save(stack, opt, run_dir, progress, log, cfg, meta)
    summary = summarize(log, layers, progress, meta, cfg, stopped, steps_here, time.perf_counter() - t_start)
    (run_dir / "warmup.json").write_text(json.dumps(summary, indent=2))
    write_report(summary, run_dir)
    plot_loss(log, layers, run_dir / "warmup_loss.png", progress.get("sparse_from_step"),
              prior_tokens=progress.get("prior_tokens_per_layer", 0))
    return summary


def summarize(log, layers, progress, meta, cfg, stopped, steps_here, wall_s) -> dict:
    here = log[-steps_here:] if steps_here else []
    tok = sum(r["len"] for r in here)
    busy = sum(r["len"] / r["tok_s"] for r in here)
    tail = log[-max(1, min(20, len(log) // 5)):] if log else []
    per_layer = []
    for i, layer in enumerate(layers):
        first = log[: max(1, min(20, len(log) // 5))] if log else []
        per_layer.append({
            "layer": layer,
            "dense_kl_first": _mean([r["dense_kl"][i] for r in first]),
            "dense_kl_last": _mean([r["dense_kl"][i] for r in tail]),
            "sparse_kl_last": _mean([r["kl"][i] for r in tail if r["stage"] == "sparse"]),
        })
    return {**meta, "config": asdict(cfg), "layers": layers, "stopped": stopped, "steps_total": progress["step"],
            "steps_this_run": steps_here, "tokens_per_layer": progress["tokens_per_layer"],
            "prior_tokens_per_layer": progress.get("prior_tokens_per_layer", 0),
            "tokens_per_layer_total": progress["tokens_per_layer"] + progress.get("prior_tokens_per_layer", 0),
            "planned_s": progress.get("planned_s"),
            "trained_s": round(progress["elapsed_s"], 1), "wall_s_this_run": round(wall_s, 1),
            "tokens_per_s": round(tok / busy, 1) if busy else None,
            "us_per_token_per_layer": round(1e6 * busy / tok / len(layers), 3) if tok else None,
            "sparse_from_step": progress.get("sparse_from_step"), "per_layer": per_layer}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 5) if xs else None


def write_report(summary: dict, run_dir: Path) -> None:
    from .report import md_table
    rows = [[str(r["layer"]), _f(r["dense_kl_first"]), _f(r["dense_kl_last"]), _f(r["sparse_kl_last"])]
            for r in summary["per_layer"]]
    head = (f"# Indexer warm-up\n\n{summary['command']}  \n{summary['device']}, {summary['date']}\n\n"
            f"steps {summary['steps_total']} ({summary['steps_this_run']} in this run, stopped on {summary['stopped']}), "
            f"{summary['tokens_per_layer']:,} tokens per layer, {summary['trained_s']} s of training; "
            + (f"continued from an indexer trained on {summary['prior_tokens_per_layer']:,} tokens per layer "
               f"before ({summary['tokens_per_layer_total']:,} in all); " if summary.get("prior_tokens_per_layer") else "")
            + f"resumed: {summary.get('resumed', 'no')}; "
            f"{summary['tokens_per_s']} tokens/s through all {len(summary['layers'])} layers = "
            f"{summary['us_per_token_per_layer']} us per token per layer. Sparse stage from step "
            f"{summary['sparse_from_step']}.\n\n")
    (run_dir / "warmup.md").write_text(head + md_table(["layer", "dense KL (first steps)", "dense KL (last steps)",
                                                         "sparse KL (last steps)"], rows) + "\n")


def _f(x):
    return "-" if x is None else f"{x:.4f}"


def plot_loss(log: list, layers: list, out: Path, sparse_from: int | None, prior_tokens: int = 0) -> None:
    if not log:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    tokens = (prior_tokens + np.cumsum([r["len"] for r in log])) / 1e6   # a continued run starts at its prior
    dense = np.array([r["dense_kl"] for r in log])          # [steps, layers]

    def ema(v, a=0.9):
        out, acc = np.empty_like(v), v[0]
        for i, x in enumerate(v):
            acc = a * acc + (1 - a) * x
            out[i] = acc
        return out
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        ax.plot(tokens, ema(dense[:, i]), color=cmap(i / max(1, len(layers) - 1)), lw=0.7, alpha=0.6)
    ax.plot(tokens, ema(dense.mean(axis=1)), color="black", lw=2, label="mean over layers")
    if sparse_from is not None and sparse_from < len(log):
        ax.axvline(tokens[max(0, sparse_from - 1)], color="red", ls="--", lw=1, label="sparse stage starts")
    ax.set_xlabel("tokens per layer (millions)")
    ax.set_ylabel("KL(attention || indexer), dense, EMA")
    ax.set_yscale("log")
    ax.set_title(f"Indexer warm-up: {len(layers)} layers (colour: layer, dark = first)"
                 + (f"\ncontinued from {prior_tokens / 1e6:.1f}M tokens per layer (new schedule)" if prior_tokens else ""))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)   # off the curves
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
