"""Between a model's attention mask and the library's ``[ks, ke)`` ranges, and back.

Models hand their indexer a mask (boolean, or additive with 0 / -inf or the dtype's lowest value);
the library wants one contiguous visible range per query. Models also expect exactly
``min(index_topk, num_keys)`` indices per query, where the library pads with -1: the padding slots are
filled with positions the mask hides, which is what ``torch.topk`` over masked scores returns there
and which the model's own mask then removes again.
"""
from __future__ import annotations

import torch


def visible_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of a boolean or additive mask; additive values must be 0 (visible) or
    hidden (-inf or at most half the dtype's lowest value): the indexer cannot honour a bias."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask: expected bool or floating, got {mask.dtype}")
    visible = mask == 0
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((visible | hidden).all()):
        raise ValueError("attention_mask: additive values other than 0 and -inf/lowest (a bias) "
                         "cannot be reproduced by a token selector")
    return visible


def ranges_from_visible(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``visible [..., S, T]`` bool -> ``ks, ke [..., S]`` int32 with row ``i`` visible exactly on
    ``[ks, ke)``; a row that is not one contiguous run raises ``ValueError``. Empty rows get 0, 0."""
    count = visible.sum(-1)
    width = visible.shape[-1]
    first = visible.int().argmax(-1)
    last = width - 1 - visible.flip(-1).int().argmax(-1)
    nonempty = count > 0
    if bool((nonempty & (last - first + 1 != count)).any()):
        raise ValueError("attention_mask: a query's visible keys are not one contiguous range "
                         "(MISA selects inside [ks, ke) ranges)")
    ks = torch.where(nonempty, first, torch.zeros_like(first))
    return ks.int(), (ks + count).int()


def pad_with_hidden(selected: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, num_keys: int
                    ) -> torch.Tensor:
    """Replace the trailing -1 of ``selected [R, k]`` (``k <= num_keys``) by positions outside
    ``[ks, ke)``: ``ke, ke + 1, ...`` up to ``num_keys``, then ``0, 1, ...``. There are always enough."""
    k = selected.shape[-1]
    if k > num_keys:
        raise ValueError(f"selected: {k} indices per query but only {num_keys} keys")
    kept = (selected >= 0).sum(-1, keepdim=True)
    slot = torch.arange(k, device=selected.device)[None, :] - kept        # i-th padding slot
    ke = ke.long()[:, None]
    hidden = torch.where(ke + slot < num_keys, ke + slot, slot - (num_keys - ke))
    return torch.where(selected >= 0, selected.long(), hidden).to(selected.dtype)
