"""DSA's lightning indexer as a torch module, and MISA built from its weights.

``DSAIndexer`` has the forward of the indexer in DeepSeek-V3.2's public inference code
(``inference/model.py``): the query from the query latent ``qr`` through ``wq_b``; the key from
``x`` through ``wk`` and a LayerNorm (float32); RoPE on the first ``rope_head_dim`` dims of each head
(non-interleaved, as V3.2 ships it; ``rope_interleaved=True`` for the early V3.2-Exp code); a Hadamard
rotation of q and k; fp8 quantisation with one scale per vector (optionally a power of two, "ue8m0");
``weights = weights_proj(x) * H^-0.5 * D^-0.5 * q_scale``; the mask; top-k. Scoring and top-k go
through the library (``misa.dsa_select``), so the same module runs the CPU references and the GPU
kernels. ``MISAIndexer.from_dsa`` reuses an indexer's weights (shared, not copied) and swaps only
the selection for a ``MisaConfig`` variant.

Differences from the reference, all deliberate: the reference quantises per block of 128 values,
this quantises per vector, which is the same thing at its head dim of 128; the key cache grows
with the sequence instead of being preallocated; and the slots a query cannot fill (fewer visible
keys than ``index_topk``) hold positions its mask hides, where the reference's ``topk`` returns
arbitrary masked positions: in both the caller's mask removes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MisaConfig, as_misa_config
from ..quant import quantize_keys, quantize_queries
from ..validate import check_int, check_tensor
from .hadamard import hadamard_transform
from .ranges import pad_with_hidden, ranges_from_visible, visible_from_mask


def rope_freqs_cis(rope_dim: int, positions, base: float = 10000.0) -> torch.Tensor:
    """Plain RoPE rotations ``[len(positions), rope_dim // 2]`` complex64, as DeepSeek's
    ``precompute_freqs_cis`` without YaRN (pass the model's own table when it uses YaRN)."""
    check_int("rope_dim", rope_dim, 2)
    if rope_dim % 2:
        raise ValueError(f"rope_dim: must be even, got {rope_dim}")
    pos = torch.arange(positions) if isinstance(positions, int) else torch.as_tensor(positions)
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    angles = torch.outer(pos.float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x [B, S, H, R]`` by ``freqs_cis [S, R/2]`` (complex). Non-interleaved pairs dim ``i``
    with ``i + R/2``; interleaved pairs ``2i`` with ``2i + 1``. Float32 math, ``x``'s dtype out."""
    half = x.shape[-1] // 2
    cos = freqs_cis.real[None, :, None, :]
    sin = freqs_cis.imag[None, :, None, :]
    xf = x.float()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else (xf[..., :half], xf[..., half:])
    y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return y.to(x.dtype)


class DSAIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer. ``forward(x, qr, start_pos, freqs_cis, mask)`` returns the
    selected key positions ``[B, S, min(index_topk, start_pos + S)]`` int64, like the reference."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int = 64, head_dim: int = 128,
                 rope_head_dim: int = 64, index_topk: int = 2048, *, ue8m0: bool = False,
                 rope_interleaved: bool = False):
        super().__init__()
        check_int("dim", dim)
        check_int("q_lora_rank", q_lora_rank)
        check_int("n_heads", n_heads)
        check_int("head_dim", head_dim)
        check_int("rope_head_dim", rope_head_dim, 2, head_dim)
        check_int("index_topk", index_topk)
        self.dim, self.q_lora_rank, self.n_heads, self.head_dim = dim, q_lora_rank, n_heads, head_dim
        self.rope_head_dim, self.index_topk = rope_head_dim, index_topk
        self.ue8m0, self.rope_interleaved = ue8m0, rope_interleaved
        self.softmax_scale = head_dim ** -0.5
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.misa_config = MisaConfig(variant="dsa")
        self.reset_cache()

    def reset_cache(self) -> None:
        """Forget the cached keys (``forward`` with ``start_pos=0`` does this too)."""
        self.k_cache: torch.Tensor | None = None        # [B, L, D] float8_e4m3fn
        self.k_scale_cache: torch.Tensor | None = None  # [B, L] float32

    def _rope(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        r = self.rope_head_dim
        return torch.cat([apply_rope(x[..., :r], freqs_cis, self.rope_interleaved), x[..., r:]], dim=-1)

    def _cache(self, k_fp8: torch.Tensor, k_scale: torch.Tensor, start_pos: int):
        if start_pos == 0:
            self.k_cache, self.k_scale_cache = k_fp8, k_scale
        else:
            cached = 0 if self.k_cache is None else self.k_cache.shape[1]
            if start_pos > cached or self.k_cache.shape[0] != k_fp8.shape[0]:
                raise ValueError(f"start_pos: {start_pos} but {cached} keys are cached for "
                                 f"this batch; start a sequence at 0")
            self.k_cache = torch.cat([self.k_cache[:, :start_pos], k_fp8], dim=1)
            self.k_scale_cache = torch.cat([self.k_scale_cache[:, :start_pos], k_scale], dim=1)
        return self.k_cache, self.k_scale_cache

    def _ranges(self, mask, bsz: int, seqlen: int, end_pos: int, device):
        if mask is None:   # the reference passes no mask at decode: every query sees every cached key
            ks = torch.zeros(bsz, seqlen, dtype=torch.int32, device=device)
            return ks, torch.full_like(ks, end_pos)
        check_tensor("mask", mask)
        if mask.shape[-2:] != (seqlen, end_pos) or mask.ndim not in (2, 3):
            raise ValueError(f"mask: expected [{seqlen}, {end_pos}] or [B, {seqlen}, {end_pos}], "
                             f"got {tuple(mask.shape)}")
        ks, ke = ranges_from_visible(visible_from_mask(mask.to(device)))
        return ks.expand(bsz, seqlen), ke.expand(bsz, seqlen)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, S, dim]``, ``qr [B, S, q_lora_rank]``, ``freqs_cis [S, rope_head_dim/2]`` complex
        for positions ``start_pos .. start_pos + S - 1``; ``mask [S, start_pos + S]`` (bool or
        additive) or None (decode: all cached keys visible)."""
        check_int("start_pos", start_pos, 0)
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        if tuple(freqs_cis.shape) != (seqlen, self.rope_head_dim // 2) or not freqs_cis.is_complex():
            raise ValueError(f"freqs_cis: expected complex [{seqlen}, {self.rope_head_dim // 2}], "
                             f"got {tuple(freqs_cis.shape)} {freqs_cis.dtype}")
        q = self.wq_b(qr).view(bsz, seqlen, self.n_heads, self.head_dim)
        q = hadamard_transform(self._rope(q, freqs_cis))
        k = self.wk(x)
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(),
                         self.k_norm.bias.float(), self.k_norm.eps).type_as(k)
        k = hadamard_transform(self._rope(k[:, :, None], freqs_cis)[:, :, 0])

        weights = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.softmax_scale)
        q_fp8, weights = quantize_queries(q.reshape(-1, self.n_heads, self.head_dim),
                                          weights.reshape(-1, self.n_heads), self.ue8m0)
        k_fp8, k_scale = quantize_keys(k.reshape(-1, self.head_dim), self.ue8m0)
        k_cache, k_scale_cache = self._cache(k_fp8.view(bsz, seqlen, -1), k_scale.view(bsz, seqlen),
                                             start_pos)

        ks, ke = self._ranges(mask, bsz, seqlen, end_pos, x.device)
        top = min(self.index_topk, end_pos)
        q_fp8 = q_fp8.view(bsz, seqlen, self.n_heads, self.head_dim)
        weights = weights.view(bsz, seqlen, self.n_heads)
        out = torch.empty(bsz, seqlen, top, dtype=torch.long, device=x.device)
        for b in range(bsz):
            picked = self.misa_config.select(q_fp8[b], (k_cache[b], k_scale_cache[b]), weights[b],
                                             ks[b].contiguous(), ke[b].contiguous(), top,
                                             decode=mask is None)
            out[b] = pad_with_hidden(picked, ks[b], ke[b], end_pos)
        return out


class MISAIndexer(DSAIndexer):
    """The same indexer with the selection of a ``MisaConfig`` variant; build it with ``from_dsa``."""

    def __init__(self, *args, config: MisaConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.misa_config = as_misa_config(config).check_indexer(self.n_heads, self.index_topk)

    @classmethod
    def from_dsa(cls, indexer: DSAIndexer, config: MisaConfig | None = None, **options) -> "MISAIndexer":
        """A MISA indexer sharing ``indexer``'s projections (no copy, no training).

        ``options`` are ``MisaConfig`` fields (``variant``, ``active_heads``, ...) applied on top of
        ``config`` (default ``MisaConfig()``).
        """
        if not isinstance(indexer, DSAIndexer):
            raise ValueError(f"indexer: expected a DSAIndexer, got {type(indexer).__name__}")
        cfg = as_misa_config(config).with_options(**options)
        with torch.device("meta"):   # projections are replaced by the shared ones right below
            new = cls(indexer.dim, indexer.q_lora_rank, indexer.n_heads, indexer.head_dim,
                      indexer.rope_head_dim, indexer.index_topk, ue8m0=indexer.ue8m0,
                      rope_interleaved=indexer.rope_interleaved, config=cfg)
        new.wq_b, new.wk, new.k_norm, new.weights_proj = (indexer.wq_b, indexer.wk, indexer.k_norm,
                                                          indexer.weights_proj)
        return new

