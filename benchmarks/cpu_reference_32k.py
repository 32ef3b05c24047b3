"""The CPU reference at 32K x 32K: a causal dsa_select with H=64, D=128, k=2048 on fp8
inputs, with its time and peak resident memory. ~4-5 minutes on a 2-core machine, ~2.5 GiB.

    python benchmarks/cpu_reference_32k.py
"""
import resource
import time

import torch

import misa

T = S = 32768
H, D, K = 64, 128, 2048

torch.manual_seed(0)
q, w = misa.quantize_queries(torch.randn(T, H, D), torch.randn(T, H))
kv = misa.quantize_keys(torch.randn(S, D))
ks = torch.zeros(T, dtype=torch.int32)
ke = torch.arange(1, T + 1, dtype=torch.int32)
start = time.time()
idx = misa.dsa_select(q, kv, w, ks, ke, k=K)
print(f"dsa_select {T}x{S} causal H={H} D={D} k={K} on CPU: {time.time() - start:.1f} s, "
      f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
full = int((idx >= 0).sum(1).eq(K).sum())
print(f"rows with all {K} picks: {full} (expected {S - K + 1})")
