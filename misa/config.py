"""Every MISA option in one dataclass, and the selector each variant runs.

``MisaConfig`` is what ``misa.patch_model``, the ``misa.nn`` modules and the engine ops in
``misa.engine`` take. It can be read from a model's ``config.json`` keys, the way MISA's published
code is switched on:

    use_misa                 true -> MISA (or MISA-dagger, below); false or absent -> plain DSA
    misa_topk_heads          active heads per query at prefill (paper: 8)
    misa_decode_topk_heads   active heads per query at decode (default: misa_topk_heads)
    misa_k_block_size        key block size of the router's mean pooling (paper: 1024)
    misa_stage1_topk         set -> MISA-dagger: candidates kept by the routed score (paper: 8192)

Bad values raise ``ValueError`` naming the field (or the ``config.json`` key they came from).

A config can also differ per layer (``layers``): ``misa calibrate`` writes such a config as JSON
and ``MisaConfig.from_json`` reads it back:

    {"format": "misa-config/1",
     "default": {"variant": "dsa"},                         # layers not listed below
     "layers": {"0": {"variant": "misa", "active_heads": 4, "router": "gap", "block_size": 128}, ...},
     "calibration": {...}}                                  # how it was chosen (kept, not used)
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import api, paged
from .ops.router.reference import DEFAULT_ROUTER, ROUTER_STATISTICS
from .validate import LOGITS_DTYPE_NAMES, check_hisa_budget, check_int
from .select import BACKENDS
from .variants import VARIANTS

# config.json key -> MisaConfig field
MODEL_CONFIG_KEYS = {
    "misa_topk_heads": "active_heads",
    "misa_decode_topk_heads": "decode_active_heads",
    "misa_k_block_size": "block_size",
    "misa_stage1_topk": "stage1_k",
}


@dataclass(frozen=True)
class MisaConfig:
    """Which selector replaces the DSA indexer's top-k, and its parameters.

    ``variant``: ``"misa"`` (routed heads), ``"misa-dagger"`` (routed heads keep ``stage1_k``
    candidates, all heads re-rank them), ``"hisa"`` (block pruning, all heads) or ``"dsa"`` (the
    unmodified indexer, for comparison). ``active_heads``/``decode_active_heads``, ``block_size``,
    ``router`` and ``stage1_k`` belong to the MISA variants; ``hisa_block_size`` and
    ``hisa_block_k`` to HISA. ``stage1_k`` is required by ``"misa-dagger"`` and refused by
    ``"misa"`` (setting it there almost always means MISA-dagger was meant).
    ``workspace_bytes`` bounds the largest intermediate (see ``misa.api``); ``backend`` picks
    kernels or reference (None: ``"auto"``, see ``misa.api``). ``logits_dtype``: ``"float32"`` or
    ``"bfloat16"``, the prefill logits rows of DSA, MISA and MISA-dagger's first stage (``misa.api``);
    None: the variant's default, bfloat16 for MISA-dagger and float32 for the others
    (``misa.validate.DEFAULT_LOGITS_DTYPES``); HISA has none and refuses bfloat16.
    Variants: ``misa.variants.VARIANTS``.
    """
    variant: str = "misa"
    active_heads: int = 8
    decode_active_heads: int | None = None
    block_size: int = 1024
    stage1_k: int | None = None
    router: str = DEFAULT_ROUTER
    hisa_block_size: int = 128
    hisa_block_k: int = 64
    workspace_bytes: int | None = None
    backend: str | None = None
    logits_dtype: str | None = None
    layers: tuple = ()            # ((layer index, MisaConfig), ...): per-layer settings, see for_layer
    meta: Mapping | None = dataclasses.field(default=None, compare=False, hash=False)   # from_json's "calibration"

    def __post_init__(self):
        _check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, {})
        _check_layers(self.layers)

    def for_layer(self, layer: int) -> "MisaConfig":
        """The settings of layer ``layer``: its entry in ``layers``, else this config's own fields."""
        for index, cfg in self.layers:
            if index == layer:
                return cfg
        return dataclasses.replace(self, layers=(), meta=None) if self.layers else self

    @classmethod
    def from_json(cls, source) -> "MisaConfig":
        """A (per-layer) config from a JSON file path, or from the dict such a file holds (the
        format in this module's docstring). Unknown keys, bad values and missing fields raise
        ``ValueError`` naming the field, e.g. ``layers.3.active_heads``."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                raw = json.loads(path.read_text())
            except OSError as e:
                raise ValueError(f"path: cannot read {path}: {e.strerror}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"path: {path} is not JSON ({e})") from None
        elif isinstance(source, Mapping):
            raw = dict(source)
        else:
            raise ValueError(f"source: expected a JSON file path or a dict, got {type(source).__name__}")
        if not isinstance(raw, Mapping):
            raise ValueError("source: the JSON must be an object with 'default' and/or 'layers'")
        unknown = sorted(set(raw) - {"format", "default", "layers", "calibration"})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (known: format, default, layers, calibration)")
        if raw.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
            raise ValueError(f"format: expected {CONFIG_FORMAT!r}, got {raw['format']!r}")
        default = _fields_from(raw.get("default", {}), "default")
        layers = raw.get("layers", {})
        if not isinstance(layers, Mapping):
            raise ValueError("layers: expected an object mapping layer index -> settings")
        per_layer = []
        for key, value in layers.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"layers.{key}: the key must be a layer index (an integer)") from None
            if index < 0:
                raise ValueError(f"layers.{key}: layer index must be >= 0")
            per_layer.append((index, cls(**_fields_from(value, f"layers.{key}", default))))
        meta = raw.get("calibration")
        if meta is not None and not isinstance(meta, Mapping):
            raise ValueError("calibration: expected an object")
        return cls(**default, layers=tuple(sorted(per_layer, key=lambda p: p[0])), meta=meta)

    def to_json(self, path=None, calibration: Mapping | None = None) -> dict:
        """This config in ``from_json``'s format (written to ``path`` when given); ``calibration``
        (default: ``meta``) is stored beside it."""
        out = {"format": CONFIG_FORMAT, "default": _changed_fields(self)}
        if self.layers:
            out["layers"] = {str(i): _changed_fields(c) for i, c in self.layers}
        calibration = calibration if calibration is not None else self.meta
        if calibration is not None:
            out["calibration"] = dict(calibration)
        if path is not None:
            Path(path).write_text(json.dumps(out, indent=1, default=float) + "\n")
        return out

    @classmethod
    def from_model_config(cls, model_config, **overrides) -> "MisaConfig":
        """Read the ``use_misa`` / ``misa_*`` keys of a ``config.json`` dict or a HF config object.

        ``overrides`` (field names) are applied on top. Unknown ``misa_*`` keys are refused, so a
        misspelt option cannot be silently ignored.
        """
        raw = _as_dict(model_config)
        unknown = sorted(k for k in raw if k.startswith("misa_") and k not in MODEL_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown MISA option (known: use_misa, "
                             f"{', '.join(MODEL_CONFIG_KEYS)})")
        use_misa = raw.get("use_misa", False)
        if not isinstance(use_misa, bool):
            raise ValueError(f"use_misa: expected true or false, got {use_misa!r}")
        values = {field: raw[key] for key, field in MODEL_CONFIG_KEYS.items() if key in raw}
        if "block_size" in values and values["block_size"] is None:
            raise ValueError("misa_k_block_size: null (the published code's q-norm router) is not "
                             "supported here; give a block size, or set router='qnorm' explicitly")
        if not use_misa:
            values["variant"] = "dsa"
        else:
            values["variant"] = "misa-dagger" if values.get("stage1_k") is not None else "misa"
        # Check with the config.json key names, so the message points at the file's line.
        names = {field: key for key, field in MODEL_CONFIG_KEYS.items()}
        _check_fields({**dataclasses.asdict(cls()), **values}, names)
        values.update(overrides)
        return cls(**values)

    def with_options(self, **options) -> "MisaConfig":
        """A copy with some fields changed; an unknown field name raises ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in options:
            if name not in known:
                raise ValueError(f"{name}: not a MisaConfig field (fields: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **options)

    def check_indexer(self, num_heads: int, index_topk: int) -> "MisaConfig":
        """``self``, after checking it fits an indexer with ``num_heads`` heads selecting
        ``index_topk`` tokens (so a misfit fails when a model is patched, not mid-generation);
        per-layer settings are checked too (messages name ``layers.N.field``)."""
        for index, cfg in self.layers:
            try:
                cfg.check_indexer(num_heads, index_topk)
            except ValueError as e:
                raise ValueError(f"layers.{index}.{e}") from None
        if self.variant in ("misa", "misa-dagger"):
            check_int("active_heads", self.active_heads, 1, num_heads)
            if self.decode_active_heads is not None:
                check_int("decode_active_heads", self.decode_active_heads, 1, num_heads)
        if self.variant == "misa-dagger" and self.stage1_k < index_topk:
            raise ValueError(f"stage1_k: must be >= the indexer's top-k ({index_topk}), got {self.stage1_k}")
        if self.variant == "hisa":
            try:
                check_hisa_budget(index_topk, self.hisa_block_size, self.hisa_block_k)
            except ValueError as e:
                raise ValueError(f"hisa_{e}") from None
        return self

    @property
    def torch_logits_dtype(self):
        """``logits_dtype`` as the torch dtype the selections take (None: the variant's default)."""
        return None if self.logits_dtype is None else LOGITS_DTYPE_NAMES[self.logits_dtype]

    def heads(self, decode: bool) -> int:
        """Active heads for prefill, or for decode when ``decode_active_heads`` is set."""
        if decode and self.decode_active_heads is not None:
            return self.decode_active_heads
        return self.active_heads

    def select(self, q, kv, weights, ks, ke, k: int, *, decode: bool = False):
        """This variant's selection (``misa.api`` conventions): ``[T, k]`` int32 absolute positions,
        -1 padded. ``decode`` picks ``decode_active_heads``."""
        opts = dict(workspace_bytes=self.workspace_bytes, backend=self.backend)
        if self.variant == "hisa":
            return api.hisa_select(q, kv, weights, ks, ke, k, self.hisa_block_size, self.hisa_block_k, **opts)
        opts["logits_dtype"] = self.torch_logits_dtype
        if self.variant == "dsa":
            return api.dsa_select(q, kv, weights, ks, ke, k, **opts)
        return api.misa_select(q, kv, weights, ks, ke, k, self.heads(decode), self.block_size,
                               self.stage1_k, router=self.router, **opts)

    def paged_select(self, q, kv_cache, weights, context_lens, block_table, k: int):
        """This variant's decode selection over the paged cache (``misa.paged`` conventions)."""
        if self.variant == "dsa":
            return paged.paged_dsa_select(q, kv_cache, weights, context_lens, block_table, k, backend=self.backend)
        if self.variant == "hisa":
            return paged.paged_hisa_select(q, kv_cache, weights, context_lens, block_table, k,
                                           self.hisa_block_size, self.hisa_block_k, backend=self.backend)
        return paged.paged_misa_select(q, kv_cache, weights, context_lens, block_table, k,
                                       self.heads(True), self.block_size, self.stage1_k,
                                       router=self.router, workspace_bytes=self.workspace_bytes,
                                       backend=self.backend)


CONFIG_FORMAT = "misa-config/1"
_SETTING_FIELDS = ("variant", "active_heads", "decode_active_heads", "block_size", "stage1_k", "router",
                   "hisa_block_size", "hisa_block_k", "workspace_bytes", "backend", "logits_dtype")


def _fields_from(value, where: str, base: dict | None = None) -> dict:
    """MisaConfig fields from one JSON object, checked (messages say ``where.field``)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object of MisaConfig fields")
    unknown = sorted(set(value) - set(_SETTING_FIELDS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (fields: {', '.join(_SETTING_FIELDS)})")
    values = {**(base or {}), **value}
    names = {f: f"{where}.{f}" for f in _SETTING_FIELDS}
    defaults = {f: getattr(MisaConfig, f) for f in _SETTING_FIELDS}
    _check_fields({**defaults, **values}, names)
    return values


def _changed_fields(cfg: MisaConfig) -> dict:
    """The setting fields of ``cfg`` that differ from MisaConfig's defaults (variant always, and a
    routed variant's router always: a file then routes as it was written whatever the library's
    default router is)."""
    out = {"variant": cfg.variant}
    for f in _SETTING_FIELDS[1:]:
        v = getattr(cfg, f)
        if v != getattr(MisaConfig, f) or (f == "router" and VARIANTS[cfg.variant].routed):
            out[f] = v
    return out


def _check_layers(layers) -> None:
    if not isinstance(layers, tuple):
        raise ValueError(f"layers: expected a tuple of (layer index, MisaConfig) pairs, got {type(layers).__name__}")
    seen = set()
    for pair in layers:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], MisaConfig)):
            raise ValueError("layers: expected (layer index, MisaConfig) pairs")
        index, cfg = pair
        check_int("layers", index, 0)
        if index in seen:
            raise ValueError(f"layers: layer {index} given twice")
        if cfg.layers:
            raise ValueError(f"layers: layer {index}'s config has per-layer settings of its own")
        seen.add(index)


def as_misa_config(config) -> MisaConfig:
    """``config``, or ``MisaConfig()`` for None; anything else raises ``ValueError`` naming ``config``."""
    if config is None:
        return MisaConfig()
    if not isinstance(config, MisaConfig):
        raise ValueError(f"config: expected a MisaConfig, got {type(config).__name__}")
    return config


def _as_dict(model_config) -> dict:
    if isinstance(model_config, Mapping):
        return dict(model_config)
    if hasattr(model_config, "to_dict"):       # transformers.PretrainedConfig
        return model_config.to_dict()
    raise ValueError(f"model_config: expected a config.json dict or a transformers config, "
                     f"got {type(model_config).__name__}")


def _check_fields(values: dict, names: dict) -> None:
    """Validate MisaConfig field values; messages use ``names[field]`` where given."""
    def name(field):
        return names.get(field, field)

    variant = values["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"{name('variant')}: expected one of {tuple(VARIANTS)}, got {variant!r}")
    check_int(name("active_heads"), values["active_heads"])
    if values["decode_active_heads"] is not None:
        check_int(name("decode_active_heads"), values["decode_active_heads"])
    check_int(name("block_size"), values["block_size"])
    stage1_k = values["stage1_k"]
    if stage1_k is not None:
        check_int(name("stage1_k"), stage1_k)
        if variant == "misa":
            raise ValueError(f"{name('stage1_k')}: set with variant 'misa'; use variant "
                             "'misa-dagger' for the two-stage selection, or leave it unset")
    elif variant == "misa-dagger":
        raise ValueError(f"{name('stage1_k')}: variant 'misa-dagger' needs the number of stage-1 "
                         "candidates (the paper uses 4 * k = 8192)")
    if values["router"] not in ROUTER_STATISTICS:
        raise ValueError(f"{name('router')}: expected one of {ROUTER_STATISTICS}, got {values['router']!r}")
    check_int(name("hisa_block_size"), values["hisa_block_size"])
    check_int(name("hisa_block_k"), values["hisa_block_k"], 2)
    if values["workspace_bytes"] is not None:
        check_int(name("workspace_bytes"), values["workspace_bytes"])
    if values.get("backend") is not None and values["backend"] not in BACKENDS:
        raise ValueError(f"{name('backend')}: expected one of {BACKENDS} or None, got {values['backend']!r}")
    logits_dtype = values.get("logits_dtype")
    if logits_dtype is not None and logits_dtype not in LOGITS_DTYPE_NAMES:
        raise ValueError(f"{name('logits_dtype')}: expected one of {tuple(LOGITS_DTYPE_NAMES)} or None, "
                         f"got {logits_dtype!r}")
    if variant == "hisa" and logits_dtype not in (None, "float32"):
        raise ValueError(f"{name('logits_dtype')}: variant 'hisa' has no logits rows to store in {logits_dtype}")
