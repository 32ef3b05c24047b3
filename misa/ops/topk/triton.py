"""Triton top-k: the ``k`` largest columns of each row inside its ``[ks, ke)`` range.

One program per row; floats are mapped to order-preserving uint32 keys. Rows are float32 or
bfloat16 (widened exactly to float32 as they are read; the cut's ``sample=`` stays float32).

Fast path (rows of at least ``2 * SAMPLE`` columns), three launches: (1) a spread-out sample of
``SAMPLE`` columns is held in registers (read from the row, or from ``sample=`` values its
producer computed beside it) and a sample quantile safely below the k-th value (expected rank
plus ``CUT_SIGMAS`` standard deviations) becomes the row's cut; (2) several programs per row
stream it once and move every element at or above the cut into a scratch buffer (slots handed out
by an atomic counter); (3) one program per row finds the k-th largest key of the scratch and writes
the winners. A long row is read once (plus a sample), whatever k is. Ties at the threshold are then
broken in arrival order (SPEC allows either way) and fill a row's last slots; ``record_ties`` also
writes down the whole class of keys equal to the k-th (``TIE_CAP`` of them at most) so that a later
pass can break the tie by a finer score (``misa.ops.ties``: bfloat16 logits rescored in float32).

Both quantiles (of the sample and of the scratch) are found by a ``WAYS``-ary search on the key
range actually present ([cut, max]), each pass counting the keys at or above ``WAYS`` thresholds
(4 compares per key), where an 8-bit histogram round costs one operation per bin and element
(``tl.histogram`` on the GPU) and four rounds are always needed. The search stops as soon as
exactly the wanted number of keys lie at or above its lower bound: those are the winners, and the
passes that would only close the gap below the k-th key are skipped (``EARLY_EXIT``). A large
scratch is not searched pass after pass: a sample of it brackets the k-th key, one pass moves the
keys inside the bracket aside (and writes those above it, winners whatever the search finds,
straight to the output), and the search and the final pass run over the bracket alone
(``BRACKET``).

General path (short rows, or when the cut misses: fewer than k or more than the scratch above
it): a histogram of the top 8 key bits over the row finds the bin holding the k-th value; while
that bin is larger than the scratch, further 8-bit rounds run over the row; then one pass writes
every element above the bin and moves the bin into the scratch for the remaining rounds.

On the general path ties go to the lowest columns. Output order within a row is unspecified; rows
with fewer than ``k`` eligible columns are padded with -1. (Triton's ``tl.histogram`` costs about
one operation per bin and element on the GPU, so digits stay at 8 bits.)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import power_of_two
from ..triton_common import INTERPRET, ordered_key as _ordered_key
from ...validate import LOGITS_DTYPES


class TopkConfig(NamedTuple):
    """The select's launch and the cut's sample."""
    block: int = 1024           # row elements per step of the general path
    num_warps: int = 4          # of the select
    sample: int = 2048          # columns in the cut's sample (rows of fewer than twice this take the general path)


class CompactConfig(NamedTuple):
    """The compaction's launch."""
    block: int = 256            # columns per step
    num_warps: int = 1
    steps: int = 16             # steps per program: a row takes width / (steps * block) programs (1 to 256)
    maxnreg: int | None = 64    # register cap (ptxas .maxnreg); None: the compiler's choice
    # one atomic per program (count the span's survivors, then read the span again to write them)
    # instead of one per step; a sweep option (benchmarks/topk_compare.py), off in the shipped config
    count_first: bool = False


# Four warps: one warp was slightly faster at k = 2048 but slower at k = 8192 (whole top-k 3.67 ms
# against 2.59 at 128K, H200) and ~4x slower on the general path. The interpreter is slow: CI runs
# the same code with a smaller sample (rows of 512 columns and more still take the fast path).
DEFAULT_CONFIG = TopkConfig(sample=256) if INTERPRET else TopkConfig()
# Thresholds per pass of the quantile searches. Compares per key grow as WAYS * bits / log2(WAYS):
# 2 and 4 ways tie, and 2 needs twice the passes, each a chain of block-wide reductions (8 ways:
# 2.27 ms against 2.17 for the whole top-k at k = 2048 of 128K, H200).
WAYS = 4
# The cut's sample: runs of SAMPLE_CHUNK adjacent columns spread over the row. Single columns give
# fewer and steadier survivors than runs (benchmarks/cut_simulation.py); runs of 4 missed the cut
# on a few rows of DSA's logits at 64K keys, whose general path cost more than the runs saved.
SAMPLE_CHUNK = 1
# scratch entries per step of the select's passes, and the size of its sample of the scratch
SCRATCH_BLOCK = 1024
# One warp per compaction program: no cross-warp reductions or barriers around each step's atomic,
# and many programs per SM (whole top-k 1.48 ms against 1.72 for 1024 x 4 warps x 8 steps, 4096 x
# 128K, k = 2048, H200). Capped at 64 registers, 32 programs fit an SM: bfloat16 rows 0.59 ms
# against 0.62 uncapped, float32 unchanged (MISA's 4096 x 128K logits, H100). bfloat16 rows read
# at ~1.8 TB/s against float32's 2.7: wider steps (512 columns, one or two warps) and a load of the
# next step issued before each atomic were all slower (0.70-0.76 ms).
COMPACT_CONFIG = CompactConfig()
CUT_WARPS = 4                   # 1 or 2 made no difference
# The cut sits CUT_SIGMAS binomial standard deviations plus CUT_SLACK above the k-th value's
# expected rank in the sample (at k = 2048 of 128K: 32 + 3 * 5.7 + 17 = 66 sampled keys), so a
# missed cut needs a 6-sigma count; more margin only adds survivors (4 sigmas: 1.50 ms against 1.46).
CUT_SIGMAS = 3.0
CUT_SLACK = 17.0
# Stop a search once exactly the wanted number of keys lie at or above its lower bound: they are the
# winners, and the remaining passes would only close the gap below the k-th key (whole top-k 2.07
# ms against 2.48 at k = 8192 of 128K, H200).
EARLY_EXIT = True
# The select's bracket: room for the scratch keys between two quantiles of a sample of the scratch,
# BRACKET_SIGMAS binomial deviations (plus 2) either side of the k-th key's expected rank (~500 keys
# at k = 2048 of 128K, ~1300 at k = 8192). The search then runs held in registers (select 0.63 ms
# against 0.94 at k = 8192, H200). A scratch under BRACKET_MIN (MISA-dagger's second stage keeps
# ~2.4k) was slower with it. 0: no bracket.
BRACKET = 2048
BRACKET_SIGMAS = 4.0
BRACKET_MIN = 3 * SCRATCH_BLOCK
# A scratch of at most HOLD keys that took no bracket is held in registers for the search, read
# once instead of once per pass (select 0.164 ms against 0.225 on MISA-dagger's second stage: 8192
# columns, k = 2048, H200). 0: never.
HOLD = 4096
# The select's register cap (ptxas .maxnreg); uncapped it takes 120-195 registers, two to four
# programs per SM. 96 registers: five programs per SM; 80 spills more (select 0.42 vs 0.45 ms at
# k = 8192 of 128K, H200).
SELECT_MAXNREG = 96
# bfloat16 rows: the select's searches stop once their range holds one bfloat16 value, instead of
# narrowing the 16 low key bits every such value shares (with ties at the k-th value, the early exit
# rarely fires and they ran to the last bit)
BF16_GRAIN = True
# ``record_ties``: the class of keys equal to a row's k-th key that is written down, at most (a
# bfloat16 row of MISA's logits at 4096 x 128K, k = 2048, ties ~30 keys at its 2048th value)
TIE_CAP = 256
# a row's record: the class (output values), its size, the ties taken, then room for as many scores
# (``misa.ops.ties`` keeps the class's float32 scores there)
TIE_WIDTH = 2 * TIE_CAP + 2


def check_rows(name: str, x: torch.Tensor) -> None:
    """A top-k's rows are float32 or bfloat16: the logits dtypes (bf16 widened exactly)."""
    if x.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{name}: the top-k takes float32 or bfloat16 rows, got {x.dtype}")


def sample_step(width: int, config: TopkConfig | None = None) -> int:
    """The column step of a ``topk`` sample for rows ``width`` wide: about the cut's sample size
    of columns per row."""
    return max(1, width // (config or DEFAULT_CONFIG).sample)


def workspace_bytes(k: int, width: int) -> int:
    """Device memory a ``topk`` call takes per row beyond its output: the scratch and the select's
    bracket (keys and columns each)."""
    return 8 * scratch_size(k, width) + 8 * BRACKET


def scratch_size(k: int, width: int) -> int:
    """Scratch entries per row: room for the fast path's candidates (~2.2 k at k = 2048 of 128K
    with the default sample, and a wide margin), and for the general path's threshold bin."""
    return max(1, min(width, 4 * k + 4096))


@triton.jit
def _position(c, cmap_row, out_offset, HAS_CMAP: tl.constexpr, mask):
    if HAS_CMAP:
        return tl.load(cmap_row + c, mask=mask, other=-1)
    return c + out_offset


@triton.jit
def _eligible_keys(x_row, c, ke, FINITE_ONLY: tl.constexpr):
    m = c < ke
    # bfloat16 rows widen exactly to float32, whose keys order them
    x = tl.load(x_row + c, mask=m, other=0.0).to(tl.float32)
    if FINITE_ONLY:
        m = m & (x > float("-inf"))
    return _ordered_key(x), m


@triton.jit
def _threshold_digit(hist, bins, k_rem):
    """In a histogram of one digit: the digit holding the ``k_rem``-th largest element, the count
    strictly above it and the count in it."""
    rc = tl.cumsum(hist, axis=0, reverse=True)              # elements at or above each digit
    digit = tl.sum((rc >= k_rem).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(bins > digit, hist, 0), axis=0)
    inside = tl.sum(tl.where(bins == digit, hist, 0), axis=0)
    return digit, above, inside


@triton.jit
def _refine_round(src, start, end, lane, shift, prefix, bins, k_rem, FROM_SCRATCH: tl.constexpr,
                  FINITE_ONLY: tl.constexpr):
    """One 8-bit radix round below ``shift`` among the keys whose bits above it equal ``prefix``:
    keys from a row's columns ``[start, end)`` (``src`` the row) or from scratch entries ``[start,
    end)`` (``src`` the row's scratch keys). Returns the narrowed (prefix, k_rem, count in bin)."""
    h = tl.zeros([256], dtype=tl.int32)
    for step in range(start, end, lane.shape[0]):
        j = step + lane
        if FROM_SCRATCH:
            m = j < end
            key = tl.load(src + j, mask=m, other=0).to(tl.uint32, bitcast=True)
        else:
            key, m = _eligible_keys(src, j, end, FINITE_ONLY)
        m = m & ((key >> shift) == prefix)
        h += tl.histogram(((key >> (shift - 8)) & 255).to(tl.int32), 256, mask=m)
    digit, above, cnt = _threshold_digit(h, bins, k_rem)
    return (prefix << 8) | digit.to(tl.uint32), k_rem - above, cnt


@triton.jit
def _count_at_least(key, m, lo, step, WAYS: tl.constexpr):
    """For the thresholds ``lo + j * step`` (j < WAYS): how many of ``key[m]`` are at or above each.
    Two thresholds share one int32 reduction as 16-bit fields (fewer than 65536 keys): the searches
    are chains of block-wide reductions, each paying its barriers whatever it carries (select 0.54
    -> 0.49 ms at k = 8192 of 128K, H200)."""
    tl.static_assert(key.shape[0] < 65536)
    j = tl.arange(0, WAYS)
    counts = tl.zeros([WAYS], dtype=tl.int32)
    for w in tl.static_range(0, WAYS, 2):
        pair = ((key >= lo + w * step) & m).to(tl.int32)
        if w + 1 < WAYS:
            pair += ((key >= lo + (w + 1) * step) & m).to(tl.int32) << 16
        total = tl.sum(pair, axis=0)
        counts = tl.where(j == w, total & 0xFFFF, counts)
        counts = tl.where(j == w + 1, total >> 16, counts)
    return counts


@triton.jit
def _count_at_least_2d(key, m, lo, step, WAYS: tl.constexpr):
    """As ``_count_at_least`` as one [n, WAYS] comparison: faster on short chunks of the scratch
    (the sample, held whole in registers, prefers one reduction per threshold)."""
    j = tl.arange(0, WAYS).to(tl.uint32)
    ge = (key[:, None] >= (lo + j * step)[None, :]) & m[:, None]
    return tl.sum(ge.to(tl.int32), axis=0)


@triton.jit
def _narrow(counts, lo, hi, above, step, need, WAYS: tl.constexpr):
    """One pass of the search for the largest key t in [lo, hi] with count(>= t) >= need, given
    count(>= lo) >= need and ``above`` = count(> hi). Returns the narrowed (lo, hi, above) and
    count(>= new lo)."""
    j = tl.arange(0, WAYS)
    valid = j.to(tl.uint32) * step <= hi - lo          # thresholds past hi do not exist
    ok = valid & (counts >= need)
    best = tl.max(tl.where(ok, j, 0), axis=0)           # j = 0 is lo itself, always ok
    nxt = best + 1
    has_next = tl.sum((valid & (j == nxt)).to(tl.int32), axis=0) > 0
    new_lo = lo + best.to(tl.uint32) * step
    new_hi = tl.where(has_next, new_lo + step - 1, hi)
    new_above = tl.where(has_next, tl.sum(tl.where(j == nxt, counts, 0), axis=0), above)
    at_lo = tl.sum(tl.where(j == best, counts, 0), axis=0)
    return new_lo, new_hi, new_above, at_lo


@triton.jit
def _search_step(hi, lo, WAYS: tl.constexpr):
    return (hi - lo) // WAYS + 1


@triton.jit
def _two_keys_fit(lo, hi, GRAIN: tl.constexpr):
    """Whether ``[lo, hi]`` can hold two distinct keys. Keys of bfloat16 values (``GRAIN`` = 16)
    differ in their top 16 bits, so a range within one such class holds one key at most."""
    return (hi >> GRAIN) > (lo >> GRAIN)


@triton.jit
def _onto_key(lo, hi, GRAIN: tl.constexpr):
    """A search's final ``lo``: once ``[lo, hi]`` lies within one class it holds that class's one key
    (count(>= lo) > count(> hi)), so ``lo`` moves onto it. A bfloat16 value's key has its low 16 bits
    clear when positive (top bit set), all set when negative. ``GRAIN`` = 0: ``lo`` as it is."""
    if GRAIN > 0:
        top = lo >> GRAIN
        low = tl.where((top >> (31 - GRAIN)) == 1, 0, (1 << GRAIN) - 1).to(tl.uint32)
        lo = tl.where(_two_keys_fit(lo, hi, GRAIN), lo, (top << GRAIN) | low)
    return lo


@triton.jit
def _search_held(key, m, lo, hi, above, at_lo, offset, need, stop_at, WAYS: tl.constexpr, GRAIN: tl.constexpr):
    """The search over keys held in registers (``key[m]``), plus ``offset`` keys known to lie above
    ``hi``: from count(>= lo) = ``at_lo`` and count(> hi) = ``above``, narrow to the largest t with
    count(>= t) >= ``need``, or stop once count(>= lo) == ``stop_at``. Returns (lo, above, at_lo)."""
    while _two_keys_fit(lo, hi, GRAIN) & (at_lo != stop_at):
        step = _search_step(hi, lo, WAYS)
        counts = _count_at_least(key, m, lo, step, WAYS) + offset
        lo, hi, above, at_lo = _narrow(counts, lo, hi, above, step, need, WAYS)
    return _onto_key(lo, hi, GRAIN), above, at_lo


@triton.jit
def _sample_quantile(key, need, WAYS: tl.constexpr, EARLY_EXIT: tl.constexpr, GRAIN: tl.constexpr):
    """A key t with exactly the keys of ``key`` at or above it that are at or above its
    ``need``-th largest (``need`` <= its size): that key itself, or, with ``EARLY_EXIT``, any t
    below it that no key lies between."""
    none = tl.zeros([], dtype=tl.int32)
    lo, _, _ = _search_held(key, tl.full(key.shape, 1, tl.int1), tl.min(key, axis=0), tl.max(key, axis=0), none,
                            none + key.shape[0], none, need, need if EARLY_EXIT else -1, WAYS, GRAIN)
    return lo


@triton.jit(do_not_specialize=["ks_offset", "K"])
def _cut_kernel(X, KS, KE, CUT, COUNT, SRC, stride_x, stride_src, src_step, ks_offset, K, sigmas, slack,
                SAMPLE: tl.constexpr, CHUNK: tl.constexpr, WAYS: tl.constexpr, FINITE_ONLY: tl.constexpr,
                EARLY_EXIT: tl.constexpr, FROM_SRC: tl.constexpr):
    """Per long row: a sample quantile safely below the k-th largest value (expected rank plus
    ``sigmas`` standard deviations). Short rows get no cut (the selection kernel takes them whole).
    ``FROM_SRC``: the sample comes from ``SRC``, whose column j holds the row's column
    ``j * src_step`` (computed beside the row by its producer), instead of from scattered loads
    of the row itself."""
    row = tl.program_id(0).to(tl.int64)
    ks = tl.load(KS + row) - ks_offset
    ke = tl.load(KE + row) - ks_offset
    n = ke - ks
    cut = tl.zeros([], dtype=tl.uint32)
    if (n >= 2 * SAMPLE) & ((n > K) | FINITE_ONLY):
        i = tl.arange(0, SAMPLE)
        if FROM_SRC:
            # the source columns inside [ks, ke), at most SAMPLE of them spread evenly
            j0 = tl.cdiv(ks, src_step)
            n_src = tl.cdiv(ke, src_step) - j0
            taken = tl.maximum(tl.minimum(n_src, SAMPLE), 1)
            pos = j0 + (i.to(tl.int64) * n_src // taken).to(tl.int32)
            sample = tl.load(SRC + row * stride_src + pos, mask=i < n_src, other=float("-inf"))
        else:
            taken = SAMPLE
            # CHUNK-wide runs of columns spread evenly over the row
            pos = ks + ((i // CHUNK).to(tl.int64) * n // (SAMPLE // CHUNK)).to(tl.int32) + i % CHUNK
            sample = tl.load(X + row * stride_x + pos, mask=pos < ke, other=float("-inf")).to(tl.float32)
        key = _ordered_key(sample)
        expect = (K * 1.0) * taken / (n * 1.0)
        need = tl.minimum((expect + sigmas * tl.sqrt(expect) + slack).to(tl.int32), taken)
        cut = _sample_quantile(key, need, WAYS, EARLY_EXIT, 0)
    tl.store(CUT + row, cut.to(tl.int32, bitcast=True))
    tl.store(COUNT + row, 0)


@triton.jit
def _store_survivors(key, keep, c, base, scr_key, scr_col, CAP):
    """A step's kept keys and columns into scratch slots ``base`` on; returns their number."""
    spos = base + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    ok = keep & (spos < CAP)
    tl.store(scr_key + spos, key.to(tl.int32, bitcast=True), mask=ok)
    tl.store(scr_col + spos, c, mask=ok)
    return tl.sum(keep.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["ks_offset", "CAP"])
def _compact_kernel(X, KS, KE, CUT, COUNT, SCR_KEY, SCR_COL, stride_x, stride_scr, ks_offset, CAP,
                    BLOCK: tl.constexpr, FINITE_ONLY: tl.constexpr, COUNT_FIRST: tl.constexpr):
    """Every element at or above its row's cut goes to the row's scratch; several programs share a
    row (a counter in memory hands out scratch slots), so the row streams at full bandwidth.
    ``COUNT_FIRST``: a program counts its span's survivors, takes their slots with one atomic and
    reads the span again (from L2) to write them, instead of waiting on an atomic every step."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    cut = tl.load(CUT + row).to(tl.uint32, bitcast=True)
    if cut != 0:
        ks = tl.load(KS + row) - ks_offset
        ke = tl.load(KE + row) - ks_offset
        per = tl.cdiv(tl.cdiv(ke - ks, n_parts), BLOCK) * BLOCK
        lo = ks + part * per
        hi = tl.minimum(lo + per, ke)
        lane = tl.arange(0, BLOCK)
        x_row = X + row * stride_x
        scr_key = SCR_KEY + row * stride_scr
        scr_col = SCR_COL + row * stride_scr
        if COUNT_FIRST:
            n = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(lo, hi, BLOCK):
                key, m = _eligible_keys(x_row, start + lane, hi, FINITE_ONLY)
                n += (m & (key >= cut)).to(tl.int32)
            total = tl.sum(n, axis=0)
            if total > 0:
                base = tl.atomic_add(COUNT + row, total, sem="relaxed")
                for start in range(lo, hi, BLOCK):
                    c = start + lane
                    key, m = _eligible_keys(x_row, c, hi, FINITE_ONLY)
                    base += _store_survivors(key, m & (key >= cut), c, base, scr_key, scr_col, CAP)
        else:
            for start in range(lo, hi, BLOCK):
                c = start + lane
                key, m = _eligible_keys(x_row, c, hi, FINITE_ONLY)
                keep = m & (key >= cut)
                n_keep = tl.sum(keep.to(tl.int32), axis=0)
                if n_keep > 0:
                    # relaxed: the slots only need to be distinct; the default acq_rel would also
                    # wait for this program's earlier scratch stores before every atomic (compaction
                    # 0.92 -> 0.82 ms at k = 8192 of 128K, H200)
                    base = tl.atomic_add(COUNT + row, n_keep, sem="relaxed")
                    _store_survivors(key, keep, c, base, scr_key, scr_col, CAP)


@triton.jit
def _bracket_bounds(scr_key, n_scr, K, bracket_sigmas, SBLOCK: tl.constexpr, WAYS: tl.constexpr,
                    EARLY_EXIT: tl.constexpr, GRAIN: tl.constexpr):
    """Keys ``t_lo <= t_hi`` bracketing the scratch's k-th largest, from a sample spread over it."""
    slane = tl.arange(0, SBLOCK)
    sj = slane * tl.maximum(n_scr // SBLOCK, 1)
    s_ok = sj < n_scr
    skey = tl.load(scr_key + sj, mask=s_ok, other=0).to(tl.uint32, bitcast=True)
    n_s = tl.sum(s_ok.to(tl.int32), axis=0)
    frac = K * 1.0 / n_scr
    rank = frac * n_s
    margin = bracket_sigmas * tl.sqrt(rank * (1.0 - frac)) + 2.0
    need_lo = tl.minimum((rank + margin).to(tl.int32) + 1, n_s)
    need_hi = (rank - margin).to(tl.int32)
    t_lo = _sample_quantile(skey, need_lo, WAYS, EARLY_EXIT, GRAIN)
    has_hi = need_hi >= 1
    t_hi = t_lo
    if has_hi:
        t_hi = _sample_quantile(skey, need_hi, WAYS, EARLY_EXIT, GRAIN)
    return t_lo, t_hi, has_hi


@triton.jit
def _bracket_pass(scr_key, scr_col, br_row, out_row, cmap_row, out_offset, n_scr, K, t_lo, t_hi, has_hi,
                  SBLOCK: tl.constexpr, BRACKET: tl.constexpr, HAS_CMAP: tl.constexpr):
    """One pass over the scratch: keys in ``[t_lo, t_hi)`` to the bracket, keys above it to the output."""
    slane = tl.arange(0, SBLOCK)
    n_hi = 0
    n_in = 0
    for start in range(0, n_scr, SBLOCK):
        j = start + slane
        key = tl.load(scr_key + j, mask=j < n_scr, other=0).to(tl.uint32, bitcast=True)
        ge_lo = (j < n_scr) & (key >= t_lo)
        # (tl.where: in the interpreter, & with a scalar bool gives a dtype masks reject)
        ge_hi = tl.where(has_hi, ge_lo & (key >= t_hi), False)
        inside = ge_lo & (ge_hi == 0)
        col = tl.load(scr_col + j, mask=ge_lo, other=0)
        # both ranks in one scan (16-bit fields; SBLOCK < 65536): the keys above the bracket are
        # winners whatever the search finds, so they go out now, and the final pass reads only
        # the bracket (its keys and columns, stored beside each other)
        r_scan = tl.cumsum(inside.to(tl.int32) + (ge_hi.to(tl.int32) << 16), axis=0)
        spos = n_in + (r_scan & 0xFFFF) - 1
        b_in = inside & (spos < BRACKET)
        tl.store(br_row + spos, key.to(tl.int32, bitcast=True), mask=b_in)
        tl.store(br_row + BRACKET + spos, col, mask=b_in)
        hpos = n_hi + (r_scan >> 16) - 1
        win = ge_hi & (hpos < K)
        tl.store(out_row + hpos, _position(col, cmap_row, out_offset, HAS_CMAP, win), mask=win)
        tot = tl.max(r_scan, axis=0)          # the scan's last entry
        n_in += tot & 0xFFFF
        n_hi += tot >> 16
    return n_hi, n_in


@triton.jit
def _search_bracket(br_row, n_in, n_hi, t_lo, t_hi, has_hi, K, stop_at, BRACKET: tl.constexpr,
                    WAYS: tl.constexpr, GRAIN: tl.constexpr):
    """The held search over the bracket's ``n_in`` keys, with ``n_hi`` more above them."""
    bj = tl.arange(0, BRACKET)
    b_ok = bj < n_in
    bkey = tl.load(br_row + bj, mask=b_ok, other=0).to(tl.uint32, bitcast=True)
    return _search_held(bkey, b_ok, t_lo, tl.where(has_hi, t_hi - 1, tl.max(bkey, axis=0)), n_hi, n_hi + n_in,
                        n_hi, K, stop_at, WAYS, GRAIN)


@triton.jit
def _search_hold(scr_key, n_scr, lo, K, stop_at, HOLD: tl.constexpr, WAYS: tl.constexpr, GRAIN: tl.constexpr):
    """The held search over a short scratch, loaded whole: read once instead of once per pass."""
    hj = tl.arange(0, HOLD)
    h_ok = hj < n_scr
    hkey = tl.load(scr_key + hj, mask=h_ok, other=0).to(tl.uint32, bitcast=True)
    zero = tl.zeros([], dtype=tl.int32)
    return _search_held(hkey, h_ok, lo, tl.max(hkey, axis=0), zero, n_scr, zero, K, stop_at, WAYS, GRAIN)


@triton.jit
def _search_scratch(scr_key, n_scr, lo, hi, above, at_lo, K, stop_at, SBLOCK: tl.constexpr, WAYS: tl.constexpr,
                    GRAIN: tl.constexpr):
    """The search over the key range [cut, max] of the scratch in memory, a pass per narrowing."""
    slane = tl.arange(0, SBLOCK)
    for start in range(0, n_scr, SBLOCK):
        j = start + slane
        key = tl.load(scr_key + j, mask=j < n_scr, other=0).to(tl.uint32, bitcast=True)
        hi = tl.maximum(hi, tl.max(key, axis=0))
    while _two_keys_fit(lo, hi, GRAIN) & (at_lo != stop_at):
        step = _search_step(hi, lo, WAYS)
        counts = tl.zeros([WAYS], dtype=tl.int32)
        for start in range(0, n_scr, SBLOCK):
            j = start + slane
            m = j < n_scr
            key = tl.load(scr_key + j, mask=m, other=0).to(tl.uint32, bitcast=True)
            counts += _count_at_least_2d(key, m, lo, step, WAYS)
        lo, hi, above, at_lo = _narrow(counts, lo, hi, above, step, K, WAYS)
    return _onto_key(lo, hi, GRAIN), above, at_lo


@triton.jit
def _row_histogram(x_row, ks, ke, BLOCK: tl.constexpr, FINITE_ONLY: tl.constexpr):
    """The general path's first histogram round: the top 8 key bits over the row's eligible columns."""
    lane = tl.arange(0, BLOCK)
    h = tl.zeros([256], dtype=tl.int32)
    for start in range(ks, ke, BLOCK):
        key, m = _eligible_keys(x_row, start + lane, ke, FINITE_ONLY)
        h += tl.histogram((key >> 24).to(tl.int32), 256, mask=m)
    return h


@triton.jit
def _write_all(x_row, out_row, cmap_row, out_offset, ks, ke, K, BLOCK: tl.constexpr, HAS_CMAP: tl.constexpr,
               FINITE_ONLY: tl.constexpr):
    """A row with at most k eligible columns: all of them, then -1 padding."""
    lane = tl.arange(0, BLOCK)
    n_out = 0
    for start in range(ks, ke, BLOCK):
        c = start + lane
        key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
        pos = n_out + tl.cumsum(m.to(tl.int32), axis=0) - 1
        tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, m), mask=m)
        n_out += tl.sum(m.to(tl.int32), axis=0)
    for start in range(n_out, K, BLOCK):
        j = start + lane
        tl.store(out_row + j, tl.full([BLOCK], -1, tl.int32), mask=j < K)


@triton.jit
def _split_at_bin(x_row, out_row, cmap_row, scr_key, scr_col, out_offset, ks, ke, shift, prefix, k_rem,
                  BLOCK: tl.constexpr, HAS_CMAP: tl.constexpr, FINITE_ONLY: tl.constexpr):
    """One pass over the row: the keys above the threshold bin to the output, the bin (or, all bits
    fixed, its first ``k_rem`` ties) to the scratch. Returns (written, moved)."""
    lane = tl.arange(0, BLOCK)
    n_out = 0
    n_scr = 0
    n_tie = 0
    for start in range(ks, ke, BLOCK):
        c = start + lane
        key, m = _eligible_keys(x_row, c, ke, FINITE_ONLY)
        top = key >> shift
        take = m & (top > prefix)
        match = m & (top == prefix)
        if shift == 0:
            rank = n_tie + tl.cumsum(match.to(tl.int32), axis=0)
            n_tie += tl.sum(match.to(tl.int32), axis=0)
            take = take | (match & (rank <= k_rem))
        else:
            spos = n_scr + tl.cumsum(match.to(tl.int32), axis=0) - 1
            tl.store(scr_key + spos, key.to(tl.int32, bitcast=True), mask=match)
            tl.store(scr_col + spos, c, mask=match)
            n_scr += tl.sum(match.to(tl.int32), axis=0)
        pos = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out_row + pos, _position(c, cmap_row, out_offset, HAS_CMAP, take), mask=take)
        n_out += tl.sum(take.to(tl.int32), axis=0)
    return n_out, n_scr


@triton.jit
def _write_winners(fin_key, fin_col, n_fin, out_row, out0, cmap_row, out_offset, prefix, k_rem, K, tie_row,
                   SBLOCK: tl.constexpr, HAS_CMAP: tl.constexpr, RECORD_TIES: tl.constexpr, TIE_CAP: tl.constexpr):
    """The final pass: every key above ``prefix`` from slot ``out0`` on, and its first ``k_rem``
    ties in the last ``k_rem`` slots. ``RECORD_TIES``: every tie's output value (the first
    ``TIE_CAP``), their number and ``k_rem`` into ``tie_row``."""
    slane = tl.arange(0, SBLOCK)
    n_tie = 0
    n_above = 0
    for start in range(0, n_fin, SBLOCK):
        j = start + slane
        m = j < n_fin
        key = tl.load(fin_key + j, mask=m, other=0).to(tl.uint32, bitcast=True)
        c = tl.load(fin_col + j, mask=m, other=0)
        tie = m & (key == prefix)
        # one scan and one reduction for both ranks (16-bit fields; SBLOCK < 65536)
        above = m & (key > prefix)
        packed = tie.to(tl.int32) + (above.to(tl.int32) << 16)
        scan = tl.cumsum(packed, axis=0)
        rank = n_tie + (scan & 0xFFFF)
        take = above | (tie & (rank <= k_rem))
        pos = tl.where(above, out0 + n_above + (scan >> 16) - 1, K - k_rem + rank - 1)
        tot = tl.sum(packed, axis=0)
        n_tie += tot & 0xFFFF
        n_above += tot >> 16
        val = _position(c, cmap_row, out_offset, HAS_CMAP, take | tie)
        tl.store(out_row + pos, val, mask=take)
        if RECORD_TIES:
            tl.store(tie_row + rank - 1, val, mask=tie & (rank <= TIE_CAP))
    if RECORD_TIES:
        tl.store(tie_row + TIE_CAP, n_tie)
        tl.store(tie_row + TIE_CAP + 1, k_rem)


@triton.jit(do_not_specialize=["ks_offset", "out_offset", "K", "CAP"])
def _select_kernel(X, KS, KE, OUT, CMAP, CUT, COUNT, SCR_KEY, SCR_COL, BR, TIES,
                   stride_x, stride_out, stride_cmap, stride_scr, stride_br, ks_offset, out_offset, K, CAP,
                   bracket_sigmas,
                   BLOCK: tl.constexpr, SBLOCK: tl.constexpr, WAYS: tl.constexpr,
                   HAS_CMAP: tl.constexpr, FINITE_ONLY: tl.constexpr, EARLY_EXIT: tl.constexpr,
                   BRACKET: tl.constexpr, BRACKET_MIN: tl.constexpr, HOLD: tl.constexpr, GRAIN: tl.constexpr,
                   RECORD_TIES: tl.constexpr, TIE_CAP: tl.constexpr, TIE_WIDTH: tl.constexpr):
    """Per row: the k-th largest key of its scratch (fast path) or of the row (general path), then
    the winners. ``GRAIN``: 16 for bfloat16 rows (their keys differ in the top 16 bits: a search
    stops there instead of narrowing bits every key shares), else 0."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    out_row = OUT + row * stride_out
    cmap_row = CMAP + row * stride_cmap
    scr_key = SCR_KEY + row * stride_scr
    scr_col = SCR_COL + row * stride_scr
    ks = tl.load(KS + row) - ks_offset
    ke = tl.load(KE + row) - ks_offset
    lane = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    n_out = 0
    k_rem = K
    prefix = tl.zeros([], dtype=tl.uint32)
    shift = 0
    n_scr = tl.load(COUNT + row)
    fast = (tl.load(CUT + row) != 0) & (n_scr >= K) & (n_scr <= CAP)
    # what the final pass reads (the scratch, or the select's bracket) and where its winners go
    fin_key = scr_key
    fin_col = scr_col
    n_fin = -1          # -1: the scratch's n_scr entries, its winners from n_out on
    fin_out = 0

    if fast:
        # the scratch holds every element at or above the cut, k of them at least: find its k-th
        # largest key, then write the winners
        lo = tl.load(CUT + row).to(tl.uint32, bitcast=True)
        hi = lo
        above = 0
        at_lo = n_scr
        # with EARLY_EXIT a search stops once exactly K keys lie at or above lo: they are the
        # winners (the last passes would only narrow the gap below the k-th key)
        stop_at = K if EARLY_EXIT else -1
        searched = 0
        if BRACKET > 0:
            if n_scr >= BRACKET_MIN:
                # a sample of the scratch brackets the k-th key, [t_lo, t_hi); one pass moves the few
                # keys inside it aside, where the search runs held in registers
                t_lo, t_hi, has_hi = _bracket_bounds(scr_key, n_scr, K, bracket_sigmas, SBLOCK, WAYS, EARLY_EXIT,
                                                           GRAIN)
                br_row = BR + row * stride_br
                n_hi, n_in = _bracket_pass(scr_key, scr_col, br_row, out_row, cmap_row, out_offset, n_scr, K,
                                           t_lo, t_hi, has_hi, SBLOCK, BRACKET, HAS_CMAP)
                if (n_hi < K) & (n_hi + n_in >= K) & (n_in <= BRACKET):
                    tl.debug_barrier()              # the bracket, written above, read back
                    lo, above, at_lo = _search_bracket(br_row, n_in, n_hi, t_lo, t_hi, has_hi, K, stop_at,
                                                       BRACKET, WAYS, GRAIN)
                    # the final pass then takes the bracket's winners, after the n_hi written above
                    fin_key = br_row
                    fin_col = br_row + BRACKET
                    n_fin = n_in
                    fin_out = n_hi
                    searched = 1
        if HOLD > 0:
            if (searched == 0) & (n_scr <= HOLD):
                # a short scratch (MISA-dagger's 8192-column rows keep ~2.4k)
                lo, above, at_lo = _search_hold(scr_key, n_scr, lo, K, stop_at, HOLD, WAYS, GRAIN)
                searched = 1
        if searched == 0:
            # no bracket (or the sample missed)
            lo, above, at_lo = _search_scratch(scr_key, n_scr, lo, hi, above, at_lo, K, stop_at, SBLOCK, WAYS,
                                                GRAIN)
        prefix = lo                 # the k-th largest key, or a key no winner lies below
        k_rem = K - above
        if at_lo == K:
            # every key at or above lo is a winner: all "above" prefix, no tie to break
            prefix = lo - 1
            k_rem = 0
    else:
        n_scr = 0
        h = _row_histogram(x_row, ks, ke, BLOCK, FINITE_ONLY)
        total = tl.sum(h, axis=0)
        if total <= K:
            _write_all(x_row, out_row, cmap_row, out_offset, ks, ke, K, BLOCK, HAS_CMAP, FINITE_ONLY)
        else:
            digit, above, cnt = _threshold_digit(h, bins, k_rem)
            k_rem -= above
            prefix = digit.to(tl.uint32)
            shift = 24
            # the threshold bin does not fit the scratch: refine over the whole row
            while (cnt > CAP) & (shift > 0):
                prefix, k_rem, cnt = _refine_round(x_row, ks, ke, lane, shift, prefix, bins, k_rem, False,
                                                   FINITE_ONLY)
                shift -= 8
            n_out, n_scr = _split_at_bin(x_row, out_row, cmap_row, scr_key, scr_col, out_offset, ks, ke, shift,
                                         prefix, k_rem, BLOCK, HAS_CMAP, FINITE_ONLY)

    # general path: remaining 8-bit rounds over the scratch
    if (fast == 0) & (shift > 0) & (n_scr > 0):
        while shift > 0:
            prefix, k_rem, cnt = _refine_round(scr_key, 0, n_scr, lane, shift, prefix, bins, k_rem, True,
                                               FINITE_ONLY)
            shift -= 8

    # both paths: the scratch's winners, every key above the k-th largest (``prefix``, all bits
    # fixed now) and its ties in arrival order up to ``k_rem``. (A general-path row whose rounds
    # ran over the row itself wrote everything already and left the scratch empty.)
    out0 = tl.where(n_fin < 0, n_out, fin_out)
    n_fin = tl.where(n_fin < 0, n_scr, n_fin)
    # (a bracket that missed may have written winners already: their slots are written again
    # below, after the barrier)
    tl.debug_barrier()
    _write_winners(fin_key, fin_col, n_fin, out_row, out0, cmap_row, out_offset, prefix, k_rem, K,
                   TIES + row * TIE_WIDTH, SBLOCK, HAS_CMAP, RECORD_TIES, TIE_CAP)


def topk(x: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int, ks_offset: int = 0,
         out_offset: int = 0, cmap: torch.Tensor | None = None, finite_only: bool = False,
         config: TopkConfig | None = None,
         sample: tuple[torch.Tensor, int] | None = None, out: torch.Tensor | None = None,
         buffers: "TopkBuffers | None" = None, record_ties: bool = False) -> torch.Tensor:
    """Top-``k`` columns of ``x [T, W]`` f32 or bf16 per row, among columns ``[ks - ks_offset, ke - ks_offset)``.

    Returns ``[T, k]`` int32: ``cmap[row, col]`` when ``cmap`` is given, else ``col + out_offset``;
    -1 padded. ``finite_only`` also skips -inf entries (candidate lists with holes). ``config``: a
    ``TopkConfig`` (None: ``DEFAULT_CONFIG``). ``sample``: ``(values, step)`` with ``values
    [T, >= ceil(W / step)]`` f32 holding ``x[:, j * step]`` in column j (``sample_step`` picks the
    step), which the producer of ``x`` computes cheaply beside it (the cut then reads a small
    contiguous buffer instead of thousands of scattered sectors per row). The sample only steers
    the speed: any values give the same selection. ``out`` (``[T, k]`` int32, unit column stride)
    and ``buffers`` (``TopkWorkspace.buffers``): written into instead of allocated, so the call
    allocates nothing (``misa.PrefillSelector``). ``record_ties``: each row's ties at its k-th
    value, which fill its last slots, are written down in ``buffers.ties`` (``[T, TIE_WIDTH]``: the
    class's output values, up to ``TIE_CAP``, then its size and the ties taken, then scratch for
    ``break_ties``; nothing to break where the size is 0 or at most the ties taken) for
    ``misa.ops.ties.break_ties``.
    """
    call = TopkLaunches(x, ks, ke, k, ks_offset, out_offset, cmap, finite_only, config, sample, out=out,
                        buffers=buffers, record_ties=record_ties)
    call.run()
    return call.out


class TopkBuffers(NamedTuple):
    """The scratch of one ``topk`` call of ``rows`` rows (``TopkWorkspace.buffers`` makes them)."""
    scr_key: torch.Tensor       # [rows, scratch_size(k, width)] int32
    scr_col: torch.Tensor       # [rows, scratch_size(k, width)] int32
    bracket: torch.Tensor       # [rows, 2 * BRACKET] int32: the select's bracket, keys then columns
    cut_keys: torch.Tensor      # [rows] int32: each row's cut, 0 = none
    count: torch.Tensor         # [rows] int32: scratch entries per row
    ties: torch.Tensor          # [rows, TIE_WIDTH] int32: the tie class at the k-th value (``record_ties``)


class TopkWorkspace:
    """Scratch for ``topk`` calls of up to ``rows`` rows of up to ``width`` columns, allocated once
    and viewed at each call's size by ``buffers``: callers that must not allocate per call (a
    selector captured in a CUDA graph) pass those views to ``topk``."""

    def __init__(self, rows: int, k: int, width: int, device):
        self.rows, self.k, self.width = rows, k, width
        self.bracket_width = max(2 * BRACKET, 1)
        self.flat = torch.empty(self.numel(rows, k, width), dtype=torch.int32, device=device)

    @staticmethod
    def numel(rows: int, k: int, width: int) -> int:
        return rows * (2 * scratch_size(k, width) + max(2 * BRACKET, 1) + 2 + TIE_WIDTH)

    def buffers(self, rows: int, width: int) -> TopkBuffers:
        if rows > self.rows or width > self.width:
            raise ValueError(f"rows: a workspace for {self.rows} x {self.width} cannot hold {rows} x {width}")
        cap = scratch_size(self.k, width)
        sizes = (rows * cap, rows * cap, rows * self.bracket_width, rows, rows, rows * TIE_WIDTH)
        parts, start = [], 0
        for n in sizes:
            parts.append(self.flat[start:start + n])
            start += n
        return TopkBuffers(parts[0].view(rows, cap), parts[1].view(rows, cap),
                           parts[2].view(rows, self.bracket_width), parts[3], parts[4],
                           parts[5].view(rows, TIE_WIDTH))


class TopkLaunches:
    """One ``topk`` call's buffers and its three launches (``benchmarks/topk_compare.py`` times
    them one by one)."""

    def __init__(self, x, ks, ke, k, ks_offset=0, out_offset=0, cmap=None, finite_only=False, config=None,
                 sample=None, out=None, buffers=None, record_ties=False):
        t, w = x.shape
        dev = x.device
        check_rows("x", x)
        if sample is not None:
            values, step = sample
            if not isinstance(step, int) or step < 1:
                raise ValueError(f"sample: step must be an int >= 1, got {step!r}")
            if values.dtype != torch.float32 or values.dim() != 2 or values.device != dev:
                raise ValueError(f"sample: values must be a 2-D float32 tensor on {dev}, got "
                                 f"{values.dtype} {tuple(values.shape)} on {values.device}")
            if values.shape[0] != t or values.shape[1] < triton.cdiv(w, step) or values.stride(1) != 1:
                raise ValueError(f"sample: values of shape {tuple(values.shape)} (unit column stride) must "
                                 f"have {t} rows and at least ceil({w} / {step}) columns")
        self.sample_src = sample
        self.args = (x, ks, ke, k, ks_offset, out_offset, cmap, finite_only)
        self.k = k
        self.cfg = config or DEFAULT_CONFIG
        if not power_of_two(self.cfg.sample):           # tl.arange's sizes: the GPU refuses others
            raise ValueError(f"config: sample must be a power of two, got {self.cfg.sample}")
        self.cap = scratch_size(k, w)
        self.compact_cfg = COMPACT_CONFIG
        self.parts = max(1, min(256, w // (self.compact_cfg.steps * self.compact_cfg.block)))
        if out is not None and (tuple(out.shape) != (t, k) or out.dtype != torch.int32 or out.stride(1) != 1):
            raise ValueError(f"out: expected [{t}, {k}] int32 with unit column stride, got {out.dtype} "
                             f"{tuple(out.shape)}")
        self.out = out if out is not None else torch.empty(t, k, dtype=torch.int32, device=dev)
        if buffers is None:
            buffers = TopkWorkspace(t, k, w, dev).buffers(t, w)
        elif buffers.scr_key.shape != (t, self.cap) or buffers.bracket.shape[1] < max(2 * BRACKET, 1):
            raise ValueError(f"buffers: scratch {tuple(buffers.scr_key.shape)} does not fit {t} rows of {w} "
                             f"columns at k = {k} (TopkWorkspace.buffers({t}, {w}))")
        self.scr_key, self.scr_col, self.bracket, self.cut_keys, self.count, self.ties = buffers
        self.record_ties = record_ties

    def run(self):
        """The three launches."""
        if self.out.shape[0]:
            self.cut()
            self.compact()
            self.select()

    def cut(self):
        """The sample cut per row; also zeroes the scratch counters."""
        x, ks, ke, k, ks_offset, _, _, finite_only = self.args
        src, step = self.sample_src if self.sample_src is not None else (x, 1)
        _cut_kernel[(x.shape[0],)](x, ks, ke, self.cut_keys, self.count, src, x.stride(0), src.stride(0), step,
                                   ks_offset, k, CUT_SIGMAS, CUT_SLACK,
                                   SAMPLE=self.cfg.sample, CHUNK=SAMPLE_CHUNK, WAYS=WAYS, FINITE_ONLY=finite_only,
                                   EARLY_EXIT=EARLY_EXIT, FROM_SRC=self.sample_src is not None,
                                   num_warps=CUT_WARPS)

    def compact(self):
        x, ks, ke, _, ks_offset, _, _, finite_only = self.args
        _compact_kernel[(x.shape[0], self.parts)](
            x, ks, ke, self.cut_keys, self.count, self.scr_key, self.scr_col, x.stride(0),
            self.scr_key.stride(0), ks_offset, self.cap, BLOCK=self.compact_cfg.block, FINITE_ONLY=finite_only,
            COUNT_FIRST=bool(self.compact_cfg.count_first), num_warps=self.compact_cfg.num_warps,
            maxnreg=self.compact_cfg.maxnreg)

    def select(self):
        x, ks, ke, k, ks_offset, out_offset, cmap, finite_only = self.args
        _select_kernel[(x.shape[0],)](
            x, ks, ke, self.out, cmap if cmap is not None else self.out, self.cut_keys, self.count,
            self.scr_key, self.scr_col, self.bracket, self.ties, x.stride(0), self.out.stride(0),
            cmap.stride(0) if cmap is not None else 0, self.scr_key.stride(0), self.bracket.stride(0),
            ks_offset, out_offset, k, self.cap, BRACKET_SIGMAS,
            BLOCK=self.cfg.block, SBLOCK=SCRATCH_BLOCK, WAYS=WAYS, HAS_CMAP=cmap is not None,
            FINITE_ONLY=finite_only, EARLY_EXIT=EARLY_EXIT, BRACKET=BRACKET, BRACKET_MIN=BRACKET_MIN,
            HOLD=HOLD, GRAIN=16 if x.dtype == torch.bfloat16 and BF16_GRAIN else 0,
            RECORD_TIES=self.record_ties, TIE_CAP=TIE_CAP, TIE_WIDTH=TIE_WIDTH, num_warps=self.cfg.num_warps,
            maxnreg=SELECT_MAXNREG,
        )


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int) -> torch.Tensor:
    return topk(logits, ks, ke, k)
