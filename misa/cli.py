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
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


def _print_table(title: str, columns: list[str], rows: list[list[str]], caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, caption=caption)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    device = _device(args.device)
    cfg = DemoConfig.for_device(device)
    for field in ("seq_len", "num_queries", "k"):
        if getattr(args, field) is not None:
            setattr(cfg, field, getattr(args, field))
    print(f"misa demo on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    workload, why = None, "--workload synthetic"
    if args.workload != "synthetic":
        try:
            from .eval.realdemo import real_workload
            real_cfg = DemoConfig.for_device(torch.device("cpu"))   # the 8K-context settings: the model's context
            for field in ("seq_len", "num_queries", "k"):
                if getattr(args, field) is not None:
                    setattr(real_cfg, field, getattr(args, field))
            workload, why = real_workload(device, real_cfg.seq_len, real_cfg.num_queries, args.model, args.indexer,
                                          fetch=args.workload == "real")
        except ImportError as e:        # the eval extra is not installed
            workload, why = None, f"the eval extra is missing ({e.name})"
        if workload is None and args.workload == "real":
            raise ValueError(f"workload: real asked for, but {why}")
        if workload is not None:
            cfg = real_cfg
            cfg.seq_len = int(workload.ke.max())
            print(f"workload: {workload.description}, top-k = {cfg.k}")
    if workload is None:
        print(f"workload: SYNTHETIC indexer traffic (topics, sinks, local windows, retrieved spans, specialised "
              f"heads), {cfg.heads} heads x {cfg.head_dim} dims, fp8; {cfg.num_queries} causal queries at the end "
              f"of a {cfg.seq_len}-token context, top-k = {cfg.k} (real model not used: {why})")
    rows = run_demo(cfg, device, seed=args.seed, workload=workload)
    note = ("times are the PyTorch reference on the CPU: they show work, not kernel speed (see `misa bench`)"
            if device.type == "cpu" else "wall-clock of one call each after a warm-up; `misa bench` times properly")
    _print_table("Recall of DSA's selected tokens", ["method", "setting", "recall (mean)", "recall (min)", "ms"],
                 [[r.method, r.setting, f"{r.recall_mean:.4f}", f"{r.recall_min:.4f}", f"{r.ms:.1f}"] for r in rows],
                 caption=note)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_rows, run_bench, save
    device = _device(args.device)
    cfg = BenchConfig(num_queries=args.num_queries, context_lens=tuple(args.context_lens), heads=args.heads,
                      k=args.k, active_heads=args.active_heads, block_size=args.block_size,
                      stage1_k=args.stage1_k, hisa_block_size=args.hisa_block_size,
                      hisa_block_k=args.hisa_block_k, rep_ms=args.rep_ms, rounds=args.rounds,
                      methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    result = run_bench(cfg, device)
    cols, rows = format_rows(result)
    _print_table(f"misa bench on {result['gpu']} ({result['date']}), {cfg.num_queries} causal queries, "
                 f"H={cfg.heads}, D={cfg.head_dim}, k={cfg.k}, h={cfg.active_heads}, B={cfg.block_size}",
                 cols, rows, caption="medians of triton.testing.do_bench; x = speed-up over dense DSA in the same run")
    if args.json:
        save(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="misa", description="MISA: cheaper token selection for DeepSeek Sparse Attention.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compare DSA, MISA, MISA-dagger and HISA on one indexer workload",
                       description="Run DSA, MISA (h of H heads), MISA-dagger and HISA on one indexer workload "
                                   "and print, per method, the recall of DSA's selected tokens and the time.")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    d.add_argument("--seq-len", type=int, default=None, help="context length (default: 8192 on CPU, 32768 on GPU)")
    d.add_argument("--num-queries", type=int, default=None,
                   help="queries at the end of the context (default: 1024 on CPU, 4096 on GPU)")
    d.add_argument("--k", type=int, default=None, help="tokens each query keeps (default: 512 on CPU, 2048 on GPU)")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    d.add_argument("--workload", choices=["auto", "real", "synthetic"], default="auto",
                   help="real: SmolLM2 + the indexer `misa warmup` trained; auto (default): real when both are on "
                        "this machine, else synthetic")
    d.add_argument("--model", default=None, help="real workload: the GGUF model file (default: the cache)")
    d.add_argument("--indexer", default=None, help="real workload: the indexer folder (default: the cache)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time DSA, MISA, MISA-dagger and HISA kernels (needs a GPU)",
                       description="Time every method end to end and stage by stage (router, scoring, top-k) "
                                   "on fresh synthetic fp8 inputs, with medians of many runs, and print speed-ups "
                                   "over dense DSA measured in the same run, recall of DSA's selection and peak memory.")
    b.add_argument("--device", default="auto", help="a CUDA device (default: cuda)")
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
    b.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    b.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds per measurement (each --rep-ms / rounds; the median is reported)")
    b.add_argument("--methods", default="dsa,misa,misa-gap,misa-dagger,hisa",
                   help="comma-separated, from dsa,misa,misa-gap,misa-dagger,hisa")
    b.add_argument("--json", default=None, help="also write the full results to this JSON file")
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
