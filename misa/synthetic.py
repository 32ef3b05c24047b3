"""A synthetic indexer workload shaped like real DSA traffic, for demos and benchmarks.

Not i.i.d. noise: the keys carry topics (segments of text), a RoPE-like positional part, attention
sinks and a few "fact" spans; the heads specialise (local window, sink, current topic, retrieval of
an earlier span, noise) and the per-query weights decide which heads matter for which query, so
routing heads per query is meaningful. The real-model evaluation (``misa eval``) replaces it when
a trained indexer is available.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant

HEAD_TYPES = ("local", "sink", "topic", "retrieval", "noise")
HEAD_SHARE = (0.25, 0.1, 0.25, 0.25, 0.15)


@dataclass
class Workload:
    q: torch.Tensor          # [T, H, D] float8_e4m3fn
    weights: torch.Tensor    # [T, H] float32, q scales folded in
    kv: tuple                # (k_fp8 [S, D], k_scale [S])
    ks: torch.Tensor         # [T] int32
    ke: torch.Tensor         # [T] int32
    head_types: list

    @property
    def args(self):
        return self.q, self.kv, self.weights, self.ks, self.ke


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def _rope(pos: torch.Tensor, base_vec: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of ``base_vec`` by ``pos * freqs`` (non-interleaved halves): ``[N, 2F]``."""
    ang = pos.float()[:, None] * freqs[None, :]
    a, b = base_vec[: freqs.numel()], base_vec[freqs.numel():]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def indexer_workload(seq_len: int = 8192, num_queries: int = 1024, heads: int = 64, head_dim: int = 128,
                     seed: int = 0, device: str | torch.device = "cpu", ue8m0: bool = False) -> Workload:
    """Causal prefill of the last ``num_queries`` tokens of a ``seq_len``-token sequence."""
    if not 1 <= num_queries <= seq_len:
        raise ValueError(f"num_queries: must be in [1, seq_len={seq_len}], got {num_queries}")
    if head_dim % 4:
        raise ValueError(f"head_dim: must be a multiple of 4, got {head_dim}")
    g = torch.Generator().manual_seed(seed)
    dr = head_dim // 2                       # positional (rotary) part
    dc = head_dim - dr                       # content part
    freqs = 10000.0 ** (-torch.arange(dr // 2).float() / (dr // 2))

    # text: topic segments, a sink at the start, a few fact spans with their own signature
    n_topics = 24
    topics = _unit(n_topics, dc, g)
    seg_topic = torch.empty(seq_len, dtype=torch.long)
    pos = 0
    while pos < seq_len:
        n = int(torch.randint(64, 512, (1,), generator=g))
        seg_topic[pos:pos + n] = int(torch.randint(n_topics, (1,), generator=g))
        pos += n
    n_facts = 16
    fact_sig = _unit(n_facts, dc, g)
    fact_start = torch.randint(0, max(1, seq_len - num_queries), (n_facts,), generator=g)
    fact_len = torch.randint(8, 48, (n_facts,), generator=g)
    sink = _unit(1, dc, g)[0]

    s = torch.arange(seq_len)
    k_content = 1.0 * topics[seg_topic] + 0.6 * torch.randn(seq_len, dc, generator=g) / dc ** 0.5
    for f in range(n_facts):
        k_content[fact_start[f]: fact_start[f] + fact_len[f]] += 1.5 * fact_sig[f]
    k_content[:4] += 3.0 * sink
    k_pos_base = _unit(1, dr, g)[0]
    k = torch.cat([k_content, _rope(s, k_pos_base, freqs)], dim=-1)

    # heads: each has a type; local heads look at different frequency bands (window widths)
    counts = [round(p * heads) for p in HEAD_SHARE]
    counts[-1] = heads - sum(counts[:-1])
    types = [t for t, c in zip(HEAD_TYPES, counts) for _ in range(c)]
    perm = torch.randperm(heads, generator=g).tolist()
    types = [types[i] for i in perm]

    t_pos = torch.arange(seq_len - num_queries, seq_len)
    tq = t_pos.numel()
    q = torch.zeros(tq, heads, head_dim)
    gain = torch.zeros(tq, heads)
    # each query leans on a random mix of head types; a third of them are "retrieval queries"
    wants = torch.rand(tq, len(HEAD_TYPES), generator=g) ** 2
    retrieval_query = torch.rand(tq, generator=g) < 0.35
    wants[:, HEAD_TYPES.index("retrieval")] = torch.where(retrieval_query, 1.0, 0.05)
    target_fact = torch.randint(n_facts, (tq,), generator=g)
    for j, kind in enumerate(types):
        if kind == "local":
            band = torch.zeros(dr)
            lo = int(torch.randint(0, dr // 4, (1,), generator=g))
            band[lo: lo + dr // 4] = 1.0
            band[dr // 2 + lo: dr // 2 + lo + dr // 4] = 1.0
            q[:, j, dc:] = 4.0 * _rope(t_pos, k_pos_base * band, freqs)
        elif kind == "sink":
            q[:, j, :dc] = 2.0 * sink
        elif kind == "topic":
            q[:, j, :dc] = 2.5 * topics[seg_topic[t_pos]]
        elif kind == "retrieval":
            q[:, j, :dc] = 3.0 * fact_sig[target_fact]
        q[:, j] += 0.4 * torch.randn(tq, head_dim, generator=g) / head_dim ** 0.5 * 4
        gain[:, j] = wants[:, HEAD_TYPES.index(kind)]
    sign = torch.where(torch.rand(tq, heads, generator=g) < 0.25, -0.3, 1.0)
    weights = gain * sign * torch.exp(0.5 * torch.randn(tq, heads, generator=g)) / heads ** 0.5

    q_fp8, w = quant.quantize_queries(q, weights, ue8m0)
    k_fp8, k_scale = quant.quantize_keys(k, ue8m0)
    ke = (t_pos + 1).int()
    dev = torch.device(device)
    return Workload(q_fp8.to(dev), w.to(dev), (k_fp8.to(dev), k_scale.to(dev)),
                    torch.zeros_like(ke).to(dev), ke.to(dev), types)
