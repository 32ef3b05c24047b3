"""Pieces the Triton kernels of several operations share."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, read at import). The kernel
# logic is the same there; what the launches change is said where they decide it: bf16 widened to
# float32 (dsa.triton.mma_cast), a smaller top-k sample (topk.triton.DEFAULT_CONFIG), float32 router
# products (router.triton._launch_config), no inline-PTX stores (dsa.triton._PTX_OK).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def sm_count(t: torch.Tensor) -> int:
    """Multiprocessors of ``t``'s GPU (1 off the GPU): launches size their key splits by it."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 1


@triton.jit
def ordered_key(x):
    """float32 -> uint32 with the same order (-inf smallest)."""
    u = x.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) == 1, ~u, u | 0x80000000)
