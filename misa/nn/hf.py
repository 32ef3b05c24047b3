"""Swap the DSA indexer of a loaded HF transformers model for MISA, and back.

Supported: ``deepseek_v32`` (``DeepseekV32Indexer``) and ``glm_moe_dsa`` (``GlmMoeDsaIndexer``), as
transformers 5.x ships them. Each attention layer owns its indexer as ``self_attn.indexer`` and calls
it as ``indexer(hidden_states, q_resid, position_embeddings, mask [B, S, T], position_ids,
cache=...)`` (``past_key_values=`` before 5.24), getting back top-k positions ``[B, S, topk]``
int32. ``patch_model`` replaces that attribute by a ``PatchedIndexer`` which shares the indexer's
projections (so the state dict, and its key names, are unchanged) and keeps the original for
``unpatch_model``. GLM-5 layers marked ``"shared"`` have no indexer and reuse the previous layer's
selection; they follow whatever that layer selects.

What the patched forward computes: the HF indexer's query and key, exactly as HF does (same
projections, the model file's own RoPE function: half-split for DeepSeek-V3.2, interleaved for
GLM-5), the same key cache (``cache.update_indexer``), and weights ``weights_proj(x) * H^-0.5``
with HF's ``head_dim^-0.5`` score scale folded in. HF scores in bf16/fp32 without the Hadamard
rotation or fp8 (the rotation is orthogonal; fp8 is an engine optimisation), and so does the patched
indexer by default, which makes MISA with all heads select what the unpatched model selects.
``fp8=True`` instead rotates and quantises like DeepSeek's inference code and the engines.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..config import MisaConfig, as_misa_config
from ..quant import quantize_keys, quantize_queries
from .hadamard import hadamard_transform
from .ranges import pad_with_hidden, ranges_from_visible, visible_from_mask

# model_type -> (indexer class name, the RoPE function its indexer applies, in the modeling module)
SUPPORTED_MODELS = {
    "deepseek_v32": ("DeepseekV32Indexer", "apply_rotary_pos_emb"),
    "glm_moe_dsa": ("GlmMoeDsaIndexer", "apply_rotary_pos_emb_interleave"),
}
_LIBRARY_DTYPES = (torch.bfloat16, torch.float32)


class PatchedIndexer(nn.Module):
    """Drop-in for a HF DSA indexer: same inputs, same outputs, MISA's selection."""

    def __init__(self, original: nn.Module, config: MisaConfig, rope, *, fp8: bool, ue8m0: bool):
        super().__init__()
        # the original stays reachable for unpatch_model without being registered as a submodule
        object.__setattr__(self, "original", original)
        self.wq_b, self.wk, self.k_norm, self.weights_proj = (original.wq_b, original.wk,
                                                              original.k_norm, original.weights_proj)
        self.layer_idx = original.layer_idx
        self.n_heads, self.head_dim = original.n_heads, original.head_dim
        self.qk_rope_head_dim, self.index_topk = original.qk_rope_head_dim, original.index_topk
        self.softmax_scale = original.softmax_scale
        self.misa_config = config
        self.fp8, self.ue8m0 = fp8, ue8m0
        self._rope = rope
        self.recorder = None       # record_indexer_traffic's callback: sees each selection's inputs

    @torch.no_grad()
    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                cache=None, past_key_values=None):
        cache = cache if cache is not None else past_key_values
        bsz, seqlen, _ = hidden_states.shape
        r = self.qk_rope_head_dim
        cos, sin = position_embeddings
        # q and k exactly as the HF indexer computes them
        q = self.wq_b(q_resid).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
        q_rot, k_rot = self._rope(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., r:]], dim=-1)
        k = torch.cat([k_rot, k[..., r:]], dim=-1).squeeze(2)
        if cache is not None:
            k = cache.update_indexer(k, self.layer_idx)            # [B, T, D], T >= S
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float()
        weights = weights * (self.n_heads ** -0.5 * self.softmax_scale)

        num_keys = k.shape[1]
        mask = attention_mask.expand(bsz, seqlen, num_keys)
        ks, ke = ranges_from_visible(visible_from_mask(mask))
        top = min(self.index_topk, num_keys)
        out = torch.empty(bsz, seqlen, top, dtype=torch.int32, device=q.device)
        for b in range(bsz):
            out[b] = self._select_one(q[b], k[b], weights[b], ks[b], ke[b], top, seqlen == 1)
        return out

    def _select_one(self, q, k, weights, ks, ke, top: int, decode: bool) -> torch.Tensor:
        """One sequence: ``q [S, H, D]``, keys ``k [T, D]``. The keys are cut to the window the
        queries see, so that the router's key blocks start at the first visible key (with left
        padding, the first real token) rather than at the padding."""
        nonempty = ke > ks
        lo = int(ks[nonempty].min()) if bool(nonempty.any()) else 0
        hi = int(ke.max())
        ks_w = torch.where(nonempty, ks, torch.full_like(ks, lo)) - lo
        ke_w = torch.where(nonempty, ke, torch.full_like(ke, lo)) - lo
        keys = k[lo:hi]
        if self.fp8:
            q, weights = quantize_queries(hadamard_transform(q), weights, self.ue8m0)
            kv = quantize_keys(hadamard_transform(keys), self.ue8m0)
        else:   # the library takes bf16/fp32 as they are; other float types widen exactly to fp32
            q = q if q.dtype in _LIBRARY_DTYPES else q.float()
            kv = keys if keys.dtype in _LIBRARY_DTYPES else keys.float()
        if self.recorder is not None:
            self.recorder(self.layer_idx, q, kv, weights, ks_w.int(), ke_w.int(), top)
        picked = self.misa_config.select(q, kv, weights, ks_w.int(), ke_w.int(), top, decode=decode)
        picked = torch.where(picked >= 0, picked + lo, picked)
        return pad_with_hidden(picked, ks, ke, k.shape[0])


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODELS:
        raise ValueError(f"model: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODELS)})")
    return model_type


def _attention_layers(model):
    """Modules that own an ``indexer`` attribute (the attention layers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "indexer", None), nn.Module)]


def patch_model(model, config: MisaConfig | None = None, *, fp8: bool = False, ue8m0: bool = False,
                **options):
    """Replace every DSA indexer of ``model`` (``deepseek_v32`` or ``glm_moe_dsa``) by MISA.

    ``config`` defaults to the model config's ``use_misa``/``misa_*`` keys when it has any, else
    ``MisaConfig()``; a per-layer config (``MisaConfig.from_json`` of what ``misa calibrate``
    wrote) gives each layer its own settings, by the indexer's ``layer_idx``; ``options`` (``variant="misa"``, ``active_heads=8``, ...) are applied on top.
    ``fp8=True`` scores through the Hadamard rotation and fp8 quantisation of DeepSeek's inference
    code (``ue8m0`` for power-of-two scales) instead of the HF model's bf16/fp32 scores.
    Returns ``model``, patched in place.
    """
    model_type = _model_type(model)
    class_name, rope_name = SUPPORTED_MODELS[model_type]
    if config is None:
        raw = model.config.to_dict()
        has_keys = "use_misa" in raw or any(key.startswith("misa_") for key in raw)
        config = MisaConfig.from_model_config(raw) if has_keys else MisaConfig()
    config = as_misa_config(config).with_options(**options).check_indexer(model.config.index_n_heads,
                                                                          model.config.index_topk)
    layers = _attention_layers(model)
    if any(isinstance(m.indexer, PatchedIndexer) for m in layers):
        raise ValueError("model: already patched; call misa.unpatch_model(model) first")
    originals = [m for m in layers if type(m.indexer).__name__ == class_name]
    if not originals:
        raise ValueError(f"model: no {class_name} found to patch")
    rope = getattr(sys.modules[type(originals[0].indexer).__module__], rope_name, None)
    if rope is None:
        raise ValueError(f"model: this transformers version has no {rope_name} beside {class_name}; "
                         "misa supports the transformers 5.x DSA models")
    for layer in originals:        # per-layer settings (a calibrated config) by the indexer's layer index
        layer.indexer = PatchedIndexer(layer.indexer, config.for_layer(layer.indexer.layer_idx), rope,
                                       fp8=fp8, ue8m0=ue8m0)
    return model


def unpatch_model(model):
    """Put the original indexers back. Returns ``model``."""
    _model_type(model)
    layers = [m for m in _attention_layers(model) if isinstance(m.indexer, PatchedIndexer)]
    if not layers:
        raise ValueError("model: not patched by misa.patch_model")
    for layer in layers:
        layer.indexer = layer.indexer.original
    return model


@torch.no_grad()
def record_indexer_traffic(model, texts, queries: int = 256, fp8: bool = False) -> tuple[dict, int]:
    """Run ``model`` (unpatched; DSA selects as usual) on each 1-D token id tensor of ``texts`` and
    record, per layer, the indexer's inputs for ``queries`` query positions spread over the second
    half of each text: ``({layer_idx: [misa.calibrate.LayerSample, ...]}, index_topk)``. The model
    is patched for the forward (DSA, ``fp8`` as for ``patch_model``) and unpatched after."""
    from ..calibration import LayerSample
    samples: dict = {}
    patch_model(model, MisaConfig(variant="dsa"), fp8=fp8)
    indexers = [m.indexer for m in _attention_layers(model) if isinstance(m.indexer, PatchedIndexer)]
    device = next(model.parameters()).device
    try:
        for ids in texts:
            n = int(ids.numel())
            rows = torch.linspace(n // 2, n - 1, min(queries, n - n // 2)).round().long().unique().to(device)

            def record(layer, q, kv, weights, ks, ke, top, rows=rows):
                if q.shape[0] != n:          # a cached decode step, not the prompt
                    return
                kv = tuple(t.clone() for t in kv) if isinstance(kv, tuple) else kv.clone()
                samples.setdefault(layer, []).append(LayerSample(q[rows].clone(), kv, weights[rows].clone(),
                                                                 ks[rows].clone(), ke[rows].clone()))
            for ix in indexers:
                ix.recorder = record
            model(input_ids=ids.to(device)[None], use_cache=False)
    finally:
        for ix in indexers:
            ix.recorder = None
        unpatch_model(model)
    if not samples:
        raise ValueError("model: no indexer ran (is it a DSA model with sparse layers?)")
    return samples, int(model.config.index_topk)
