import pytest
import torch

from misa.nn.ranges import pad_with_hidden, ranges_from_visible, visible_from_mask


def test_ranges_of_causal_left_padded_mask():
    vis = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    vis[1, :, :2] = False                               # two padding tokens in sequence 1
    ks, ke = ranges_from_visible(vis)
    assert ks.tolist() == [[0] * 5, [0, 0, 2, 2, 2]]    # rows that see nothing get [0, 0)
    assert ke.tolist() == [[1, 2, 3, 4, 5], [0, 0, 3, 4, 5]]


def test_non_contiguous_visibility_is_refused():
    vis = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="^attention_mask:"):
        ranges_from_visible(vis)


def test_additive_masks():
    lowest = torch.finfo(torch.float32).min
    mask = torch.tensor([[0.0, lowest, float("-inf")]])
    assert visible_from_mask(mask).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="^attention_mask:"):
        visible_from_mask(torch.tensor([[0.0, -1.5]]))    # a bias, not a mask


def test_padding_takes_hidden_positions():
    ks = torch.tensor([0, 3, 5, 2])
    ke = torch.tensor([2, 6, 5, 8])
    sel = torch.tensor([[1, 0, -1, -1], [4, 3, 5, -1], [-1, -1, -1, -1], [2, 7, 4, 5]], dtype=torch.int32)
    out = pad_with_hidden(sel, ks, ke, num_keys=8)
    assert out.dtype == torch.int32
    for row, orig, lo, hi in zip(out.tolist(), sel.tolist(), ks.tolist(), ke.tolist()):
        kept = [i for i in orig if i >= 0]
        assert row[:len(kept)] == kept
        assert all(not lo <= i < hi for i in row[len(kept):])
        assert len(set(row)) == len(row) and all(0 <= i < 8 for i in row)
    with pytest.raises(ValueError, match="^selected:"):
        pad_with_hidden(sel, ks, ke, num_keys=3)
