"""Argument checks shared by every public function: one place, one message style.

Every failure is a ``ValueError`` whose message starts with the argument's name.

Checks of tensor values (NaN, ranges) are read back from the device together, once per call: each
separate ``bool(t.any())`` would stall the host until the GPU drains. The selections' inputs are
checked by ``misa.ops.checks`` (one launch on a GPU); other callers queue theirs on
``DeferredChecks``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .ops import power_of_two
from .quant import FP8

Q_DTYPES = (FP8, torch.bfloat16, torch.float32)
K_DTYPES = (torch.bfloat16, torch.float32)


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def check_tensor(name: str, x, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        _fail(name, f"expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        _fail(name, f"expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        _fail(name, f"expected dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {x.dtype}")
    return x


class DeferredChecks:
    """Value checks queued on the device and read back with one synchronisation; the first failing
    one (in the order queued) raises. ``extent`` queues values to read back in the same transfer."""

    def __init__(self):
        self._checks: list[tuple[str, str, torch.Tensor]] = []
        self._values: list[torch.Tensor] = []

    def add(self, name: str, msg: str, bad: torch.Tensor) -> None:
        self._checks.append((name, msg, bad.any()))

    def extent(self, value: torch.Tensor) -> None:
        self._values.append(value.reshape(()).to(torch.int64))

    def run(self) -> list[int]:
        """Raise the first failing check; return the queued values."""
        flags = [bad.to(torch.int64) for _, _, bad in self._checks]
        if not flags and not self._values:
            return []
        read = torch.stack(flags + self._values).tolist()         # the one synchronisation
        for (name, msg, _), bad in zip(self._checks, read):
            if bad:
                _fail(name, msg)
        return read[len(flags):]


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"expected an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(name, f"must be {bound}, got {value}")
    return value


LOGITS_DTYPES = (torch.float32, torch.bfloat16)     # the dtypes a prefill selection's logits rows can take
LOGITS_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in LOGITS_DTYPES}   # as configs and the CLI spell them


# The logits rows each variant stores unless told otherwise. MISA-dagger's first stage only picks
# candidates that all heads then re-score in float32: in bfloat16 its selection keeps 0.9995 of the
# float32 one and is faster (docs/benchmarks.md). DSA's and MISA's final top-k read the rows
# directly; in bfloat16 their ties are re-scored in float32 (misa.ops.ties), which keeps 0.9996 of
# the float32 selection, and they stay float32 (the gain is small: docs/benchmarks.md).
DEFAULT_LOGITS_DTYPES = {"misa-dagger": torch.bfloat16}


def check_logits_dtype(value) -> torch.dtype | None:
    """``logits_dtype``: None (the variant's default, ``logits_dtype_for``), ``torch.float32`` or
    ``torch.bfloat16``."""
    if value is not None and (not isinstance(value, torch.dtype) or value not in LOGITS_DTYPES):
        _fail("logits_dtype", f"expected torch.float32 or torch.bfloat16, got {value!r}")
    return value


def logits_dtype_for(variant: str, value=None) -> torch.dtype:
    """The logits dtype ``variant`` stores: ``value`` checked, or the variant's default for None."""
    value = check_logits_dtype(value)
    return DEFAULT_LOGITS_DTYPES.get(variant, torch.float32) if value is None else value


def check_power_of_two(name: str, value: int) -> int:
    check_int(name, value)
    if not power_of_two(value):
        _fail(name, f"must be a power of two, got {value}")
    return value


@dataclass(frozen=True)
class Inputs:
    """Validated indexer inputs (the tensors themselves, untouched)."""
    q: torch.Tensor            # [T, H, D]
    k: torch.Tensor            # [S, D]: fp8 with k_scale, or bf16/fp32 with k_scale None
    k_scale: torch.Tensor | None
    weights: torch.Tensor      # [T, H] float32
    ks: torch.Tensor           # [T] int32
    ke: torch.Tensor           # [T] int32
    extent: tuple[int, int] | None = None   # (min ks, max ke) when known, read back with the checks
    pending: "PendingChecks | None" = None   # value checks queued, not read back yet (check_inputs(defer=True))

    @property
    def num_queries(self) -> int:
        return self.q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_keys(self) -> int:
        return self.k.shape[0]


def check_kv(kv, head_dim: int | None, device: torch.device | None):
    """``(k, k_scale, name)`` after the dtype/shape/device checks (values: ``value_checks``)."""
    if isinstance(kv, (tuple, list)):
        if len(kv) != 2:
            _fail("kv", f"expected (k_fp8, k_scale), got a sequence of {len(kv)}")
        k, k_scale = kv
        check_tensor("kv[0] (k_fp8)", k, 2, (FP8,))
        check_tensor("kv[1] (k_scale)", k_scale, 1, (torch.float32,))
        if k_scale.shape[0] != k.shape[0]:
            _fail("kv[1] (k_scale)", f"expected [{k.shape[0]}] to match k_fp8, got {tuple(k_scale.shape)}")
        if k_scale.device != k.device:
            _fail("kv[1] (k_scale)", f"on {k_scale.device}, k_fp8 on {k.device}")
        name = "kv[0] (k_fp8)"
    else:
        k, k_scale = check_tensor("kv", kv, 2, K_DTYPES), None
        name = "kv"
    if head_dim is not None and k.shape[1] != head_dim:
        _fail(name, f"head dim {k.shape[1]} does not match q's {head_dim}")
    if device is not None and k.device != device:
        _fail(name, f"on {k.device}, q on {device}")
    return k, k_scale, name


def check_ranges(ks, ke, num_queries: int, num_keys: int, device: torch.device, checks: DeferredChecks | None) -> None:
    """Dtypes, shapes and devices now; the value checks queued on ``checks`` (if given)."""
    for name, x in (("ks", ks), ("ke", ke)):
        check_tensor(name, x, 1, (torch.int32,))
        if x.shape[0] != num_queries:
            _fail(name, f"expected [{num_queries}] (one per query), got {tuple(x.shape)}")
        if x.device != device:
            _fail(name, f"on {x.device}, q on {device}")
    if num_queries and checks is not None:
        checks.add("ks", "must be >= 0", ks < 0)
        checks.add("ks", "must be <= ke for every query", ks > ke)
        checks.add("ke", f"must be <= the number of keys ({num_keys})", ke > num_keys)


def value_checks(name: str, *args, read: bool = True):
    """``misa.ops.checks``' ``name`` (``input_flags`` or ``paged_flags``) on ``args`` (the first a
    tensor on the inputs' device), read back in one transfer: one launch on a GPU with Triton (the
    PyTorch ops took ~20 launches), the PyTorch reference otherwise or under ``MISA_BACKEND=reference``.
    ``read=False``: the device tensor of flags, queued and not read yet."""
    import os
    from .ops import kernels_available
    if args[0].is_cuda and os.environ.get("MISA_BACKEND") != "reference" and kernels_available():
        from .ops.checks import triton as checks
    else:
        from .ops import checks
    flags = getattr(checks, name)(*args)
    return flags.tolist() if read else flags                # the one synchronisation


def raise_first(flags, messages) -> None:
    """The ``ValueError`` of the first set flag, ``messages`` a ``(name, message)`` per flag."""
    for bad, (name, msg) in zip(flags, messages):
        if bad:
            _fail(name, msg)


class PendingChecks:
    """The input value checks of ``check_inputs(defer=True)``: launched by ``launch`` (where the
    caller wants them queued), read back (the one synchronisation) and raised by ``finish``, which
    returns the inputs' key extent."""

    def __init__(self, args: tuple, k_name: str, num_keys: int):
        self.args, self.k_name, self.num_keys = args, k_name, num_keys
        self.flags: torch.Tensor | None = None
        self.extent: tuple[int, int] | None = None
        self._host = self._copied = None

    def launch(self) -> torch.Tensor:
        """Queue the checks (once). On a GPU their flags are copied to the host right behind them,
        so ``finish`` waits for the checks only, not for the work queued after them."""
        if self.flags is None:
            self.flags = value_checks("input_flags", *self.args, read=False)
            if self.flags.is_cuda:
                self._host = self.flags.to("cpu", non_blocking=True)       # into pinned memory
                self._copied = torch.cuda.Event()
                self._copied.record()
        return self.flags

    def finish(self) -> tuple[int, int]:
        if self.extent is None:
            flags = self.launch()
            if self._copied is not None:
                self._copied.synchronize()                  # the one synchronisation
                flags = self._host
            *flags, lo, hi = flags.tolist()
            raise_first(flags, (("q", "contains NaN or infinite values"),
                                (self.k_name, "contains NaN or infinite values"),
                                ("kv[1] (k_scale)", "scales must be finite and > 0"),
                                ("weights", "contains NaN or infinite values"),
                                ("ks", "must be >= 0"),
                                ("ks", "must be <= ke for every query"),
                                ("ke", f"must be <= the number of keys ({self.num_keys})")))
            self.extent = (lo, hi)
        return self.extent


def check_inputs(q, kv, weights, ks, ke, defer: bool = False) -> Inputs:
    """Shapes, dtypes and devices now; the value checks in one launch, read back now, or with
    ``defer`` left to ``Inputs.pending`` (the caller launches them, ``finish_checks`` reads them
    back and raises), so that a caller whose kernels are safe on any values can queue its work
    before the read-back."""
    check_tensor("q", q, 3, Q_DTYPES)
    t, h, d = q.shape
    if h < 1 or d < 1:
        _fail("q", f"needs at least one head and one dim, got shape {tuple(q.shape)}")
    k, k_scale, k_name = check_kv(kv, d, q.device)
    check_tensor("weights", weights, 2, (torch.float32,))
    if tuple(weights.shape) != (t, h):
        _fail("weights", f"expected shape {(t, h)}, got {tuple(weights.shape)}")
    if weights.device != q.device:
        _fail("weights", f"on {weights.device}, q on {q.device}")
    check_ranges(ks, ke, t, k.shape[0], q.device, None)
    pending = PendingChecks((q, k, k_scale, weights, ks, ke, k.shape[0]), k_name, k.shape[0])
    inp = Inputs(q, k, k_scale, weights, ks, ke, pending=pending)
    return inp if defer else finish_checks(inp)


def finish_checks(inp: Inputs) -> Inputs:
    """``inp`` with its deferred value checks read back and raised (a no-op without any)."""
    if inp.pending is None:
        return inp
    extent = inp.pending.finish()
    return replace(inp, extent=extent if inp.num_queries else None, pending=None)


def check_hisa_budget(k: int, block_size: int, block_k: int) -> int:
    """HISA keeps ``block_k`` blocks of ``block_size`` tokens: fewer than ``k`` tokens could not
    fill a selection of ``k`` (SPEC: exactly ``min(k, ke - ks)`` per row)."""
    check_int("block_k", block_k, 2)
    if block_k * block_size < k:
        _fail("block_k", f"block_k * block_size ({block_k} * {block_size} = {block_k * block_size}) "
                         f"must be >= k ({k})")
    return block_k


def check_stage1_k(stage1_k, k: int):
    if stage1_k is None:
        return None
    check_int("stage1_k", stage1_k)
    if stage1_k < k:
        _fail("stage1_k", f"must be >= k ({k}), got {stage1_k}")
    return stage1_k
