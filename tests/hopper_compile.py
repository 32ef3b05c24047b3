"""Compile every Triton kernel for Hopper (sm_90) without a GPU; run by test_compile_hopper.py
in a fresh process (the test session imports the kernels in interpreter mode).

    python tests/hopper_compile.py          # one line per kernel variant; exit 1 on any failure
    python tests/hopper_compile.py --ptxas  # also each variant's registers and spills (ptxas -v)

Pointers and strides are marked 16-divisible, as the JIT specialises them on the GPU (without
that, Triton does not pipeline the key loads and the code differs from what runs there). Run with
the GPU machine's Triton on the path to see its code: ``pip install --target DIR triton==3.6.0``,
then ``PYTHONPATH=DIR:. python tests/hopper_compile.py --ptxas``.
"""
import inspect
import os
import subprocess
import sys
import tempfile
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from misa.ops.dsa import paged_triton
from misa.ops.dsa import triton as dsa
from misa.ops.rescore import triton as misa_k
from misa.ops.router import triton as router
from misa.ops.topk import triton as topk

HOPPER = GPUTarget("cuda", 90, 32)
I32 = "i32"
FLOAT_SCALARS = {"sigmas": "fp32", "slack": "fp32", "bracket_sigmas": "fp32"}    # non-pointer arguments the kernels take as float


def compile_for_hopper(kernel, pointers: dict, consts: dict, num_warps=4, num_stages=3, maxnreg=None):
    """``pointers``: argument name -> element type; other non-constexpr arguments are i32;
    ``maxnreg``: the register cap the launch passes, if any."""
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        sig[name] = ("constexpr" if name in consts else "*" + pointers[name] if name in pointers
                     else FLOAT_SCALARS.get(name, I32))
        if name in pointers or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=HOPPER,
                          options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg})


def ptxas_report(compiled) -> str:
    """Registers and spills of a compiled kernel, from a ptxas that ships with Triton (some
    Triton versions need their newer ``ptxas-blackwell`` for their own PTX)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        for ptxas in ("ptxas", "ptxas-blackwell"):
            res = subprocess.run([os.path.join(bin_dir, ptxas), "-v", "--gpu-name", "sm_90a", src, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            if res.returncode == 0:
                break
    lines = [ln.split("info    : ")[-1].strip() for ln in res.stderr.splitlines() if "regist" in ln or "spill" in ln]
    return "; ".join(lines) or res.stderr.strip()[-300:]


def variants():
    ptrs = {"Q": "fp8e4nv", "W": "fp32", "HEADS": I32, "K": "fp8e4nv", "KSCALE": "fp32", "KS": I32, "KE": I32,
            "OUT": "fp32"}
    for heads in (64, 8):
        pairs, bn, warps, stages, head_major, fast = (dsa.DEFAULT_CONFIG if heads == 64 else dsa.ROUTED_CONFIG)[:6]
        for col_unit, store in ((16, 0), (1, 0), (16, 1), (16, 2), (16, 3)):
            consts = {"NH": heads, "D": 128, "BQ": pairs // heads, "BN": bn, "ROUTED": heads < 64,
                      "HAS_SCALE": True, "CAST": None, "HEAD_MAJOR": head_major, "FAST_TILES": fast,
                      "COL_UNIT": col_unit, "STORE": store}
            yield (f"logits heads={heads} col_unit={col_unit} store={store}", dsa._mqa_logits_kernel, ptrs,
                   consts, warps, stages)
    paged_ptrs = {"Q": "fp8e4nv", "W": "fp32", "HEADS": I32, "VALUES": "fp8e4nv", "SCALES": "fp32", "TABLE": I32,
                  "CTX": I32, "OUT": "fp32"}
    for heads, next_n in ((64, 1), (64, 2), (8, 1), (8, 4)):
        qb = 1 << (next_n - 1).bit_length()
        consts = {"N": next_n, "QB": qb, "NH": heads, "HS": max(heads, -(-16 // qb)), "D": 128, "PAGE": 64,
                  "ROUTED": heads < 64, "CAST": None}
        yield (f"paged decode logits heads={heads} next_n={next_n}", paged_triton._paged_logits_kernel,
               paged_ptrs, consts, 4, 3)
    block, warps, sample = topk.DEFAULT_CONFIG
    rows = {"X": "fp32", "SRC": "fp32", "KS": I32, "KE": I32, "CUT": I32, "COUNT": I32, "SCR_KEY": I32, "SCR_COL": I32, "BR": I32,
            "OUT": I32, "CMAP": I32}
    for chunk, from_src in sorted({(topk.SAMPLE_CHUNK, False), (16, False), (1, False), (1, True)}):
        yield (f"top-k cut chunk={chunk} from_src={from_src}", topk._cut_kernel, rows,
               {"SAMPLE": sample, "CHUNK": chunk, "WAYS": topk.WAYS, "FINITE_ONLY": False,
                "EARLY_EXIT": topk.EARLY_EXIT, "FROM_SRC": from_src}, 4, 3)
    c_block, c_warps, _ = topk.COMPACT_CONFIG
    yield "top-k compact", topk._compact_kernel, rows, {"BLOCK": c_block, "FINITE_ONLY": True}, c_warps, 3
    for has_cmap, bracket in ((False, topk.BRACKET), (True, topk.BRACKET), (False, 0)):
        yield (f"top-k select cmap={has_cmap} bracket={bracket}", topk._select_kernel, rows,
               {"BLOCK": block, "SBLOCK": topk.SCRATCH_BLOCK, "WAYS": topk.WAYS, "HAS_CMAP": has_cmap,
                "FINITE_ONLY": has_cmap, "EARLY_EXIT": topk.EARLY_EXIT, "BRACKET": bracket,
                "BRACKET_MIN": topk.BRACKET_MIN, "HOLD": topk.HOLD}, warps, 3, topk.SELECT_MAXNREG)
    yield ("router pooling", router._pool_keys_kernel, {"K": "fp8e4nv", "KSCALE": "fp32", "OUT": "fp32"},
           {"D": 128, "CHUNK": 64, "HAS_SCALE": True}, 4, 3)
    yield ("router paged pooling", router._paged_pool_keys_kernel,
           {"VALUES": "fp8e4nv", "SCALES": "fp32", "TABLE": I32, "CTX": I32, "OUT": "fp32"},
           {"D": 128, "PAGE": 64}, 4, 3)
    route_ptrs = {"Q": "fp8e4nv", "W": "fp32", "KBAR": "fp32", "KS": I32, "KE": I32, "CTX": I32, "HEADS": I32}
    # the defaults (head selection by rank), the other head selection, the other precision
    for statistic, config in (("abs-sum", router.DEFAULT_CONFIG), ("gap", router.GAP_CONFIG),
                              ("abs-sum", router.DEFAULT_CONFIG[:4] + ("iter",)),
                              ("abs-sum", router.DEFAULT_CONFIG[:3] + ("bf16x2", "rank"))):
        pairs, launch = router._launch_config(config, statistic)
        warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
        # prefill tiles pairs // H queries; decode at most next_n (1 or 2 here) per program
        for decode, bq in ((False, pairs // 64), (True, 1), (True, 2)):
            consts = {"H": 64, "D": 128, "BQ": bq, "ACTIVE": 8, "DECODE": decode, **launch}
            yield (f"router routing {statistic} {launch['PRECISION']} {'rank' if launch['RANK'] else 'iter'} "
                   f"{'decode' if decode else 'prefill'} BQ={bq}", router._route_kernel,
                   route_ptrs, consts, warps, stages)
    bn, warps, stages, cap = misa_k.DEFAULT_CONFIG
    for every, offsets32 in ((0, True), (4, True), (4, False)):
        yield (f"MISA-dagger gathered logits sample_every={every} offsets32={offsets32}", misa_k._gather_logits_kernel,
               {"Q": "fp8e4nv", "W": "fp32", "K": "fp8e4nv", "KSCALE": "fp32", "CAND": I32, "KS": I32, "KE": I32,
                "OUT": "fp32", "SMP": "fp32"},
               {"H": 64, "D": 128, "BN": bn, "HAS_SCALE": True, "CAST": None, "SAMPLE_EVERY": every,
                "OFFSETS32": offsets32}, warps, stages, cap)


def main() -> int:
    failed = 0
    for name, kernel, ptrs, consts, warps, stages, *cap in variants():
        try:
            compiled = compile_for_hopper(kernel, ptrs, consts, warps, stages, *cap)
            print(f"ok   {name}" + (f": {ptxas_report(compiled)}" if "--ptxas" in sys.argv else ""))
        except Exception:      # noqa: BLE001 - report every variant, then fail
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=1)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
