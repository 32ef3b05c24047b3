"""The whole evaluation as two resumable, time-bounded phases: train the indexers, then evaluate.

    python -m misa.eval.job train --model M.gguf --run-dir RUN --out OUT --minutes 7
    python -m misa.eval.job eval  --model M.gguf --run-dir RUN --out OUT --minutes 5.5

Everything lives in the run dir (checkpoints, the indexer, per-phase results); a phase that is
re-run resumes from it (training continues; finished eval phases are skipped). ``--indexer`` points
``eval`` at indexer files kept elsewhere (e.g. the shards ``train`` copied to ``--out``). With
``--out``, the files worth keeping are copied there, a handful of small files:
train -> indexer shards (<= 15 MiB each) + indexer.json + warmup_loss.png + warmup.md + train_log.json;
eval  -> results.md + results.json + recall.png + niah.png (+ the calibrated configs' JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _out(path: str | None) -> Path | None:
    if not path:
        return None
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def train(args, loaded=None) -> int:
    from .model import load_model
    from .warmup import WarmupConfig, warmup
    t0 = time.perf_counter()
    run = Path(args.run_dir)
    model, tok, path = loaded or load_model(args.model, args.device)
    cuda = next(model.parameters()).device.type == "cuda"
    load_s = time.perf_counter() - t0
    cfg = WarmupConfig(minutes=args.minutes - load_s / 60 - 0.25, dense_fraction=args.dense_fraction,
                       lengths=args.lengths, layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                       q_rank=args.q_rank, k_sparse=args.k_sparse, chunk=args.chunk or (1024 if cuda else 128),
                       max_steps=args.max_steps, save_every_s=args.save_every, kernel=args.kernel,
                       total_minutes=args.total_minutes, init_from=args.init_from)
    print(f"[job train] model loaded in {load_s:.0f} s; training {cfg.minutes:.2f} min on "
          f"{'cuda' if cuda else 'cpu'}", flush=True)
    s = warmup(model, tok, cfg, run, corpus=args.corpus, progress_bar=not args.no_progress,
               token_cache=run / "cache" / "tokens")
    print(f"[job train] {s['steps_total']} steps, {s['tokens_per_layer']:,} tokens per layer "
          f"({s['tokens_per_layer_total']:,} with the prior training), "
          f"{s['tokens_per_s']} tok/s, {s['us_per_token_per_layer']} us/token/layer", flush=True)
    for r in s["per_layer"]:
        print(f"  layer {r['layer']:2d}: dense KL {r['dense_kl_first']} -> {r['dense_kl_last']}, "
              f"sparse KL {r['sparse_kl_last']}")
    out = _out(args.out)
    if out is not None:
        files = sorted((run / "indexer").glob("indexer-*.safetensors")) + [run / "indexer" / "indexer.json"]
        files += [run / "warmup_loss.png", run / "warmup.md"]
        log = json.loads((run / "train_log.json").read_text())
        log["summary"] = s
        (run / "train_log_out.json").write_text(json.dumps(log))
        for f in files:
            shutil.copy(f, out / f.name)
        shutil.copy(run / "train_log_out.json", out / "train_log.json")
    print(f"[job train] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def evaluate(args, loaded=None) -> int:
    from .cli import configs
    from .common import EvalContext
    from . import decode, niah, ppl, recall
    t0 = time.perf_counter()
    deadline = t0 + args.minutes * 60
    run = Path(args.run_dir)
    indexer = Path(args.indexer) if args.indexer else run / "indexer"
    res_dir = run / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    ctx = EvalContext.create(args.model, args.device, indexer, args.corpus, token_cache=run / "cache" / "tokens",
                             loaded=loaded)
    cuda = ctx.device.type == "cuda"
    cfgs = configs(args, cuda)
    if args.model_methods:
        import dataclasses
        for name in ("ppl", "niah"):     # replace() re-runs the configs' checks on the names
            cfgs[name] = dataclasses.replace(cfgs[name], methods=list(args.model_methods))
    print(f"[job eval] model + indexer loaded in {time.perf_counter() - t0:.0f} s on {ctx.device}", flush=True)
    done = {p.stem: json.loads(p.read_text()) for p in res_dir.glob("*.json") if p.stem in PHASES}
    want = set(args.phases)
    if "calibrate" in want:
        t = time.perf_counter()
        from .calibrate import calibration_study
        study = calibration_study(ctx, res_dir, targets=args.targets, k=(args.k or [256])[0],
                                  context=args.context or 8192, windows=args.cal_windows,
                                  queries=args.cal_queries, cost_table=args.cost_table)
        (res_dir / "calibration.json").write_text(json.dumps(
            {k: v for k, v in study.items() if k != "configs"}, default=float))
        print(f"[job eval] calibrate: {time.perf_counter() - t:.0f} s "
              f"(modelled speed-ups: {', '.join(f'{_short(m)} {x:.2f}x' for m, x in study['speedup'].items())})",
              flush=True)
        import dataclasses
        for name in ("ppl", "niah"):     # the calibrated configs join the in-model evaluations
            cfgs[name] = dataclasses.replace(cfgs[name], methods=cfgs[name].methods + list(study["configs"]))
    if want & {"recall", "router"} and not want & {"recall", "router"} <= done.keys():
        t = time.perf_counter()
        rc = cfgs["recall"]
        rc.router_study = "router" in want and "router" not in done
        rc.skip_recall = "recall" not in want or "recall" in done
        res = recall.collect(ctx, rc, deadline=t0 + 0.35 * args.minutes * 60)
        if not rc.skip_recall:
            done["recall"] = recall.recall_report(ctx, rc, res, res_dir)
        if rc.router_study:
            done["router"] = recall.router_report(ctx, rc, res, res_dir)
        print(f"[job eval] recall + router: {time.perf_counter() - t:.0f} s", flush=True)
    if "ppl" in want and "ppl" not in done:
        t = time.perf_counter()
        done["ppl"] = ppl.run(ctx, cfgs["ppl"], res_dir, deadline=t0 + 0.5 * args.minutes * 60)
        print(f"[job eval] ppl: {time.perf_counter() - t:.0f} s", flush=True)
    if "niah" in want and ("niah" not in done or
                           any(v is None for g in done["niah"]["grid"].values() for row in g for v in row)):
        t = time.perf_counter()
        # leave time to write the results (and a share for the decode phase when it still runs after)
        decode_left = "decode" in want and "decode" not in done
        end = t0 + 0.75 * args.minutes * 60 if decode_left else deadline - 20
        done["niah"] = niah.run(ctx, cfgs["niah"], res_dir, deadline=end, previous=done.get("niah"))
        print(f"[job eval] niah: {time.perf_counter() - t:.0f} s", flush=True)
    if "decode" in want and ("decode" not in done or
                             any(v is None for g in done["decode"]["grid"].values() for row in g for v in row)):
        t = time.perf_counter()
        done["decode"] = decode.run(ctx, cfgs["decode"], res_dir, deadline=deadline - 20, previous=done.get("decode"))
        print(f"[job eval] decode: {time.perf_counter() - t:.0f} s", flush=True)
    if "calibrate" in want:
        from .calibrate import study_report
        study = json.loads((res_dir / "calibration.json").read_text())
        done["calibrate"] = study_report(study, done.get("ppl"), done.get("niah"), res_dir, ctx.meta())
    order = ["calibrate", "recall", "router", "niah", "ppl", "decode"]
    md = "\n\n".join((res_dir / f"{n}.md").read_text() for n in order if (res_dir / f"{n}.md").is_file())
    (res_dir / "results.md").write_text(md)
    (res_dir / "results.all.json").write_text(json.dumps({n: done[n] for n in order if n in done}, default=float))
    out = _out(args.out)
    if out is not None:
        shutil.copy(res_dir / "results.md", out / "results.md")
        shutil.copy(res_dir / "results.all.json", out / "results.json")
        for cfg_file in res_dir.glob("calibrated-*.json"):
            shutil.copy(cfg_file, out / cfg_file.name)
        for png in ("recall.png", "niah.png"):
            if (res_dir / png).is_file():
                shutil.copy(res_dir / png, out / png)
    print(md)
    print(f"[job eval] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


PHASES = ("recall", "router", "ppl", "niah", "decode", "calibrate")


def _short(method: str) -> str:
    return Path(method[len("config:"):]).stem if method.startswith("config:") else method


def _phases(s):
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in PHASES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"phases: expected some of {PHASES}, got {s!r}")
    return out


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter
    from .data import CORPUS_HELP
    p = argparse.ArgumentParser(prog="python -m misa.eval.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    for name in ("train", "eval"):
        s = sub.add_parser(name, formatter_class=HelpFormatter)
        s.add_argument("--model", default=None, help="the GGUF file (default: the cache / $MISA_MODEL)")
        s.add_argument("--device", default="auto")
        s.add_argument("--corpus", default=None, help=CORPUS_HELP)
        s.add_argument("--run-dir", default=str(Path(tempfile.gettempdir()) / "misa-run"),
                       help="checkpoints, indexer and results; a re-run resumes from it")
        s.add_argument("--out", default=None, help="copy the files worth keeping here (default: none copied)")
        s.add_argument("--minutes", type=float, required=True, help="wall-clock budget of this phase, loading included")
        s.add_argument("--no-progress", action="store_true")
    t = sub.choices["train"]
    t.add_argument("--lengths", type=_ints, default=[8192])
    t.add_argument("--layers", type=_ints, default=None)
    t.add_argument("--dense-fraction", type=float, default=0.8)
    t.add_argument("--heads", type=int, default=64)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--q-rank", type=int, default=128)
    t.add_argument("--k-sparse", type=int, default=256)
    t.add_argument("--chunk", type=int, default=None)
    t.add_argument("--max-steps", type=int, default=None, help="train exactly this many steps (default: bounded by time)")
    t.add_argument("--save-every", type=float, default=90.0)
    t.add_argument("--kernel", default="auto", choices=["auto", "fused", "eager"])
    t.add_argument("--total-minutes", type=float, default=None,
                   help="training minutes the lr schedule and stage split are planned over, across resumed runs")
    t.add_argument("--init-from", default=None, help="indexer folder to continue from (weights; new schedule)")
    t.set_defaults(func=train)
    e = sub.choices["eval"]
    e.add_argument("--indexer", default=None, help="indexer folder (default: RUN_DIR/indexer)")
    e.add_argument("--phases", type=_phases, default=["recall", "router", "ppl", "niah", "decode"],
                   help="comma-separated subset of recall,router,ppl,niah,decode,calibrate (calibrate: per-layer configs "
                        "at --targets, by recall and by attention mass, evaluated in ppl and niah beside the others)")
    e.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.90, 0.95, 0.98])
    e.add_argument("--cal-windows", type=int, default=2, help="calibration windows (training-side text)")
    e.add_argument("--cal-queries", type=int, default=256, help="queries per calibration window")
    e.add_argument("--cost-table", default=None, help="cost table JSON (default: the shipped one)")
    e.add_argument("--k", type=_ints, default=None)
    e.add_argument("--block-size", type=int, default=128)
    e.add_argument("--router", default="abs-sum")
    e.add_argument("--methods", type=lambda s: s.split(","), default=None)
    e.add_argument("--model-methods", type=lambda s: s.split(","), default=None,
                   help="methods for ppl and niah only (default: --methods, else their own lists)")
    e.add_argument("--decode-methods", type=lambda s: s.split(","), default=None,
                   help="methods for decode (default: those of --methods it can run, else its own list)")
    for opt, typ in (("--context", int), ("--windows", int), ("--queries", int), ("--lengths", _ints),
                     ("--depths", int), ("--ruler-lengths", _ints), ("--ruler-samples", int),
                     ("--contexts", _ints), ("--ppl-windows", int), ("--decode-lengths", _ints),
                     ("--decode-depths", int)):
        e.add_argument(opt, type=typ, default=None)
    e.set_defaults(func=evaluate)
    return p


def main(argv=None, loaded=None) -> int:
    """``loaded``: an already loaded ``(model, tokenizer, path)`` (tests run both phases on one load)."""
    args = build_parser().parse_args(argv)
    if loaded is None:   # the converted model copy lives with the run, so one run dir holds everything
        os.environ.setdefault("MISA_CACHE", str(Path(args.run_dir) / "cache"))
    return args.func(args, loaded)


if __name__ == "__main__":
    sys.exit(main())
