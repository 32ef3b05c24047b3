"""Per-layer calibration: for every layer, the cheapest selection setting that keeps a target
share of what DSA's indexer selects.

    cal = misa.calibrate(model, texts, target=0.95)          # a HF deepseek_v32 / glm_moe_dsa model
    cal.config.to_json("misa-0.95.json")
    misa.patch_model(model, config=misa.MisaConfig.from_json("misa-0.95.json"))

How it works: dense DSA runs on calibration text; for each layer, on a sample of queries, every
candidate ``Setting`` (MISA with h routed heads and a router statistic, MISA-dagger with its stage-1
size, HISA with its candidate budget) selects its tokens and is scored against DSA's selection by

- ``recall``: the share of DSA's tokens it also picks (``misa.recall``, mean over queries), or
- ``mass``: the dense attention probability its picks hold, divided by what DSA's picks hold
  (needs the model's attention probabilities: the SmolLM2 testbed, ``misa.eval.calibrate``).

Each layer gets the cheapest setting whose score meets ``target``; DSA itself (score 1) is always a
candidate, so a layer that nothing cheaper serves stays dense. "Cheapest" is read from a cost table:
the measured time of each setting's selection relative to dense DSA at 4096 queries x 131072 keys
(``misa bench --cost-table FILE`` measures one on your GPU; ``misa/data/`` ships ours). The sizes a
setting scales with k (MISA-dagger's k1, HISA's candidate tokens) are multiples of k, so a table
measured at k = 2048 prices settings calibrated at any k.
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MisaConfig
from .metrics import recall as recall_of
from .validate import check_int
from .variants import VARIANTS

METRICS = ("recall", "mass")
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_COST_TABLE = DATA_DIR / "cost-table-h100.json"
COST_TABLE_FORMAT = "misa-cost-table/1"


@dataclass(frozen=True)
class Setting:
    """One candidate selection, independent of k: ``variant``; ``active_heads`` and ``router`` for
    the MISA variants; ``multiple`` for MISA-dagger (k1 = multiple * k) and HISA (multiple * k
    candidate tokens, as whole blocks)."""
    variant: str
    active_heads: int | None = None
    router: str | None = None
    multiple: int | None = None

    @property
    def name(self) -> str:
        """The setting's key in cost tables and reports, e.g. ``misa h=8 gap``,
        ``misa-dagger h=8 abs-sum k1=4k``, ``hisa 4k``."""
        if self.variant == "dsa":
            return "dsa"
        if self.variant == "hisa":
            return f"hisa {self.multiple}k"
        name = f"{self.variant} h={self.active_heads} {self.router}"
        return name + (f" k1={self.multiple}k" if self.variant == "misa-dagger" else "")

    @classmethod
    def parse(cls, name: str) -> "Setting":
        """The inverse of ``name``; a malformed name raises ``ValueError`` naming ``setting``."""
        parts = name.split()
        try:
            if parts == ["dsa"]:
                return cls("dsa")
            if parts[0] == "hisa" and len(parts) == 2 and parts[1].endswith("k"):
                return cls("hisa", multiple=int(parts[1][:-1]))
            if parts[0] in ("misa", "misa-dagger") and parts[1].startswith("h="):
                heads, router = int(parts[1][2:]), parts[2]
                if parts[0] == "misa" and len(parts) == 3:
                    return cls("misa", heads, router)
                if parts[0] == "misa-dagger" and len(parts) == 4 and parts[3].startswith("k1=") and parts[3].endswith("k"):
                    return cls("misa-dagger", heads, router, int(parts[3][3:-1]))
        except (IndexError, ValueError):
            pass
        raise ValueError(f"setting: cannot read {name!r} (e.g. 'dsa', 'misa h=8 gap', "
                         f"'misa-dagger h=8 abs-sum k1=4k', 'hisa 4k')")

    def config(self, k: int, router_block_size: int, hisa_block_size: int) -> MisaConfig:
        """The ``MisaConfig`` that runs this setting at top-k ``k``."""
        if self.variant == "dsa":
            return MisaConfig(variant="dsa")
        if self.variant == "hisa":
            return MisaConfig(variant="hisa", hisa_block_size=hisa_block_size,
                              hisa_block_k=max(2, math.ceil(self.multiple * k / hisa_block_size)))
        return MisaConfig(variant=self.variant, active_heads=self.active_heads, router=self.router,
                          block_size=router_block_size,
                          stage1_k=self.multiple * k if self.variant == "misa-dagger" else None)


def candidate_settings(num_heads: int, heads=(2, 4, 8, 16, 32), routers=("abs-sum", "gap"),
                       dagger_heads=(4, 8), dagger_multiples=(2, 4), hisa_multiples=(2, 4, 8)) -> list[Setting]:
    """The settings calibration tries by default (head counts below ``num_heads`` only), DSA first."""
    check_int("num_heads", num_heads)
    out = [Setting("dsa")]
    out += [Setting("misa", h, r) for h in heads if h < num_heads for r in routers]
    out += [Setting("misa-dagger", h, r, m) for h in dagger_heads if h < num_heads for r in routers
            for m in dagger_multiples]
    out += [Setting("hisa", multiple=m) for m in hisa_multiples]
    return out


# ---------------------------------------------------------------------------------------------
@dataclass
class CostTable:
    """Measured selection times per setting name (ms), at one shape, on one card."""
    times_ms: dict
    meta: dict = field(default_factory=dict)

    def relative(self, setting: Setting) -> float:
        """The setting's time over dense DSA's (DSA: 1.0)."""
        if setting.name not in self.times_ms:
            raise ValueError(f"cost_table: no time for setting {setting.name!r} (measured: "
                             f"{', '.join(sorted(self.times_ms))}); measure it with `misa bench --cost-table`")
        return self.times_ms[setting.name] / self.times_ms["dsa"]

    def to_json(self, path=None) -> dict:
        out = {"format": COST_TABLE_FORMAT, **self.meta, "times_ms": self.times_ms}
        if path is not None:
            Path(path).write_text(json.dumps(out, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, source=None) -> "CostTable":
        """A cost table from a JSON path or dict (None: the table shipped with the library)."""
        if source is None:
            source = DEFAULT_COST_TABLE
            if not source.is_file():
                raise ValueError("cost_table: no table ships with this build; measure one with "
                                 "`misa bench --cost-table FILE` on a GPU and pass it")
        if isinstance(source, (str, Path)):
            try:
                raw = json.loads(Path(source).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cost_table: cannot read {source}: {e}") from None
        else:
            raw = dict(source)
        if raw.get("format") != COST_TABLE_FORMAT:
            raise ValueError(f"cost_table: format must be {COST_TABLE_FORMAT!r}, got {raw.get('format')!r}")
        times = raw.get("times_ms")
        if not isinstance(times, dict) or "dsa" not in times:
            raise ValueError("cost_table: times_ms must map setting names to ms and include 'dsa'")
        for name, ms in times.items():
            Setting.parse(name)
            if not isinstance(ms, (int, float)) or not ms > 0:
                raise ValueError(f"cost_table: times_ms[{name!r}] must be a positive number, got {ms!r}")
        return cls(dict(times), {k: v for k, v in raw.items() if k not in ("format", "times_ms")})


def measure_costs(settings, device, num_queries: int = 4096, context: int = 131072, heads: int = 64,
                  head_dim: int = 128, k: int = 2048, router_block_size: int = 1024, hisa_block_size: int = 128,
                  rep_ms: int = 100, seed: int = 0) -> CostTable:
    """Each setting's selection time (kernels, inputs validated once, ``triton.testing.do_bench``
    median) on synthetic fp8 indexer traffic; DSA measured in the same run."""
    import triton.testing
    from .bench import _run
    from .synthetic import indexer_workload
    from .validate import check_inputs
    settings = list(settings)
    if not any(s.variant == "dsa" for s in settings):
        settings.insert(0, Setting("dsa"))
    w = indexer_workload(context, num_queries, heads, head_dim, seed=seed, device=device)
    inp = check_inputs(*w.args)
    times = {}
    for s in settings:
        cfg = s.config(k, router_block_size, hisa_block_size)
        times[s.name] = float(triton.testing.do_bench(lambda: _run(cfg, inp, k), warmup=25, rep=rep_ms,
                                                      return_mode="median"))
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
    meta = {"card": name, "date": datetime.date.today().isoformat(),
            "shape": {"num_queries": num_queries, "context": context, "heads": heads, "head_dim": head_dim, "k": k,
                      "router_block_size": router_block_size, "hisa_block_size": hisa_block_size},
            "how": "triton.testing.do_bench median of each setting's kernel-path selection, inputs validated once"}
    return CostTable(times, meta)


# ---------------------------------------------------------------------------------------------
@dataclass
class LayerSample:
    """One layer's indexer traffic for some queries (``misa.api`` conventions), and optionally the
    dense model's attention probabilities ``probs [T, S]`` of those queries (for ``mass``)."""
    q: torch.Tensor
    kv: object
    weights: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor
    probs: torch.Tensor | None = None


def attention_mass(sel: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Attention mass ``[T]`` that the selected tokens (``[T, k]``, -1 padded) hold under ``probs [T, S]``."""
    idx = sel.long()
    return torch.where(idx >= 0, torch.gather(probs, 1, idx.clamp_min(0)), 0.0).sum(dim=1)


def score_settings(samples, settings, k: int, router_block_size: int, hisa_block_size: int) -> dict:
    """Per setting name: ``recall`` (mean over all queries of all samples) and, when every sample
    has ``probs``, ``mass`` (the picks' attention mass summed over queries, over DSA's)."""
    acc = {s.name: {"recall": 0.0, "mass": 0.0} for s in settings}
    n, dsa_mass, with_probs = 0, 0.0, True
    for smp in samples:
        args = (smp.q, smp.kv, smp.weights, smp.ks, smp.ke)
        ref = MisaConfig(variant="dsa").select(*args, k)
        with_probs &= smp.probs is not None
        if with_probs:
            dsa_mass += float(attention_mass(ref, smp.probs).sum())
        n += ref.shape[0]
        for s in settings:
            sel = ref if s.variant == "dsa" else s.config(k, router_block_size, hisa_block_size).select(*args, k)
            acc[s.name]["recall"] += float(recall_of(sel, ref).sum())
            if with_probs:
                acc[s.name]["mass"] += float(attention_mass(sel, smp.probs).sum())
    if n == 0:
        raise ValueError("samples: no queries to calibrate on")
    out = {}
    for name, a in acc.items():
        out[name] = {"recall": a["recall"] / n}
        if with_probs:
            out[name]["mass"] = a["mass"] / max(dsa_mass, 1e-30)
    return out


def _check_target(target, metric: str) -> None:
    if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"target: expected a share in (0, 1], got {target!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")


def choose(scores: dict, costs: CostTable, target: float, metric: str = "recall") -> str:
    """The cheapest setting name in ``scores`` whose ``metric`` is at least ``target`` (ties: the
    higher score); DSA when nothing cheaper qualifies."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if any(metric not in s for s in scores.values()):
        raise ValueError(f"metric: {metric!r} was not scored for every setting ('mass' needs attention probabilities)")
    ok = [(costs.relative(Setting.parse(name)), -s[metric], name) for name, s in scores.items()
          if s[metric] >= target or name == "dsa"]
    if not ok:
        raise ValueError("scores: no setting qualifies and DSA was not scored")
    return min(ok)[2]


@dataclass
class Calibration:
    """What ``calibrate`` found: ``config`` (per-layer ``MisaConfig``, ``MisaConfig.to_json``-able,
    its ``meta`` holding the table below) and ``table``: per layer, every setting's scores and cost."""
    config: MisaConfig
    table: dict

    def modelled_speedup(self) -> float:
        """Dense DSA's indexer time over the chosen settings', summed over the calibrated layers
        (from the cost table: times at 4096 x 131072)."""
        chosen = [row["settings"][row["chosen"]]["cost"] for row in self.table.values()]
        return len(chosen) / sum(chosen)

    def summary(self) -> str:
        meta = self.config.meta or {}
        lines = [f"| layer | setting | {meta.get('metric', 'recall')} | cost vs DSA |", "|---|---|---|---|"]
        for layer, row in sorted(self.table.items()):
            s = row["settings"][row["chosen"]]
            lines.append(f"| {layer} | {row['chosen']} | {s[meta.get('metric', 'recall')]:.3f} | {s['cost']:.3f} |")
        lines.append(f"\nModelled indexer speed-up over dense DSA at 4096 x 131072: {self.modelled_speedup():.2f}x")
        return "\n".join(lines)


def score_layers(samples_by_layer: dict, *, k: int, settings=None, cost_table=None, router_block_size: int,
                 hisa_block_size: int, num_heads: int | None = None) -> tuple[dict, CostTable]:
    """Every candidate setting scored per layer on recorded traffic ``{layer: [LayerSample, ...]}``:
    ``({layer: {setting name: {"recall", "mass"?, "cost"}}}, cost table)``. Choosing from these
    scores (``calibration_from_scores``) is cheap, so one scoring serves several targets."""
    check_int("k", k)
    if not samples_by_layer:
        raise ValueError("samples_by_layer: no layers to calibrate")
    costs = cost_table if isinstance(cost_table, CostTable) else CostTable.load(cost_table)
    if settings is None:
        first = next(iter(samples_by_layer.values()))[0]
        settings = candidate_settings(num_heads or first.q.shape[1])
    settings = list(settings)
    if not any(s.variant == "dsa" for s in settings):
        settings.insert(0, Setting("dsa"))
    for s in settings:
        if s.variant not in VARIANTS:
            raise ValueError(f"settings: unknown variant {s.variant!r}")
        costs.relative(s)                    # every candidate must be priced before any work is done
    out = {}
    for layer, samples in sorted(samples_by_layer.items()):
        scores = score_settings(samples, settings, k, router_block_size, hisa_block_size)
        for name, sc in scores.items():
            sc["cost"] = costs.relative(Setting.parse(name))
        out[int(layer)] = scores
    return out, costs


def calibration_from_scores(scores_by_layer: dict, costs: CostTable, target: float, *, metric: str = "recall",
                            k: int, router_block_size: int, hisa_block_size: int,
                            meta: dict | None = None) -> Calibration:
    """Per layer, the cheapest scored setting whose ``metric`` meets ``target`` (see ``choose``)."""
    _check_target(target, metric)
    table, layers = {}, []
    for layer, scores in sorted(scores_by_layer.items()):
        if metric not in scores["dsa"]:
            raise ValueError("metric: 'mass' needs the attention probabilities (LayerSample.probs)")
        best = choose(scores, costs, target, metric)
        table[int(layer)] = {"chosen": best, "settings": scores}
        layers.append((int(layer), Setting.parse(best).config(k, router_block_size, hisa_block_size)))
    info = {"target": target, "metric": metric, "k": k, "router_block_size": router_block_size,
            "hisa_block_size": hisa_block_size, "cost_table": costs.meta, **(meta or {}),
            "layers": {str(l): row for l, row in table.items()}}
    cal = Calibration(MisaConfig(variant="dsa", layers=tuple(layers), meta=info), table)
    info["modelled_speedup"] = cal.modelled_speedup()
    return cal


def calibrate_layers(samples_by_layer: dict, target: float = 0.95, *, metric: str = "recall", k: int,
                     settings=None, cost_table=None, router_block_size: int, hisa_block_size: int,
                     num_heads: int | None = None, meta: dict | None = None) -> Calibration:
    """Calibrate from recorded traffic ``{layer: [LayerSample, ...]}``: ``score_layers`` then
    ``calibration_from_scores``."""
    _check_target(target, metric)
    scores, costs = score_layers(samples_by_layer, k=k, settings=settings, cost_table=cost_table,
                                 router_block_size=router_block_size, hisa_block_size=hisa_block_size,
                                 num_heads=num_heads)
    return calibration_from_scores(scores, costs, target, metric=metric, k=k, router_block_size=router_block_size,
                                   hisa_block_size=hisa_block_size, meta=meta)


def calibrate(model, texts, target: float = 0.95, *, metric: str = "recall", queries: int = 256,
              settings=None, cost_table=None, router_block_size: int = 1024, hisa_block_size: int = 128,
              tokenizer=None) -> Calibration:
    """Calibrate a HF ``deepseek_v32`` / ``glm_moe_dsa`` model on ``texts`` (strings, with
    ``tokenizer``; or 1-D token id tensors): one forward per text records every layer's indexer
    traffic for ``queries`` query positions spread over the text's second half, then each layer
    gets the cheapest setting whose recall of DSA's selection meets ``target``. Only ``recall``
    is available here (``mass`` needs the main attention's probabilities: the SmolLM2 testbed,
    ``misa calibrate``). Returns a ``Calibration``; ``.config`` goes to ``patch_model(config=)``."""
    from .nn.hf import record_indexer_traffic
    if metric != "recall":
        raise ValueError("metric: a HF DSA model is calibrated on recall ('mass' needs attention probabilities)")
    check_int("queries", queries)
    ids = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("tokenizer: texts are strings; pass the model's tokenizer (or token id tensors)")
            t = torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.numel() < 2:
            raise ValueError(f"texts[{i}]: expected a string or a 1-D tensor of >= 2 token ids")
        ids.append(t.long())
    if not ids:
        raise ValueError("texts: no calibration text")
    samples, k = record_indexer_traffic(model, ids, queries)
    return calibrate_layers(samples, target, metric=metric, k=k,
                            settings=settings, cost_table=cost_table, router_block_size=router_block_size,
                            hisa_block_size=hisa_block_size, num_heads=model.config.index_n_heads,
                            meta={"model": getattr(model.config, "model_type", "?"),
                                  "texts": len(ids), "tokens": sum(int(t.numel()) for t in ids)})
