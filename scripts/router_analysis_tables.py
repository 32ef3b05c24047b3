"""Markdown tables of docs/results.md, "Why MISA's router falls short here (CPU analysis)", from the
``results.json`` files of scripts/router_analysis.py.

    python scripts/router_analysis_tables.py --r30-4k DIR --r30-8k DIR --oracle DIR [--blocks DIR ...]

``--r30-4k`` / ``--r30-8k``: 30-layer runs (``--no-oracle``) at 4K and 8K; ``--oracle``: a run with the
oracle routers; ``--blocks``: 30-layer 4K runs at other block sizes (the ``--r30-4k`` run is added).
The library's ``gap`` router is the script's ``gap-m1`` (best pooled block against the rest).
"""
import argparse
import json
from pathlib import Path


def load(d):
    j = json.loads((Path(d) / "results.json").read_text())
    return j["meta"], j["results"]


def mean(r, layers, k, key):
    return sum(r[f"{l}/{k}"][key] for l in layers) / len(layers)


def lo(r, layers, k, key):
    return min(r[f"{l}/{k}"][key] for l in layers)


def table(cols, rows):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def header(meta):
    return (f"`{meta['command']}` ({meta['threads']} threads, torch {meta['torch']}, {meta['date']}, "
            f"{meta['seconds']} s; {meta['windows']} windows x {meta['queries_per_window']} queries)")


def per_layer_rows(r, layers, k, keys, fmt="{:.3f}"):
    """One row per layer, then the mean and the minimum over the layers."""
    rows = [[l] + [fmt.format(r[f"{l}/{k}"][key]) for key in keys] for l in layers]
    rows.append(["mean"] + [fmt.format(mean(r, layers, k, key)) for key in keys])
    rows.append(["min"] + [fmt.format(lo(r, layers, k, key)) for key in keys])
    return rows


STATS = [("recall/abs-sum", "abs-sum (MISA, the paper's)"), ("recall/random", "8 random heads"),
         ("recall/abs-w", "8 heads of largest abs(w)"), ("recall/sink-window", "sink + window (no heads)"),
         ("recall/pos-sum", "relu(w) * sum over blocks (positive-w heads only)"),
         ("recall/abs-max", "abs(w) * max over blocks"), ("recall/abs-std", "abs(w) * std over blocks"),
         ("recall/abs-contrast", "abs(w) * (max - mean) over blocks"),
         ("recall/abs-dc", "abs(w) * relu(q . sum of pooled keys)"),
         ("recall/gap-m1", "**gap** (library `router=\"gap\"`: best block vs rest)"),
         ("recall/gap-m2", "gap, top-2 blocks vs rest"), ("recall/gap-m4", "gap, top-4 blocks vs rest"),
         ("recall/gap", "gap, top ceil(k/B)+1 blocks vs rest"), ("recall/abs-gap", "abs(gap), top ceil(k/B)+1"),
         ("recall/pooled-greedy", "pooled greedy (heads that keep the pooled top blocks)"),
         ("recall/oracle-gap", "oracle-gap (reads DSA's selection)"),
         ("recall/abs-sum-h16", "abs-sum, h = 16"), ("recall/gap-h16", "gap (top ceil(k/B)+1), h = 16"),
         ("recall/random-h16", "16 random heads"),
         ("recall+resid/abs-sum", "abs-sum + dropped heads' pooled block score"),
         ("recall+resid/gap-m1", "gap + dropped heads' pooled block score"),
         ("dagger/abs-sum", "MISA-dagger (k1 = 4k), abs-sum"), ("dagger/gap-m1", "MISA-dagger (k1 = 4k), gap"),
         ("dagger/random", "MISA-dagger (k1 = 4k), 8 random heads")]


def stat_table(runs):
    cols = ["router (h = 8 unless said)"] + [f"{m['context'] // 1024}K, k = {k}" for m, _ in runs for k in m["k"]]
    rows = []
    for key, label in STATS:
        row = [label]
        for m, r in runs:
            for k in m["k"]:
                L = m["layers"]
                row.append(f"{mean(r, L, k, key):.3f} ({lo(r, L, k, key):.3f})" if key in r[f"{L[0]}/{k}"] else "-")
        rows.append(row)
    rows.append(["attention mass held: DSA / gap / abs-sum"] +
                [" / ".join(f"{mean(r, m['layers'], k, key):.3f}" for key in ("mass/dsa", "selmass/gap-m1", "selmass/abs-sum"))
                 for m, r in runs for k in m["k"]])
    print("Recall of DSA's top-k, mean (worst layer) over the layers:\n")
    for m, _ in runs:
        print(f"- {m['context']}:", header(m))
    print("\n" + table(cols, rows) + "\n")


def per_layer_table(meta, r, k):
    keys = ["recall/abs-sum", "recall/gap-m1", "recall/gap-h16", "recall/random", "recall/sink-window",
            "dagger/abs-sum", "dagger/gap-m1"]
    cols = ["layer", "abs-sum", "gap", "gap (top-2), h = 16", "8 random heads", "sink + window",
            "MISA-dagger abs-sum", "MISA-dagger gap"]
    print(f"Per layer, context {meta['context']}, k = {k}:", header(meta), "\n")
    print(table(cols, per_layer_rows(r, meta["layers"], k, keys)) + "\n")


def oracle_table(meta, r, k):
    keys = ["recall/oracle-best", "backward-curve/16", "backward-curve/32", "recall/oracle-gap", "recall/gap-m1",
            "recall/abs-sum", "recall/random"]
    cols = ["layer", "oracle, 8 heads", "oracle, 16 heads", "oracle, 32 heads", "oracle-gap", "gap", "abs-sum",
            "8 random heads", "effective heads", "top-8 share of abs(separation)"]
    L = meta["layers"]
    rows = per_layer_rows(r, L, k, keys)
    for row, l in zip(rows, L + ["mean", "min"]):
        if l == "min":
            row += ["-", "-"]
            continue
        g = {key: r[f"{l}/{k}"][key] if l != "mean" else mean(r, L, k, key)
             for key in ("gap/eff-heads", "gap/top8-share-abs")}
        row += [f"{g['gap/eff-heads']:.1f}", f"{g['gap/top8-share-abs']:.2f}"]
    print(f"Oracle routers, context {meta['context']}, k = {k}:", header(meta), "\n")
    print(table(cols, rows) + "\n")


def heads_table(meta, r, k):
    L = meta["layers"]
    cols = ["heads routed by", "recall", "w < 0", "active keys", "contrast (std/mean)", "corr. with DSA's score",
            "attention mass held", "same heads as abs-sum"]
    rows = []
    for name, label in (("abs-sum", "abs-sum (MISA)"), ("abs-dc", "abs(w) * relu(q . sum of pooled keys)"),
                        ("gap-m1", "gap"), ("oracle-best", "oracle"), ("oracle-gap", "oracle-gap"), ("random", "random")):
        rows.append([label] + [f"{mean(r, L, k, f'{p}/{name}'):{f}}" for p, f in (
            ("recall", ".3f"), ("w<0", ".2f"), ("active", ".2f"), ("cv", ".2f"), ("corr", ".3f"), ("selmass", ".3f"),
            ("overlap-abs-sum", ".2f"))])
    allh = [r[f"{l}/all"] for l in L]
    rows.append(["all 64 heads (DSA)", "1", f"{sum(a['w<0'] for a in allh) / len(L):.2f}",
                 f"{sum(a['all/active'] for a in allh) / len(L):.2f}", f"{sum(a['all/cv'] for a in allh) / len(L):.2f}",
                 "1", f"{mean(r, L, k, 'mass/dsa'):.3f}", "-"])
    print(f"Routed heads, mean over layers {L}, context {meta['context']}, k = {k}\n")
    print(table(cols, rows) + "\n")


def block_table(runs):
    cols = ["B", "abs-sum k=128", "gap k=128", "abs-sum k=256", "gap k=256", "best block = the query's own"]
    rows = []
    for m, r in sorted(runs, key=lambda x: x[0]["block"]):
        L = m["layers"]
        rows.append([m["block"]] + [f"{mean(r, L, k, f'recall/{n}'):.3f} ({lo(r, L, k, f'recall/{n}'):.3f})"
                                    for k in (128, 256) for n in ("abs-sum", "gap-m1")]
                    + [f"{mean(r, L, 128, 'best-block/last'):.3f}"])
    print(f"Block size, {len(runs[0][0]['layers'])} layers, context {runs[0][0]['context']}, mean (worst layer):\n")
    for m, _ in sorted(runs, key=lambda x: x[0]["block"]):
        print(f"- B = {m['block']}:", header(m))
    print("\n" + table(cols, rows) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r30-4k", required=True)
    p.add_argument("--r30-8k", required=True)
    p.add_argument("--oracle", required=True)
    p.add_argument("--blocks", nargs="*", default=[])
    a = p.parse_args()
    m4, r4 = load(a.r30_4k)
    m8, r8 = load(a.r30_8k)
    mo, ro = load(a.oracle)
    stat_table([(m4, r4), (m8, r8)])
    per_layer_table(m8, r8, m8["k"][0])
    oracle_table(mo, ro, mo["k"][0])
    heads_table(mo, ro, mo["k"][0])
    if a.blocks:
        block_table([load(d) for d in a.blocks] + [(m4, r4)])


if __name__ == "__main__":
    main()
