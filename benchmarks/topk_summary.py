"""Print a ``benchmarks/topk_compare.py`` JSON compactly: per size the times, and per variant the
constants it changed (against the defaults, the first variant), whether its picks were right, its
time and how many rows took the fast path (a developer tool for device-call logs).

    python3 benchmarks/topk_summary.py topk.json
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    for row in json.load(open(path))["rows"]:
        stages = " ".join(f"{s} {row[s + '_ms']:.3f}" for s in ("cut", "compact", "select") if s + "_ms" in row)
        print(row["keys"], row["k"], f"torch {row['torch_ms']:.3f} new {row['new_ms']:.3f}", stages)
        if "with_sample_ms" in row:
            stages = " ".join(f"{s} {row['with_sample_' + s + '_ms']:.3f}" for s in ("cut", "compact", "select"))
            print("    with the cut's sample: ok", row.get("with_sample_ok"), f"ms {row['with_sample_ms']:.3f}",
                  f"+ sample launch {row['sample_launch_ms']:.3f}", stages)
        variants = row.get("variants", [])
        for v in variants:
            if "change" in v:       # interleaved rounds: the constants changed and stage medians
                changed = v["change"]
            else:                   # older files: every module constant, upper case
                changed = {n: x for n, x in v.items() if n.isupper() and x != variants[0].get(n)}
            stage_ms = " ".join(f"{s} {v[s + '_ms']:.3f}" for s in ("sample_launch", "cut", "compact", "select")
                                if s + "_ms" in v)
            print("   ", changed or "defaults", "ok", v.get("ok"), f"ms {v.get('ms', -1):.3f}", stage_ms,
                  f"survivors {v.get('survivors_mean', -1):.0f}", "fast", v.get("fast_rows"), v.get("error", ""))

if __name__ == "__main__":
    main(sys.argv[1])
