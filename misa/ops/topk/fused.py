"""Top-k fused into the logits kernel (opt-in: ``MISA_FUSED_TOPK=1``).

The unfused path writes every float32 score of a chunk (2 GB at 4096 x 131072) and the top-k's
compaction reads it all back to keep the few thousand per row at or above a sampled cut. Here the
cut comes first, from the scores of an evenly strided sample of the keys (1/64 of them, at most
``SAMPLE_MAX`` per row, scored by the same kernel on a strided view of the keys); then the logits
kernel moves each score at or above its row's cut straight into the top-k's scratch and stores
nothing else. Rows too short for a sample are stored whole, as before. A row whose cut missed
(fewer than k survivors, or more than the scratch holds) is re-scored and stored by a second
launch that skips every other block, and takes the top-k's general path. The selection is the
unfused path's: the same scores, the same select kernel (ties at the threshold in arrival order).
"""
from __future__ import annotations

import torch
import triton

from ..dsa.triton import COMPACT, REPAIR, launch_logits
from ..triton_common import INTERPRET
from . import triton as topk_kernels     # module attributes read per call: benchmarks tune them

# (sample stride at least, sampled keys per row at most, fewest sampled keys for a cut): the
# interpreter's tests use short rows
SAMPLE_STRIDE, SAMPLE_MAX, MIN_SAMPLE = (4, 256, 32) if INTERPRET else (64, 4096, 128)
# tile shape of the compacting launches (None: the logits kernel's default); its epilogue holds
# more registers than the plain store's (benchmarks/fused_stages.py --compact-configs)
COMPACT_CONFIG = None


def fused_logits_topk(q, w, k, k_scale, ks, ke, k_top: int, buf: torch.Tensor, lo: int,
                      heads=None, splits: int | None = None) -> torch.Tensor:
    """Top-``k_top`` absolute positions per query of ``launch_logits(q, w, k, k_scale, ks, ke,
    buf, lo, heads)``, without storing the scores of rows that have a cut. ``buf [T, W]`` f32
    covers keys ``[lo, lo + W)``. ``splits``: programs per query block along the keys (default:
    as ``launch_logits`` picks; tests force several, as a GPU with few query blocks does)."""
    t, width = buf.shape
    call = topk_kernels.TopkLaunches(buf, ks, ke, k_top, ks_offset=lo, out_offset=lo)
    call.kept = torch.empty_like(call.count)
    if t == 0:
        return call.out
    stride = max(SAMPLE_STRIDE, triton.cdiv(width, SAMPLE_MAX))
    # sampled keys are the positions i * stride; key s is visible to a row iff ks <= s < ke
    first, end = triton.cdiv(lo, stride), triton.cdiv(lo + width, stride)
    sample = torch.empty(t, max(end - first, 1), dtype=torch.float32, device=buf.device)
    ks_s, ke_s = (ks + stride - 1) // stride, (ke + stride - 1) // stride
    k_scale_s = k_scale[::stride].contiguous() if k_scale is not None else None
    launch_logits(q, w, k[::stride], k_scale_s, ks_s, ke_s, sample, first, heads=heads, splits=splits)
    topk_kernels._sample_cut_kernel[(t,)](
        sample, ks_s, ke_s, ks, ke, call.cut_keys, call.count, call.kept, sample.stride(0), first, k_top,
        NS=triton.next_power_of_2(SAMPLE_MAX), MIN_SAMPLE=MIN_SAMPLE, WAYS=topk_kernels.WAYS, num_warps=4)
    for mode in (COMPACT, REPAIR):
        launch_logits(q, w, k, k_scale, ks, ke, buf, lo, heads=heads, topk=call, mode=mode, splits=splits,
                      config=COMPACT_CONFIG)
    call.select()
    return call.out
