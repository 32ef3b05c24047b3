"""Compile every kernel launch the library ships for Hopper (sm_90), without a GPU; run by
test_compile_hopper.py in a fresh process (the test session imports the kernels in interpreter mode).

The launches are the library's own: its entry points run on small CPU inputs (the model's 64 heads
of 128 dims, fp8 and bf16) with every kernel replaced by a recorder, so what compiles here is what
the shipped configs launch on the GPU (constexprs, warps, stages, register caps), with the
arguments specialised as Triton's JIT specialises them (16-divisible pointers and integers, integers
equal to 1 as constants). Each variant is named after the shipped config (``misa/ops/*/triton.py``)
it launches with; a launch no shipped config describes, a shipped config no entry point launches and
a kernel never launched are failures too.

    python tests/hopper_compile.py          # one line per variant; exit 1 on any failure
    python tests/hopper_compile.py --ptxas  # also each variant's registers and spills (ptxas -v)

Run with the GPU machine's Triton on the path to see its code: ``pip install --target DIR
triton==3.6.0``, then ``PYTHONPATH=DIR:. python tests/hopper_compile.py --ptxas``.
"""
import os
import subprocess
import sys
import tempfile
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET") != "1", "compiles real kernels: run without TRITON_INTERPRET"
import misa  # noqa: E402
from misa.ops.dsa import paged_triton, triton as dsa  # noqa: E402
from misa.ops.rescore import triton as rescore  # noqa: E402
from misa.ops.router import triton as router  # noqa: E402
from misa.ops.topk import triton as topk, triton_rows as topk_rows  # noqa: E402
from misa.ops.blocks import triton as blocks  # noqa: E402
from misa.ops.checks import triton as checks  # noqa: E402
from misa.ops.pool import triton as pool  # noqa: E402
from misa.ops.ties import triton as ties  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
MODULES = {"dsa": dsa, "paged": paged_triton, "rescore": rescore, "router": router, "topk": topk,
           "topk_rows": topk_rows, "blocks": blocks, "checks": checks, "pool": pool, "ties": ties}
TYPES = {torch.float8_e4m3fn: "fp8e4nv", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8"}
# each kernel's shipped configs ("module.NAME"), and the launch setting each of their fields becomes
# (fields that only size the grid are left out)
SHIPPED = {
    "_mqa_logits_kernel": (("dsa.DEFAULT_CONFIG", "dsa.ROUTED_CONFIG"),
                           {"bn": "BN", "num_warps": "num_warps", "num_stages": "num_stages", "store": "STORE"}),
    "_gather_logits_kernel": (("rescore.DEFAULT_CONFIG",),
                              {"bn": "BN", "num_warps": "num_warps", "num_stages": "num_stages", "maxnreg": "maxnreg"}),
    "_pool_keys_kernel": (("router.POOL_CONFIG",), {"chunk": "CHUNK", "num_warps": "num_warps"}),
    "_route_kernel": (("router.DEFAULT_CONFIG", "router.GAP_CONFIG"),
                      {"blocks": "NBT", "num_warps": "num_warps", "precision": "PRECISION", "num_stages": "num_stages"}),
    "_cut_kernel": (("topk.DEFAULT_CONFIG",), {"sample": "SAMPLE"}),
    "_compact_kernel": (("topk.COMPACT_CONFIG",), {"block": "BLOCK", "num_warps": "num_warps", "maxnreg": "maxnreg",
                                                "count_first": "COUNT_FIRST"}),
    "_select_kernel": (("topk.DEFAULT_CONFIG",), {"block": "BLOCK", "num_warps": "num_warps"}),
}
DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3, "maxnreg": None}      # Triton's, for launches that omit them


def kernels() -> dict:
    """Every kernel (a ``@triton.jit`` function named ``*_kernel``) the kernel modules define."""
    return {name: (mod, obj) for mod in MODULES.values() for name, obj in vars(mod).items()
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
            and obj.fn.__module__ == mod.__name__}


def shipped_config(name: str):
    mod, attr = name.split(".")
    return getattr(MODULES[mod], attr)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches: list, label: list):
        self.kernel, self.launches, self.label = kernel, launches, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs, self.label[0]))


def _inputs(t, s, kv, q_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, w = torch.randn(t, 64, 128, generator=g), torch.randn(t, 64, generator=g)
    if q_dtype == "fp8":
        q, w = misa.quantize_queries(q, w)
    else:
        q = q.to(torch.bfloat16)
    k = torch.randn(s, 128, generator=g)
    keys = misa.quantize_keys(k) if kv == "fp8" else k.to(torch.bfloat16)
    ke = torch.arange(s - t + 1, s + 1, dtype=torch.int32)
    return q, keys, w, torch.zeros(t, dtype=torch.int32), ke


def _paged(lens, next_n):
    g = torch.Generator().manual_seed(len(lens) + next_n)
    seqs = [misa.quantize_keys(torch.randn(n, 128, generator=g)) for n in lens]
    cache, table, clens = misa.build_paged_kcache(seqs, generator=g)
    q, w = misa.quantize_queries(torch.randn(len(lens) * next_n, 64, 128, generator=g),
                                 torch.randn(len(lens) * next_n, 64, generator=g))
    return q.view(len(lens), next_n, 64, 128), cache, w, clens, table


def entry_points():
    """(label, call) for what the library runs on the kernels: prefill (fp8, bf16 and mixed
    operands; float32 and bfloat16 logits; a key count off the 16-column grid too) and batched
    decode."""
    k, s = 2048, 16384                      # rows long enough for the top-k's sample and its bracket
    for kv, q_dtype in (("fp8", "fp8"), ("bf16", "bf16"), ("bf16", "fp8")):
        args = _inputs(64, s, kv, q_dtype)
        tag = f"q {q_dtype}, keys {kv}"
        yield f"dsa_logits {tag}", lambda a=args: misa.dsa_logits(*a)
        yield f"dsa_select {tag}", lambda a=args: misa.dsa_select(*a, k=k)
        yield f"misa_select {tag}", lambda a=args: misa.misa_select(*a, k=k)
        yield f"misa_select gap {tag}", lambda a=args: misa.misa_select(*a, k=k, router="gap")
        yield f"MISA-dagger {tag}", lambda a=args: misa.misa_select(*a, k=k, stage1_k=4 * k)
        bf16 = torch.bfloat16                 # bfloat16 logits rows: their store and the top-k reading them
        yield f"dsa_select bf16 logits {tag}", lambda a=args: misa.dsa_select(*a, k=k, logits_dtype=bf16)
        yield f"misa_select bf16 logits {tag}", lambda a=args: misa.misa_select(*a, k=k, logits_dtype=bf16)
        yield (f"MISA-dagger bf16 logits {tag}",
               lambda a=args: misa.misa_select(*a, k=k, stage1_k=4 * k, logits_dtype=bf16))
        yield f"hisa_select {tag}", lambda a=args: misa.hisa_select(*a, k=k)
        yield f"input checks {tag}", lambda a=args: checks.input_flags(*a[:1], *a[1], *a[2:], s) \
            if kv == "fp8" else checks.input_flags(a[0], a[1], None, *a[2:], s)
    odd = _inputs(64, s - 3, "fp8", "fp8")
    yield "dsa_logits, keys off the 16-column grid", lambda: misa.dsa_logits(*odd)
    yield "misa_select, keys off the 16-column grid", lambda: misa.misa_select(*odd, k=k)
    for next_n in (1, 2):
        args = _paged([3000, 9000, 700], next_n)
        yield f"paged_dsa_logits next_n={next_n}", lambda a=args: misa.paged_dsa_logits(*a)
        yield f"paged_dsa_select next_n={next_n}", lambda a=args: misa.paged_dsa_select(*a, k=k)
        for statistic in router.STATISTICS:
            yield (f"paged_misa_select {statistic} next_n={next_n}",
                   lambda a=args, r=statistic: misa.paged_misa_select(*a, k=k, router=r))
            yield (f"paged_route_heads {statistic} next_n={next_n}",      # blocks pooled from the raw cache
                   lambda a=args, r=statistic: misa.paged_route_heads(*a, router=r))
        pooled = misa.new_pooled_kcache(args[1].shape[0], 128)
        yield (f"paged_misa_select pooled next_n={next_n}",
               lambda a=args, p=pooled: misa.paged_misa_select(*a, k=k, pooled=p))
        keys = misa.quantize_keys(torch.randn(len(args[4]) * next_n, 128))
        slots = torch.arange(len(args[4]) * next_n) * 64 + 5
        yield (f"write_paged_kcache pooled next_n={next_n}",
               lambda a=args, p=pooled, ks=keys, sl=slots: misa.write_paged_kcache(a[1], sl, *ks, p))
        yield (f"paged MISA-dagger next_n={next_n}",
               lambda a=args: misa.paged_misa_select(*a, k=k, stage1_k=4 * k))
        for bs in (64, 128):
            yield (f"paged_hisa_select B={bs} next_n={next_n}",
                   lambda a=args, b=bs: misa.paged_hisa_select(*a, k=k, block_size=b, block_k=64))
        small = _paged([3000, 700, 1500, 2000], next_n)     # one program per sequence: top-m fused
        yield (f"paged_hisa_select fused top-m next_n={next_n}",
               lambda a=small: misa.paged_hisa_select(*a, k=512, block_size=64, block_k=16))
        yield (f"paged input checks next_n={next_n}",
               lambda a=args: checks.paged_flags(a[0], a[2], a[3], a[4], a[1].shape[0], 64))
        yield (f"paged input checks, clamping, next_n={next_n}",
               lambda a=args: checks.paged_flags(a[0], a[2], a[3].clone(), a[4].clone(), a[1].shape[0], 64,
                                                 sanitize=True))


def specialise(kernel, args, kwargs):
    """``(signature, constexprs, attrs, options)`` for ``triton.compile``, as the JIT derives them
    from a launch's arguments."""
    bound = dict(zip(kernel.arg_names, args))
    bound.update((key, v) for key, v in kwargs.items() if key in kernel.arg_names)
    options = {**DEFAULT_OPTIONS, **{key: v for key, v in kwargs.items() if key not in kernel.arg_names}}
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = bound[p.name]
        if p.is_constexpr or v is None or (type(v) is int and v == 1 and not p.do_not_specialize):
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(v) is bool:
            sig[p.name] = "u1"
        elif type(v) is int:
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(v) is float:
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, consts, attrs, options


def config_name(name: str, consts: dict, options: dict) -> str | None:
    """The shipped config a launch of kernel ``name`` runs with ("fixed" for kernels without one;
    None: no shipped config describes it)."""
    if name not in SHIPPED:
        return "fixed"
    names, fields = SHIPPED[name]
    launch = {**consts, **options}
    for config in names:
        cfg = shipped_config(config)
        if all(launch[key] == getattr(cfg, field) for field, key in fields.items()):
            return config
    return None


def variants():
    """The distinct launches of ``entry_points``: ``[(name, kernel, signature, constexprs, attrs,
    options)]``, and the problems found on the way (launches no shipped config describes, shipped
    configs or kernels never launched)."""
    launches, label = [], [""]
    found = kernels()
    real = {name: getattr(mod, name) for name, (mod, _) in found.items()}
    for name, (mod, kernel) in found.items():
        setattr(mod, name, Recorder(kernel, launches, label))
    # the kernels on CPU tensors: misa.select lets them through under TRITON_INTERPRET (read per call;
    # the kernels were compiled in, not interpreted, at import)
    os.environ.update(MISA_BACKEND="triton", TRITON_INTERPRET="1")
    try:
        for label[0], call in entry_points():
            call()
    finally:
        del os.environ["MISA_BACKEND"], os.environ["TRITON_INTERPRET"]
        for name, (mod, _) in found.items():
            setattr(mod, name, real[name])
    out, seen, used, problems = [], set(), set(), []
    for kernel, args, kwargs, where in launches:
        name = kernel.fn.__name__
        sig, consts, attrs, options = specialise(kernel, args, kwargs)
        key = (name, str(sorted(sig.items())), str(sorted(consts.items(), key=str)), str(sorted(attrs)),
               str(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        config = config_name(name, consts, options)
        if config is None:
            problems.append(f"{name} [{where}]: no shipped config launches {consts} {options}")
            continue
        used.add(config)
        shown = " ".join(f"{c}={v}" for c, v in consts.items() if kernel.params[kernel.arg_names.index(c)].is_constexpr)
        out.append((f"{name} {config} [{where}] {shown}", kernel, sig, consts, attrs, options))
    launched = {v[1].fn.__name__ for v in out}
    problems += [f"{name}: never launched by the entry points here" for name in found if name not in launched]
    problems += [f"{config}: shipped, never launched by the entry points here"
                 for config in sorted({c for names, _ in SHIPPED.values() for c in names} - used)]
    return out, problems


def compile_for_hopper(kernel, sig, consts, attrs, options):
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=HOPPER,
                          options=options)


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


def main() -> int:
    found, problems = variants()
    print(f"variants: {len(found)}")
    failed = 0
    for name, kernel, sig, consts, attrs, options in found:
        try:
            compiled = compile_for_hopper(kernel, sig, consts, attrs, options)
            print(f"ok   {name}" + (f": {ptxas_report(compiled)}" if "--ptxas" in sys.argv else ""), flush=True)
        except Exception:      # noqa: BLE001 - report every variant, then fail
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=1)}", flush=True)
    for p in problems:
        print(f"FAIL {p}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
