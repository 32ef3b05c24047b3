"""A top-k prepared once for fixed rows and called many times (the selectors' plans): rows of at
most ``triton_rows.MAX_WIDTH`` columns in one launch, longer rows in the three launches of
``triton.TopkLaunches``, which read a long row once."""
from __future__ import annotations

import torch


class RowsTopkLaunch:
    """The one-launch top-k of short rows, with ``TopkLaunches``'s interface (``run()``, ``out``)."""

    def __init__(self, x, ks, ke, k, cmap=None, finite_only=False):
        self.args = (x, ks, ke, k)
        self.cmap, self.finite_only = cmap, finite_only
        self.out = torch.empty(x.shape[0], k, dtype=torch.int32, device=x.device)

    def run(self):
        from .triton_rows import short_rows_topk
        x, ks, ke, k = self.args
        short_rows_topk(x, ks, ke, k, self.out, cmap=self.cmap, finite_only=self.finite_only)


def topk_launch(x, ks, ke, k, **options):
    """The top-``k`` of ``x``'s rows inside ``[ks, ke)``, prepared: ``.run()`` writes ``.out``
    (``[rows, k]`` int32). Options as ``short_rows_topk`` takes them (``cmap``, ``finite_only``)."""
    from .triton import TopkLaunches
    from .triton_rows import MAX_WIDTH
    if x.shape[1] <= MAX_WIDTH:
        return RowsTopkLaunch(x, ks, ke, k, **options)
    return TopkLaunches(x, ks, ke, k, **options)
