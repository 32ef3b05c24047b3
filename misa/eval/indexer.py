"""A DSA lightning indexer per layer, shaped like DeepSeek-V3.2's, for a model that never had one.

Per layer, from the layer's normalised input ``x`` (the ``input_layernorm`` output):

    q = wq_b(rmsnorm(wq_a(x)))            [T, H, D]   (a low-rank query, as DeepSeek projects q from a latent)
    k = layernorm(wk(x))                  [T, D]      (one key per token, shared by all heads)
    RoPE (non-interleaved halves) on the first ``rope_dim`` dims of q and k, with the model's theta
    w = weights_proj(x) * H^-0.5 * D^-0.5 [T, H]
    I[t, s] = sum_j w[t, j] relu(q[t, j] . k[s])

RoPE is ``misa.nn``'s (``rope_freqs_cis`` / ``apply_rope``, the DeepSeek-V3.2 indexer's), the
scores are the library's (``head_scores`` of ``misa.ops.dsa.reference``). At inference q and k
are rotated by ``misa.nn.hadamard_transform`` (dot products unchanged; it spreads outliers before
fp8, as DeepSeek's inference code does) and quantised with ``misa.quantize_queries`` /
``misa.quantize_keys``, as ``misa.nn.DSAIndexer`` does. Saved as safetensors shards of at most
``SHARD_BYTES`` plus ``indexer.json`` so that 30 layers (~20M parameters) travel as small files.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import quant
from ..nn.hadamard import hadamard_transform
from ..nn.indexer import apply_rope as nn_apply_rope, rope_freqs_cis
from ..ops.dsa.reference import head_scores

SHARD_BYTES = 15 * 1024 * 1024
CONFIG_FILE = "indexer.json"


@dataclass
class IndexerConfig:
    layers: list[int]
    hidden: int = 576
    heads: int = 64
    head_dim: int = 64
    q_rank: int = 128
    rope_dim: int | None = None          # default: half the head dim
    rope_theta: float = 100000.0
    meta: dict = field(default_factory=dict)   # how it was trained (filled by warmup)

    def __post_init__(self):
        if self.rope_dim is None:
            self.rope_dim = self.head_dim // 2
        for name in ("hidden", "heads", "head_dim", "q_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            raise ValueError(f"rope_dim: expected an even int in [0, head_dim={self.head_dim}], got {self.rope_dim}")
        if not self.layers or any((not isinstance(i, int)) or i < 0 for i in self.layers):
            raise ValueError(f"layers: expected non-negative layer ids, got {self.layers!r}")

    def shape_key(self) -> dict:
        return {k: getattr(self, k) for k in ("layers", "hidden", "heads", "head_dim", "q_rank", "rope_dim", "rope_theta")}


def rope_tables(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, rope_dim / 2]`` float32 of ``misa.nn.rope_freqs_cis`` (non-interleaved pairs:
    dim ``i`` with ``i + rope_dim / 2``), on ``positions``' device."""
    if rope_dim == 0:
        empty = torch.zeros(positions.shape[0], 0, device=positions.device)
        return empty, empty
    with torch.device(positions.device):     # misa.nn's tables, built where the positions are (no copy)
        freqs = rope_freqs_cis(rope_dim, positions.detach(), base=theta)
    return freqs.real.contiguous(), freqs.imag.contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (``misa.nn.apply_rope``, non-interleaved) on the first ``2 * cos.shape[-1]`` dims of
    ``x [T, ..., D]``; the rest pass through."""
    r = 2 * cos.shape[-1]
    if r == 0:
        return x
    t = x.shape[0]
    pe = x[..., :r].reshape(1, t, -1, r)                  # [1, T, heads (or 1), r], as misa.nn takes it
    rot = nn_apply_rope(pe, torch.complex(cos.float(), sin.float())).reshape(x[..., :r].shape)
    return torch.cat([rot, x[..., r:]], dim=-1)


class LayerIndexer(nn.Module):
    def __init__(self, cfg: IndexerConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.heads, cfg.head_dim
        self.wq_a = nn.Linear(cfg.hidden, cfg.q_rank, bias=False)
        self.q_norm = nn.RMSNorm(cfg.q_rank, eps=1e-6)
        self.wq_b = nn.Linear(cfg.q_rank, h * d, bias=False)
        self.wk = nn.Linear(cfg.hidden, d, bias=False)
        self.k_norm = nn.LayerNorm(d, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden, h, bias=False)
        self.weight_scale = h ** -0.5 * d ** -0.5

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, hidden]`` -> ``q [T, H, D]``, ``w [T, H]`` (scaled by H^-0.5 D^-0.5)."""
        c = self.cfg
        q = self.wq_b(self.q_norm(self.wq_a(x))).view(x.shape[0], c.heads, c.head_dim)
        q = apply_rope(q, *rope_tables(positions, c.rope_dim, c.rope_theta))
        w = self.weights_proj(x).float() * self.weight_scale
        return q, w

    def keys(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [T, hidden]`` -> ``k [T, D]``."""
        c = self.cfg
        k = self.k_norm(self.wk(x))
        return apply_rope(k, *rope_tables(positions, c.rope_dim, c.rope_theta))

    def forward(self, x, positions):
        q, w = self.queries(x, positions)
        return q, self.keys(x, positions), w


def indexer_logits(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Differentiable ``I [T, S] = sum_j w[t,j] relu(q[t,j] . k[s])`` for training (no masking).

    ``q [T, H, D]``, ``k [S, D]``, ``w [T, H]``; builds the ``[T, H, S]`` intermediate, so callers chunk T.
    """
    r = head_scores(q, k.to(q.dtype))                                   # [T, H, S]
    return torch.bmm(w.to(r.dtype)[:, None, :], r).squeeze(1).float()    # [T, S]


@dataclass
class IndexerInputs:
    """What the library's selectors take for one layer: fp8 q (scale folded into w), fp8 keys."""
    q: torch.Tensor            # [T, H, D] float8_e4m3fn
    kv: tuple                  # (k_fp8 [S, D], k_scale [S] float32)
    weights: torch.Tensor      # [T, H] float32, q scales folded in
    raw_weights: torch.Tensor  # [T, H] float32, weights_proj output before folding (for "top-|w| heads")


class IndexerStack(nn.Module):
    """One ``LayerIndexer`` per trained layer."""

    def __init__(self, cfg: IndexerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers_ = nn.ModuleDict({str(i): LayerIndexer(cfg) for i in cfg.layers})

    def __getitem__(self, layer: int) -> LayerIndexer:
        return self.layers_[str(layer)]

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.layers_

    @property
    def layer_ids(self) -> list[int]:
        return list(self.cfg.layers)

    @torch.no_grad()
    def inference_inputs(self, layer: int, x: torch.Tensor, positions: torch.Tensor | None = None) -> IndexerInputs:
        """fp8 indexer inputs of one layer for the tokens ``x [T, hidden]`` (float32 math, then fp8)."""
        idx = self[layer]
        dtype = next(idx.parameters()).dtype
        if positions is None:
            positions = torch.arange(x.shape[0], device=x.device)
        q, k, w = idx(x.to(dtype), positions)
        q, k = q.float(), k.float()
        if self.cfg.head_dim & (self.cfg.head_dim - 1) == 0:
            q, k = hadamard_transform(q), hadamard_transform(k)
        q8, wf = quant.quantize_queries(q, w.float())
        return IndexerInputs(q8, quant.quantize_keys(k), wf, w.float())

    # -------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
        """safetensors shards of at most ``SHARD_BYTES`` plus ``indexer.json``; returns the files."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("indexer-*.safetensors"):
            old.unlink()
        shards, cur, size = [], {}, 0
        for name, p in self.state_dict().items():
            t = p.detach().to(dtype).cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > SHARD_BYTES - SHARD_BYTES // 16:   # room for the header
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = t
            size += nbytes
        if cur:
            shards.append(cur)
        files = []
        for i, sd in enumerate(shards):
            f = out / f"indexer-{i + 1:02d}-of-{len(shards):02d}.safetensors"
            save_file(sd, str(f), metadata={"format": "pt"})
            files.append(f)
        cfg = asdict(self.cfg)
        cfg["shards"] = [f.name for f in files]
        cfg["dtype"] = str(dtype).replace("torch.", "")
        (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        return files + [out / CONFIG_FILE]

    @classmethod
    def load(cls, path: str | Path, device=None, dtype: torch.dtype = torch.float32) -> "IndexerStack":
        from safetensors.torch import load_file
        p = Path(path)
        if p.is_file():
            p = p.parent
        cfg_file = p / CONFIG_FILE
        if not cfg_file.is_file():
            raise ValueError(f"indexer: no {CONFIG_FILE} in {p}")
        raw = json.loads(cfg_file.read_text())
        shards = raw.pop("shards")
        raw.pop("dtype", None)
        stack = cls(IndexerConfig(**raw))
        sd = {}
        for s in shards:
            sd.update(load_file(str(p / s)))
        stack.load_state_dict(sd)
        return stack.to(device=device, dtype=dtype).eval()

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for name, p in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        return h.hexdigest()[:12]

    def subset(self, layers) -> "IndexerStack":
        """A stack of some of this stack's layers (weights copied, same device and dtype). Its
        ``meta`` keeps this one's (training, provenance) and adds ``subset``: the layers kept, the
        layers and fingerprint of the stack they came from (what ``misa calibrate`` records as
        ``indexer_id``, so a config calibrated on the full stack can be matched to the subset)."""
        layers = [int(i) for i in layers]
        missing = [i for i in layers if i not in self]
        if not layers or missing or len(set(layers)) != len(layers):
            raise ValueError(f"layers: expected distinct layers of this indexer {self.layer_ids}, got {layers}")
        meta = copy.deepcopy(self.cfg.meta)
        source = meta.get("subset") or {}       # a subset of a subset still names the original stack
        meta["subset"] = {"layers": layers, "source_layers": source.get("source_layers", self.layer_ids),
                          "source_id": source.get("source_id", self.fingerprint())}
        out = IndexerStack(dataclasses.replace(self.cfg, layers=layers, meta=meta))
        for i in layers:
            out[i].load_state_dict(self[i].state_dict())
        p = next(self.parameters())
        return out.to(device=p.device, dtype=p.dtype).eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m misa.eval.indexer subset SRC_DIR DST_DIR --layers 3,15,27``: save some layers of
    a saved indexer as an indexer of their own (how ``misa/data/smollm2-indexer`` is made)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m misa.eval.indexer", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subset", help="save some layers of a saved indexer as an indexer of their own")
    s.add_argument("src", help="the saved indexer's folder (the one holding indexer.json)")
    s.add_argument("dst", help="the folder to write (its old shards are replaced)")
    s.add_argument("--layers", required=True, help="comma-separated layer ids, e.g. 3,15,27")
    args = p.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--layers: expected comma-separated integers, got {args.layers!r}")
    src_dir = Path(args.src).parent if Path(args.src).is_file() else Path(args.src)
    try:
        src = IndexerStack.load(src_dir)
        saved_dtype = json.loads((src_dir / CONFIG_FILE).read_text()).get("dtype", "bfloat16")
        files = src.subset(layers).save(args.dst, dtype=getattr(torch, saved_dtype))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f"wrote {f} ({f.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
