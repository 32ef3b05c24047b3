"""The Walsh-Hadamard rotation DeepSeek-V3.2's indexer applies to q and k before fp8 quantisation.

``hadamard_transform(x) = x @ H_n * n^-0.5`` over the last dimension, ``H_n`` the Sylvester
Hadamard matrix (``H_2n = [[H_n, H_n], [H_n, -H_n]]``, the natural order that
``fast_hadamard_transform`` uses). It is orthogonal, so it leaves every ``q . k`` unchanged in exact
arithmetic; it spreads outliers over all coordinates so that one fp8 scale per vector loses less.

Why written here: the package the reference code imports (``fast-hadamard-transform``) is a CUDA
extension built from source, with no CPU path; ``hadamard-transform`` (PyPI, pure PyTorch) runs the
same butterfly but only on 1-D/2-D inputs and in the input's dtype (bf16 sums in bf16, where the
reference kernel accumulates in float32); ``scipy.linalg.hadamard`` builds the dense ``n x n``
matrix and would add scipy. Adapting any of them takes as many lines as the butterfly below.
"""
from __future__ import annotations

import torch

from ..validate import check_power_of_two, check_tensor


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``x @ H_n * scale`` over the last dim (``n`` a power of two; ``scale`` defaults to ``n^-0.5``).

    Computed in float32 and returned in ``x``'s dtype, as the CUDA kernel does for bfloat16.
    """
    check_tensor("x", x)
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating tensor, got {x.dtype}")
    n = check_power_of_two("x (last dimension)", x.shape[-1] if x.ndim else 0)
    y = x.float().reshape(-1, n)
    half = 1
    while half < n:
        # pairs (a, b) that sit `half` apart inside each group of 2 * half become (a + b, a - b)
        pairs = y.view(-1, n // (2 * half), 2, half)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2)
        half *= 2
    y = y.reshape(x.shape) * (n ** -0.5 if scale is None else scale)
    return y.to(x.dtype)
