"""CUDA graphs for the checked decode functions (``misa.paged_*_select``). A checked call runs a
cached selector; issuing its launches one by one from Python costs more than the launches
themselves at decode sizes. So a call that repeats an earlier one's selector, input layouts and
cache addresses replays a graph of the selector instead: its inputs are copied into buffers the
graph reads, the graph replays, and the result is copied out. The first call at a layout runs
eagerly, the second captures. Graphs live on their selector (``selector.graphs``, up to
``GRAPHS_KEPT``: one per cache a model's layers call it with), so dropping a selector drops them.
``MISA_GRAPHS=0`` turns them off.

(The checked prefill functions issue their launches directly: they do not wait for the selection,
so the next call's launches overlap it, and copying their large inputs into a graph cost more.)
"""
from __future__ import annotations

import os

import torch

KEPT = 8            # selectors a cache keeps; the oldest goes first
# graphs a selector keeps: one per cache and layout, so a model whose layers each have their own
# cache replays in every layer (the graphs share their input buffers: ``misa.paged._graph``)
GRAPHS_KEPT = 512
_SEEN = object()    # a layout called once: the next call like it captures


def keep(cache: dict, key, value, limit: int = KEPT):
    """``cache[key] = value``, dropping the oldest entry when ``cache`` holds ``limit``."""
    if key not in cache and len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def enabled(x: torch.Tensor) -> bool:
    """Whether a checked call on ``x``'s device may capture or replay a graph."""
    return (x.is_cuda and os.environ.get("MISA_GRAPHS") != "0"
            and not torch.cuda.is_current_stream_capturing())


def layout(x, where: bool = False):
    """What a graph depends on: the shape, strides and dtype of a tensor copied in, and also the
    address of one it reads in place (``where``)."""
    if x is None:
        return None
    return (x.data_ptr() if where else None, tuple(x.shape), x.stride(), x.dtype)


class Graph:
    """``run()`` (launches only: no allocation, no host read) captured once, after one warm-up run
    on a side stream (it compiles any kernel the capture would need). ``inputs``: the buffers
    ``run`` reads, kept alive with the graph; ``replay`` copies a call's values into them."""

    def __init__(self, run, inputs):
        self.inputs = inputs
        # the buffers as bytes: a call's contiguous values go in with one copy launch, not one each
        self.input_bytes = [x.view(torch.uint8) for x in inputs] if all(
            x.is_contiguous() and x.dim() and x.numel() for x in inputs) else None
        device = torch.cuda.current_device()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run()

    def replay(self, *values) -> torch.Tensor:
        """Copies ``values`` into ``inputs`` (in order) and replays the graph; its output buffer
        (overwritten by the next replay). ``values`` have the shapes and dtypes of ``inputs``."""
        if self.input_bytes is not None and all(x.is_contiguous() for x in values):
            torch._foreach_copy_(self.input_bytes, [x.view(torch.uint8) for x in values])
        else:
            for buf, x in zip(self.inputs, values, strict=True):
                buf.copy_(x)
        self.graph.replay()
        return self.out


def made(selector, key):
    """The graph of ``selector`` for ``key`` if one has been made, else None (nothing recorded)."""
    entry = selector.__dict__.get("graphs", {}).get(key)
    return entry if isinstance(entry, Graph) else None


def lookup(selector, key, make):
    """The graph of ``selector`` for ``key``: made by ``make()`` on the second call with this key,
    None on the first (run eagerly) or when graphs are off for the selector."""
    graphs = selector.__dict__.setdefault("graphs", {})
    entry = graphs.get(key)
    if entry is _SEEN:
        entry = graphs[key] = make()
    if entry is None:
        keep(graphs, key, _SEEN, GRAPHS_KEPT)
    return entry
