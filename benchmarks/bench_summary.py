"""Print a ``misa bench`` JSON compactly: each size's medians, speed-ups and the timing rounds of
the scoring stages (a developer tool for device-call logs).

    python3 benchmarks/bench_summary.py bench.json
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    for r in json.load(open(path))["rows"]:
        print(r["seq_len"], {k: round(v, 3) for k, v in r["ms"].items()})
        print("   x", {k[len("speedup."):]: round(v, 2) for k, v in r.items() if k.startswith("speedup.")})
        rounds = r.get("ms_rounds", {})
        print("   rounds", {k: [round(x, 3) for x in v] for k, v in rounds.items()
                            if k in ("dsa.logits", "misa.logits", "misa.router")})


if __name__ == "__main__":
    main(sys.argv[1])
