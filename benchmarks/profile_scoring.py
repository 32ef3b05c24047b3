"""Run each scoring kernel of the 4096 x 131072 benchmark once, for ``ncu`` (a developer tool):

    ncu --clock-control none -k regex:'route|mqa_logits|pool_keys' --section SpeedOfLight \
        python3 benchmarks/profile_scoring.py

Order: pooling, routing, routed logits (8 heads), dense logits (64 heads); compiles happen in an
untimed first round, so pass ``--launch-skip 5`` to profile the second round only (five launches a round).
"""
from __future__ import annotations

import torch

from misa.ops.dsa.triton import launch_logits
from misa.ops.router.triton import pool_keys, route_heads
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def main():
    dev = torch.device("cuda")
    inp = check_inputs(*indexer_workload(131072, 4096, 64, 128, seed=1, device=dev).args)
    buf = torch.empty(4096, 131072, device=dev)
    for _ in range(2):
        pool_keys(inp.k, inp.k_scale, 1024)
        heads = route_heads(inp, 8, 1024)        # pools again, then routes
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf, heads=heads)
        launch_logits(inp.q, inp.weights, inp.k, inp.k_scale, inp.ks, inp.ke, buf)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
