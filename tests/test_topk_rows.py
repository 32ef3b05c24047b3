"""The one-launch top-k of short rows against the PyTorch reference, by value: random, ragged,
tied and -inf-holed rows, widths not powers of two, rows shorter than k."""
import pytest
import torch



pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(t, w, seed, ties=False, holes=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, w, generator=g)
    if ties:
        x = (x * 4).round()                        # many equal values, ties at the k-th
    if holes:
        x[torch.rand(t, w, generator=g) < 0.3] = float("-inf")
    ks = torch.randint(0, max(1, w // 3), (t,), generator=g).int()
    ke = torch.minimum(ks + torch.randint(0, w, (t,), generator=g).int(), torch.tensor(w)).int()
    ke[0], ks[1], ke[1] = w, 0, 0                  # a full row and an empty one
    return x.to(DEVICE), ks.to(DEVICE), ke.to(DEVICE)


@pytest.mark.parametrize("t,w,k", [(9, 300, 40), (5, 4096, 2048), (4, 2049, 64), (3, 16384, 1000), (6, 70, 100)])
@pytest.mark.parametrize("ties,holes", [(False, False), (True, False), (False, True)])
def test_short_rows_topk_by_value(t, w, k, ties, holes):
    from misa.ops.topk.triton_rows import short_rows_topk
    x, ks, ke = _rows(t, w, seed=w + k + 2 * ties + holes, ties=ties, holes=holes)
    out = torch.full((t, k), 7, dtype=torch.int32, device=DEVICE)
    short_rows_topk(x, ks, ke, k, out, finite_only=holes)
    scores = x.double().cpu()
    col = torch.arange(w)
    visible = (col[None, :] >= ks.cpu()[:, None].long()) & (col[None, :] < ke.cpu()[:, None].long())
    if holes:
        visible &= torch.isfinite(scores)
    # check_selection's range is [ks, ke): count and by-value checks over the eligible columns
    s64 = torch.where(visible, scores, torch.tensor(float("-inf"), dtype=torch.float64))
    for r in range(t):
        row = out[r].cpu()
        got = row[row >= 0]
        n = min(k, int(visible[r].sum()))
        assert got.numel() == n and (row[n:] == -1).all(), r
        assert len(set(got.tolist())) == n and bool(visible[r, got.long()].all())
        if n and n < int(visible[r].sum()):
            rest = visible[r].clone()
            rest[got.long()] = False
            assert float(s64[r, got.long()].min()) >= float(s64[r][rest].max())


def test_short_rows_topk_maps_through_cmap_and_offsets():
    from misa.ops.topk.triton_rows import short_rows_topk
    x, ks, ke = _rows(4, 500, seed=1)
    cmap = torch.randperm(10_000)[:2000].view(4, 500).int().to(DEVICE)
    out = torch.empty(4, 30, dtype=torch.int32, device=DEVICE)
    short_rows_topk(x, ks + 100, ke + 100, 30, out, ks_offset=100, cmap=cmap)
    plain = torch.empty_like(out)
    short_rows_topk(x, ks, ke, 30, plain, out_offset=5)
    for r in range(4):
        cols = plain[r][plain[r] >= 0].long() - 5
        assert set(out[r][out[r] >= 0].tolist()) == set(cmap[r, cols].tolist())


@pytest.mark.parametrize("holes", [False, True])
def test_short_rows_topk_reads_bfloat16_rows(holes):
    # bfloat16 rows, widened to float32 as they are read: the float32 kernel's pick on the same
    # values (the one-launch top-k takes ties in column order, so the same keys)
    from misa.ops.topk.triton_rows import short_rows_topk
    x, ks, ke = _rows(7, 700, seed=3 + holes, holes=holes)
    x = x.to(torch.bfloat16)                        # 8 significant bits: ties
    got = torch.empty(7, 60, dtype=torch.int32, device=DEVICE)
    short_rows_topk(x, ks, ke, 60, got, finite_only=holes)
    want = torch.empty_like(got)
    short_rows_topk(x.float(), ks, ke, 60, want, finite_only=holes)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="^x: the top-k takes float32 or bfloat16"):
        short_rows_topk(x.half(), ks, ke, 60, got)
