"""The Hopper Gluon kernel for routed scoring (misa/ops/dsa/gluon.py) against the float64
reference and the Triton kernel. Gluon has no CPU interpreter, so this file runs only on a Hopper
GPU; the CPU suite checks that the kernel compiles for sm_90 (tests/test_compile_hopper.py)."""
import pytest
import torch

from helpers import dsa_logits64, make_inputs

pytest.importorskip("triton")
if not (torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability()[0] == 9):
    pytest.skip("the Gluon kernel needs a Hopper GPU", allow_module_level=True)

from misa.ops.dsa import gluon as dsa_gluon          # noqa: E402
from misa.ops.dsa import triton as dsa_triton        # noqa: E402

FP8 = torch.float8_e4m3fn
RTOL = 5e-4            # Hopper's fp8 MMA accumulates in ~13 mantissa bits (tests/test_kernels.py)


def _heads(t, h, n, seed):
    g = torch.Generator().manual_seed(seed)
    heads = torch.sort(torch.stack([torch.randperm(h, generator=g)[:n] for _ in range(t)]), dim=1).values
    return heads.int().cuda()


def _check(got, ref, inside):
    """Inside each range: the reference's logits; outside: untouched (NaN) or -inf."""
    assert not got[inside].isnan().any()
    err = (got.double().cpu()[inside] - ref[inside]).abs().max() / ref[inside].abs().max().clamp_min(1e-12)
    assert float(err) < RTOL
    assert bool((got[~inside].isnan() | (got[~inside] == float("-inf"))).all())


LAUNCHERS = {
    "default": dsa_gluon.launch_routed_logits,
    "register stores, short items": lambda *a, **kw: dsa_gluon.launch_routed_logits(
        *a, config=(256, 64, 3, 5, False, 240), **kw),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("t,s,h,d,n", [(19, 301, 8, 64, 8), (333, 9000, 64, 128, 8), (700, 5000, 32, 128, 4),
                                       (257, 4100, 64, 128, 16), (1, 70, 64, 128, 8)])
@pytest.mark.parametrize("kind", ["causal", "ragged", "empty"])
@pytest.mark.parametrize("scaled", [True, False])
def test_gluon_routed_logits(launcher, t, s, h, d, n, kind, scaled):
    q, (k, k_scale), w, ks, ke = make_inputs(t, s, h, d, kind, seed=t + s + n, device="cuda")
    heads = _heads(t, h, n, seed=t)
    assert dsa_gluon.gluon_supported(q, k, heads)
    scale = k_scale if scaled else None
    out = torch.full((t, s), float("nan"), device="cuda")
    LAUNCHERS[launcher](q, w, k, scale, ks, ke, out, heads)
    ref = dsa_logits64(q, (k, scale if scaled else torch.ones_like(k_scale)), w, ks, ke, heads=heads.cpu())
    _check(out.cpu(), ref, torch.isfinite(ref))


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gluon_routed_logits_window_and_splits(launcher, aligned, splits):
    # an output window [col_offset, col_offset + W) in a view of a larger buffer, and any number
    # of programs per block of queries (a program may get no tile)
    t, s, h, d = 600, 7040, 64, 128
    q, (k, k_scale), w, ks, ke = make_inputs(t, s, h, d, "causal", seed=3, device="cuda")
    g = torch.Generator().manual_seed(4)
    col_offset = 48 if aligned else 37
    ks = torch.randint(0, 900, (t,), generator=g, dtype=torch.int32).cuda() + col_offset
    ks[0] = col_offset
    ke = torch.maximum(ke, ks)
    width = int(ke.max()) - col_offset
    pad = 16 if aligned else 3
    big = torch.full((t, width + 2 * pad + (-width % 16 if aligned else 0)), float("nan"), device="cuda")
    out = big[:, pad:pad + width]
    heads = _heads(t, h, 8, seed=5)
    LAUNCHERS[launcher](q, w, k, k_scale, ks, ke, out, heads, col_offset=col_offset, splits=splits)
    got = big.cpu()
    assert bool(got[:, :pad].isnan().all()) and bool(got[:, pad + width:].isnan().all())
    ref = dsa_logits64(q, (k, k_scale), w, ks, ke, heads=heads.cpu())[:, col_offset:]
    _check(got[:, pad:pad + width], ref, torch.isfinite(ref))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_gluon_matches_triton_kernel(launcher):
    # the same logits as the Triton kernel it replaces, to the MMA's rounding
    t, s, h, d = 1000, 20000, 64, 128
    q, (k, k_scale), w, ks, ke = make_inputs(t, s, h, d, "ragged", seed=9, device="cuda")
    heads = _heads(t, h, 8, seed=10)
    a = torch.full((t, s), float("nan"), device="cuda")
    b = torch.full((t, s), float("nan"), device="cuda")
    LAUNCHERS[launcher](q, w, k, k_scale, ks, ke, a, heads)
    dsa_triton.launch_logits(q, w, k, k_scale, ks, ke, b, heads=heads, config=dsa_triton.ROUTED_CONFIG)
    cols = torch.arange(s, device="cuda")
    inside = (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
    assert torch.allclose(a[inside], b[inside], rtol=1e-5, atol=1e-5 * float(b[inside].abs().max()))


def test_gluon_supported_only_for_routed_fp8_keys():
    q, (k, _), w, ks, ke = make_inputs(4, 64, 64, 128, "causal", seed=1, device="cuda")
    heads = _heads(4, 64, 8, seed=1)
    assert dsa_gluon.gluon_supported(q, k, heads)
    assert not dsa_gluon.gluon_supported(q, k, None)
    assert not dsa_gluon.gluon_supported(q, k.to(torch.bfloat16), heads)
    assert not dsa_gluon.gluon_supported(q, k, _heads(4, 64, 6, seed=1))
