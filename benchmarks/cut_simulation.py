"""How good is the top-k's sampled cut? A CPU simulation on the synthetic workload.

For 64 queries spread over a 4096 x 131072 causal prefill (float32 scores, all heads and MISA's 8
routed heads), compare two samples of 2048 columns for each row's cut below its k-th largest
score: single columns spread evenly over the row (``SAMPLE_CHUNK = 1``, the default) and 16-wide
chunks (``SAMPLE_CHUNK = 16``). Both take the sample quantile at the expected
rank plus the kernel's margin (``CUT_SIGMAS`` standard deviations plus 17). Reports the survivors per row (what the select kernel then
searches) and the rows that keep the fast path (cut at or below the k-th score, survivors within
the scratch).

    python benchmarks/cut_simulation.py        # ~2 min on 2 CPU cores
"""
import math

import torch

from misa import select
from misa.ops.topk.triton import CUT_SIGMAS
from misa.synthetic import indexer_workload
from misa.validate import check_inputs


def quantile_cut(sample: torch.Tensor, k: int, n: int) -> torch.Tensor:
    expect = k * sample.numel() / n
    need = int(expect + CUT_SIGMAS * math.sqrt(expect) + 17)
    return torch.sort(sample, descending=True).values[need - 1]


def main(seq_len=131072, num_queries=4096, k=2048, sample=2048, rows=64):
    inp = check_inputs(*indexer_workload(seq_len, num_queries, 64, 128, seed=seq_len).args)
    pick = torch.arange(0, num_queries, num_queries // rows)
    keys = select.float_keys(inp)
    routed = select.route_heads(inp, 8, 1024)[pick].long()
    cap = 4 * k + 4096
    for name, heads in (("DSA (64 heads)", None), ("MISA (8 routed heads)", routed)):
        found = {"single columns": [], "16-wide chunks": []}
        for i, t in enumerate(pick.tolist()):
            q, w = inp.q[t].float(), inp.weights[t]
            if heads is not None:
                q, w = q[heads[i]], w[heads[i]]
            lo, hi = int(inp.ks[t]), int(inp.ke[t])
            x = ((keys[lo:hi] @ q.T).clamp_min(0) * w).sum(1)
            n = x.numel()
            kth = torch.topk(x, k).values[-1]
            j = torch.arange(sample)
            single = j * n // sample
            chunks = ((j // 16) * n // (sample // 16) + j % 16).clamp_max(n - 1)
            for label, pos in zip(found, (single, chunks)):
                cut = quantile_cut(x[pos], k, n)
                found[label].append((int((x >= cut).sum()), bool(cut <= kth)))
        for label, r in found.items():
            surv = torch.tensor([a for a, _ in r]).float()
            fast = sum(1 for a, ok in r if ok and a <= cap)
            print(f"{name}, {label}: survivors per row mean {surv.mean():.0f}, min {surv.min():.0f}, "
                  f"max {surv.max():.0f}; fast-path rows {fast}/{len(r)}")


if __name__ == "__main__":
    main()
