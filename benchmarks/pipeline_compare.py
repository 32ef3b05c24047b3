"""End-to-end selections with their queries in 1, 2, 4 or 8 chunks pipelined over two streams
(``misa.select.PIPELINE_CHUNKS``: a chunk's top-k and MISA-dagger's re-scoring on a second stream
while the next chunk is scored), every method at every setting timed in interleaved rounds in one
call, so the speed-ups compare like with like (dense DSA gets the same pipeline).

    python benchmarks/pipeline_compare.py --out pipeline.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton.testing

from misa import select
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--keys", default="65536,131072")
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for s in (int(v) for v in args.keys.split(",")):
        t, k = 4096, 2048
        inp = check_inputs(*indexer_workload(s, t, 64, 128, seed=1, device=dev).args)
        methods = {
            "dsa": lambda: select.dsa_select(inp, k),
            "misa": lambda: select.misa_select(inp, k, 8, 1024, None),
            "misa-dagger": lambda: select.misa_select(inp, k, 8, 1024, 8192),
        }
        per = {}
        for _ in range(args.rounds):
            for chunks in (int(c) for c in args.chunks.split(",")):
                select.PIPELINE_CHUNKS = chunks
                for name, fn in methods.items():
                    ms = float(triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median"))
                    per.setdefault(f"{name}@{chunks}", []).append(ms)
        ms = {key: statistics.median(v) for key, v in per.items()}
        row = {"keys": s, "ms": ms, "speedup": {}}
        for key, v in ms.items():
            chunks = key.split("@")[1]
            row["speedup"][key] = ms[f"dsa@{chunks}"] / v
        print(s, {key: round(v, 3) for key, v in ms.items()}, flush=True)
        print("   x", {key: round(v, 2) for key, v in row["speedup"].items() if not key.startswith("dsa")}, flush=True)
        res["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
