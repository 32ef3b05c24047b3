"""Sparse attention inside the model: each query of each layer attends only to the k tokens its
layer's selector picks (all query heads of the layer share the selection, as in DSA).

``SparseAttention(stack, method, k)`` is the ``sparse`` callback of ``hooks.Controller``: from the
layer's normalised input it builds the fp8 indexer inputs, selects through ``selectors.select``
(the library's public functions) and returns the ``[T, T]`` mask. Layers without a trained indexer
(and the ``dense`` method) keep full causal attention.
"""
from __future__ import annotations

import torch

from .indexer import IndexerStack
from .selectors import SelectorSettings, is_config_method, per_layer_config, select, selection_mask


class SparseAttention:
    def __init__(self, stack: IndexerStack | None, method: str, k: int,
                 settings: SelectorSettings = SelectorSettings()):
        if method != "dense" and method != "sink-window" and stack is None:
            raise ValueError(f"indexer: method {method!r} needs a trained indexer")
        self.stack, self.method, self.k, self.settings = stack, method, k, settings
        self.selected_layers = 0

    def __call__(self, layer: int, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        if self.method == "dense":
            return None
        t = x.shape[0]
        if t <= self.k:                      # every query keeps all its keys: plain causal attention
            return None
        ke = torch.arange(1, t + 1, device=x.device, dtype=torch.int32)
        ks = torch.zeros_like(ke)
        if self.method == "sink-window":
            from .selectors import window_select
            sel = window_select(ks, ke, self.k, self.settings.sink)
        else:
            if layer not in self.stack:
                return None
            inp = self.stack.inference_inputs(layer, x)
            if is_config_method(self.method):        # a calibrated config: this layer's own setting
                sel = per_layer_config(self.method).for_layer(layer).select(inp.q, inp.kv, inp.weights, ks, ke, self.k)
            else:
                g = torch.Generator().manual_seed(self.settings.seed * 1000 + layer)
                sel = select(self.method, inp, ks, ke, self.k, self.settings, generator=g)
        self.selected_layers += 1
        return selection_mask(sel, t)
