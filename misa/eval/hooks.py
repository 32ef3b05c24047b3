"""Hooks into a Llama-style transformers model: capture what the indexer trains on, restrict attention.

``Controller.install(model)`` registers a ``"misa"`` attention function with transformers'
``AttentionInterface`` and a forward pre-hook on every ``self_attn`` that records the layer's
normalised input (the ``input_layernorm`` output the attention receives). The attention function
then, per layer:

- records the post-RoPE queries and keys when the layer is in ``capture`` (training targets);
- attends causally (dense), or only to the keys in a boolean ``[T, S]`` mask that ``sparse(layer, x,
  query, key)`` returns (all query heads of a layer share it, as in DSA);
- raises ``StopForward`` after ``stop_after`` so that training skips the layers and the 49K-way
  output head it does not need.

Inputs are single unpadded sequences (batch 1) starting at position 0; the model's own mask is not
used (no mask function is registered, so transformers builds none).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ATTN_NAME = "misa"


class StopForward(Exception):
    pass


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctl: Controller | None = getattr(module, "_misa_ctl", None)
    if ctl is None:
        raise RuntimeError("misa attention used without a Controller installed")
    return ctl.attend(module, query, key, value, scaling)


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, _attention)


class Controller:
    def __init__(self):
        self.capture: set[int] = set()
        self.captured: dict[int, dict[str, torch.Tensor]] = {}
        self.sparse: Callable | None = None
        self.stop_after: int | None = None
        self._x: dict[int, torch.Tensor] = {}
        self.num_layers = 0

    def install(self, model) -> "Controller":
        _register()
        layers = model.model.layers
        self.num_layers = len(layers)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            attn._misa_ctl = self
            attn._misa_layer = i
            if not getattr(attn, "_misa_hooked", False):
                attn.register_forward_pre_hook(_pre_hook, with_kwargs=True)
                attn._misa_hooked = True
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTN_NAME)
        else:   # older transformers
            model.config._attn_implementation = ATTN_NAME
        return self

    def reset(self) -> None:
        self.captured.clear()
        self._x.clear()

    # ---------------------------------------------------------------------------------------
    def attend(self, module, query, key, value, scaling):
        layer = module._misa_layer
        if query.shape[0] != 1:
            raise ValueError(f"input_ids: the misa attention takes one sequence at a time, got batch {query.shape[0]}")
        x = self._x.pop(layer, None)
        if layer in self.capture:
            self.captured[layer] = {"x": x[0].detach(), "q": query[0].detach(), "k": key[0].detach()}
        mask = self.sparse(layer, x[0], query[0], key[0]) if self.sparse is not None else None
        out = attention(query, key, value, scaling, mask)
        if self.stop_after is not None and layer >= self.stop_after:
            raise StopForward
        return out, None


def _pre_hook(module, args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    module._misa_ctl._x[module._misa_layer] = x
    return None


def attention(query, key, value, scaling, mask: torch.Tensor | None = None, chunk: int = 4096):
    """Causal attention ``[1, H, T, D]`` (GQA keys ``[1, Hkv, S, D]``) -> ``[1, T, H, D]``.

    ``mask [T, S]`` bool, when given, replaces the causal mask (it must itself be causal). Queries
    are processed in chunks so the masked path never builds more than ``[H, chunk, S]`` scores.
    """
    n_rep = query.shape[1] // key.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=n_rep > 1)
        return out.transpose(1, 2).contiguous()
    k = key.repeat_interleave(n_rep, dim=1)
    v = value.repeat_interleave(n_rep, dim=1)
    t = query.shape[2]
    outs = []
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        m = mask[t0:t1, :t1][None, None]
        outs.append(F.scaled_dot_product_attention(query[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1],
                                                   attn_mask=m, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, q_pos: torch.Tensor,
                    width: int | None = None) -> torch.Tensor:
    """The model's causal attention probabilities averaged over query heads (= summed, L1-normalised).

    ``q [H, Tq, D]`` at absolute positions ``q_pos [Tq]``, ``k [Hkv, S, D]`` (GQA: head ``h`` reads kv
    head ``h // (H / Hkv)``, as transformers' ``repeat_kv``). Returns ``[Tq, width or S]`` float32.
    """
    h, tq, d = q.shape
    hkv, s, _ = k.shape
    width = width or s
    n_rep = h // hkv
    scores = torch.matmul(q.reshape(hkv, n_rep * tq, d), k[:, :width].transpose(1, 2)).float()
    scores = scores.view(hkv, n_rep, tq, width).reshape(h, tq, width) * scaling
    cols = torch.arange(width, device=q.device)
    scores.masked_fill_(cols[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=0)


@torch.no_grad()
def run_layers(model, ids: torch.Tensor, ctl: Controller) -> None:
    """One forward of the decoder stack (no output head) that may end early at ``ctl.stop_after``."""
    try:
        model.model(input_ids=ids, use_cache=False)
    except StopForward:
        pass
