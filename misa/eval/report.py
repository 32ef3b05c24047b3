"""Where each number came from (command, device, date, versions) and how tables are written."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device) -> dict:
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = None
    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
            "device": device_name(device),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "transformers": tv, "python": platform.python_version()}


def md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_result(out_dir: Path, name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """``name.json`` (everything) and ``name.md`` (the tables, headed by their provenance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / f"{name}.json"
    j.write_text(json.dumps(payload, indent=1, default=float))
    head = (f"<!-- produced by: {payload.get('command')} | {payload.get('device')} | {payload.get('date')} -->\n"
            f"_Command_: `{payload.get('command')}`  \n_Device_: {payload.get('device')}  \n"
            f"_Date_: {payload.get('date')}  \n_Model_: {payload.get('model', '-')}  \n"
            f"_Indexer_: {payload.get('indexer', '-')}\n\n"
            + (f"**Warning**: {payload['warning']}\n\n" if payload.get("warning") else ""))
    m = out_dir / f"{name}.md"
    m.write_text(head + markdown.rstrip() + "\n")
    return j, m


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)
