"""Training and adaptation configs (``uharmony train|adapt --config FILE``): TOML or JSON.

Every key has a default; a file only names what it changes. Unknown keys, wrong types and
out-of-range values are refused before anything is loaded, one line naming the key (exit 2).
The key table with defaults and meanings is in ``docs/training.md`` and in each field's comment
below (``CONFIG_DOC`` holds the same text for programs).

A TOML example::

    method = "uharmony"
    steps = 2000
    patch_size = [64, 64, 64]
    [augment]
    gin = true
    gin_p = 0.5
    [model]
    filters = [16, 32, 64, 128]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from uharmony.device import DEVICE_CHOICES
from uharmony.errors import ExitCode, UHarmonyError

METHODS = ("uharmony", "joint", "separate", "oracle")
GATE_METHODS = ("trained", "negative-free")  # gate.method


@dataclass
class AugmentConfig:
    gin: bool = True  # GIN random-convolution intensity augmentation of the network's input
    gin_p: float = 0.5  # probability that a sample of a batch is augmented (GIN and IPA)
    gin_kernel_sizes: list[int] = field(default_factory=lambda: [1, 3])  # GIN kernel sizes, one drawn per layer; [1] maps intensities voxel-wise
    ipa: bool = False  # IPA instead of plain GIN: two GIN views, smooth-mask blend, KL consistency (2x cost)
    ipa_weight: float = 0.3  # weight of the KL consistency loss between the two IPA views


@dataclass
class ModelConfig:
    filters: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # DynUNet channels per level
    strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2])  # DynUNet strides per level (first is 1)
    harmony_levels: int = 2  # L: levels (encoder + matching decoder) with U-Harmony normalisation
    poly_degree: int = 3  # K: linear term plus Hermite terms He_2..He_K in stage 2
    clamp: float = 4.0  # stage-2 polynomials see the standardised input clamped to +-clamp
    poly_scale: float = 0.1  # stage-2 Hermite terms x this: their gammas then take Adam steps this much smaller in effect


@dataclass
class GateConfig:
    input_size: list[int] = field(default_factory=lambda: [32, 32, 32])  # the gate's low-resolution view
    filters: list[int] = field(default_factory=lambda: [16, 32, 64])  # gate CNN channels
    weight: float = 0.5  # weight of the gate's cross-entropy in the total loss
    batch_size: int = 8  # whole-image views per step for the gate (its own balanced draw; views are cheap)
    augment: bool = True  # flip, rotate, scale, shift and lightly re-light the gate's views (never GIN)
    framing: float = 0.0  # > 0: views of scans cropped/padded by up to this per side (as refit-gate --framing)
    method: str = "negative-free"  # negative-free (fixed contrast encoder, LDA routing) or trained (cross-entropy with the network)
    pretrain_steps: int = 1500  # negative-free: steps of the contrast encoder's pretraining (cached per gate shape)
    pretrain_views: int = 1800  # negative-free: random-contrast synthetic views it pretrains on


@dataclass
class TrainConfig:
    method: str = "uharmony"  # uharmony, joint, separate or oracle (see "Methods")
    steps: int = 2000  # optimiser steps
    batch_size: int = 2  # patches per step (domains drawn uniformly, then a case of that domain)
    patch_size: list[int] = field(default_factory=lambda: [64] * 3)  # training patch, voxels (= inference window)
    spacing_mm: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])  # model grid spacing
    fg_prob: float = 0.67  # probability that a patch is centred on a foreground voxel
    class_balance: bool = False  # that voxel's class drawn uniformly among the case's classes (small ones too)
    lr: float = 3e-3  # peak learning rate (AdamW; linear warm-up over 5% of the steps, then poly decay 0.9)
    weight_decay: float = 1e-5  # AdamW weight decay on conv/linear weights (not on norms, U-Harmony or biases)
    poly_weight_decay: float = 1e-4  # weight of polynomial_penalty: sum of squares of every gamma_k, k >= 2
    domain_lr_scale: float = 0.0  # learning rate x this for each domain's own parameters (stage 2, head); 0: the number of domains trained
    seed: int = 0  # every step's randomness is a function of (seed, step)
    val_every: int = 200  # validate every this many steps (0: only at the end)
    val_cases: int = 8  # at most this many validation cases per domain in each validation
    checkpoint_every: int = 100  # write a checkpoint every this many steps (0: never)
    device: str = "auto"  # auto, cpu, cuda or mps (--device overrides it)
    amp: bool = True  # fp16 autocast + grad scaling on CUDA only (U-Harmony layers stay fp32)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Defaults that differ for `uharmony adapt` (fewer steps, a gentler learning rate).
ADAPT_DEFAULTS = {"steps": 300, "lr": 1e-3, "val_every": 0, "checkpoint_every": 50}
# Keys an adaptation takes from the base model; setting them in an adapt config is an error.
FIXED_BY_BASE = ("method", "spacing_mm", "model.filters", "model.strides", "model.harmony_levels",
                 "model.poly_degree", "model.clamp", "model.poly_scale", "gate.input_size", "gate.filters",
                 "gate.method", "gate.pretrain_steps", "gate.pretrain_views")
# Keys that do not change the trained weights, so --resume accepts a change of them.
RESUME_FREE = ("device", "val_every", "val_cases", "checkpoint_every")


def _sections() -> dict[str, type]:
    return {"augment": AugmentConfig, "model": ModelConfig, "gate": GateConfig}


def _fail(msg: str, where) -> None:
    raise UHarmonyError(msg, where, code=ExitCode.USAGE)


def _check_type(value: Any, hint, key: str, where) -> Any:
    text = str(hint)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(f"key {key!r} must be true or false, not {value!r}", where)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"key {key!r} must be an integer, not {value!r}", where)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(f"key {key!r} must be a number, not {value!r}", where)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(f"key {key!r} must be a string, not {value!r}", where)
        return value
    if text.startswith("list["):
        inner = hint.__args__[0]
        if not isinstance(value, list) or not value:
            _fail(f"key {key!r} must be a non-empty list, not {value!r}", where)
        return [_check_type(v, inner, key, where) for v in value]
    raise AssertionError(hint)  # pragma: no cover


def _fill(cls, values: dict, prefix: str, where, given: set[str]):
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    obj = cls()
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(n for n in names)
            _fail(f"unknown key {full!r} (known{' in [' + prefix[:-1] + ']' if prefix else ''}: {known})", where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                _fail(f"key {full!r} must be a table/object of settings, not {value!r}", where)
            setattr(obj, key, _fill(hint, value, full + ".", where, given))
        else:
            setattr(obj, key, _check_type(value, hint, full, where))
            given.add(full)
    return obj


def resolved_domain_lr_scale(scale: float, domains_trained: int) -> float:
    """The learning-rate factor of each domain's own parameters: ``scale`` (`domain_lr_scale`), or with 0 the
    number of domains trained together. Each domain's stage-2 parameters and head are in the graph only for
    its own patches, 1/D of them, while the shared layers learn from all; at the same Adam step size they
    lagged (bench generalize at 500 steps: CT 15.7 -> 31.3 Dice with the factor 3, seed 0)."""
    return float(scale) if scale > 0 else float(max(1, domains_trained))


def validate_model(m: ModelConfig, need) -> None:
    """The ``[model]`` keys' ranges, shared by training and federation configs; ``need(ok, key, what)``."""
    need(len(m.filters) == len(m.strides) >= 3, "model.filters",
         f"must have as many entries as model.strides (>= 3, as DynUNet needs); got {len(m.filters)} and {len(m.strides)}")
    need(all(f >= 1 for f in m.filters), "model.filters", "must be positive")
    need(m.strides[0] == 1 and all(s in (1, 2) for s in m.strides), "model.strides", "must be 1 or 2, the first 1")
    need(0 <= m.harmony_levels <= len(m.strides), "model.harmony_levels", f"must be in 0..{len(m.strides)}")
    need(m.poly_degree >= 1, "model.poly_degree", "must be >= 1")
    need(m.clamp > 0, "model.clamp", "must be > 0")
    need(0 < m.poly_scale <= 1, "model.poly_scale", "must be in (0, 1]")


def validate_network(m: ModelConfig, gate: GateConfig, patch_size, patch_key: str, need) -> None:
    """`validate_model`, the patch size against the network's total stride, and the ``[gate]`` shape;
    shared by training and federation configs (the patch size is ``patch_key`` in each)."""
    validate_model(m, need)
    factor = 1
    for s in m.strides:
        factor *= s
    need(all(p % factor == 0 for p in patch_size), patch_key, f"must be divisible by the network's total stride {factor}")
    need(len(gate.input_size) == 3 and all(s >= 4 for s in gate.input_size), "gate.input_size",
         "must be 3 sizes >= 4")
    need(len(gate.filters) >= 2 and all(f >= 1 for f in gate.filters), "gate.filters",
         "must be >= 2 positive channel counts")
    need(gate.weight >= 0, "gate.weight", "must be >= 0")


def validate_augment(gin_p: float, kernel_sizes: list, ipa_weight: float, prefix: str, need) -> None:
    """GIN/IPA settings, for a training config (``augment.``) and a federation's (``train.``) alike."""
    need(0.0 <= gin_p <= 1.0, prefix + "gin_p", "must be in [0, 1]")
    need(ipa_weight >= 0, prefix + "ipa_weight", "must be >= 0")
    need(isinstance(kernel_sizes, list) and len(kernel_sizes) >= 1
         and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in kernel_sizes),
         prefix + "gin_kernel_sizes", "must be a list of odd positive kernel sizes, such as [1, 3] or [1]")


def _validate(c: TrainConfig, where) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            _fail(f"key {key!r} {what}", where)

    need(c.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, not {c.method!r}")
    need(c.steps >= 1, "steps", "must be >= 1")
    need(c.batch_size >= 1, "batch_size", "must be >= 1")
    need(len(c.patch_size) == 3 and all(s >= 4 for s in c.patch_size), "patch_size", "must be 3 sizes >= 4")
    need(len(c.spacing_mm) == 3 and all(0.05 <= s <= 20 for s in c.spacing_mm), "spacing_mm",
         "must be 3 spacings between 0.05 and 20 mm")
    need(0.0 <= c.fg_prob <= 1.0, "fg_prob", "must be in [0, 1]")
    need(c.lr > 0, "lr", "must be > 0")
    need(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(c.poly_weight_decay >= 0, "poly_weight_decay", "must be >= 0")
    need(0 <= c.domain_lr_scale <= 100, "domain_lr_scale", "must be in [0, 100] (0: the number of domains trained)")
    need(c.seed >= 0, "seed", "must be >= 0")
    need(c.val_every >= 0, "val_every", "must be >= 0")
    need(c.val_cases >= 1, "val_cases", "must be >= 1")
    need(c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
    need(c.device in DEVICE_CHOICES, "device", "must be auto, cpu, cuda or mps")
    validate_augment(c.augment.gin_p, c.augment.gin_kernel_sizes, c.augment.ipa_weight, "augment.", need)
    validate_network(c.model, c.gate, c.patch_size, "patch_size", need)
    need(c.gate.batch_size >= 1, "gate.batch_size", "must be >= 1")
    need(0 <= c.gate.framing < 0.5, "gate.framing", "must be in [0, 0.5)")
    need(c.gate.method in GATE_METHODS, "gate.method", f"must be one of {', '.join(GATE_METHODS)}")
    need(c.gate.pretrain_steps >= 1, "gate.pretrain_steps", "must be >= 1")
    need(c.gate.pretrain_views >= 10, "gate.pretrain_views", "must be >= 10")
    need(not (c.gate.method == "negative-free" and c.gate.framing > 0), "gate.framing",
         "must be 0 with gate.method = negative-free (reframed views are for a trained gate)")


def parse_gin_options(items: list[str], where: str = "--gin-option") -> dict:
    """``KEY=VALUE`` strings (VALUE in JSON: ``ipa=true``, ``gin_kernel_sizes=[1]``) -> checked `augment`
    keys for the runs with GIN on; `gin` itself is the benchmark's --gin. A one-line error (exit 2) names
    the first bad item."""
    options: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("augment.")
        if not sep or not key:
            _fail(f"{item!r} must be KEY=VALUE, such as ipa=true or gin_kernel_sizes=[1]", where)
        if key == "gin":
            _fail("GIN is switched on and off by --gin, not by an option", where)
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            _fail(f"{item!r}: the value must be JSON (true, 0.25, [1])", where)
    _validate(_fill(TrainConfig, {"augment": {"gin": True, **options}}, "", where, set()), where)
    return options


def read_config_values(path: str | Path) -> dict:
    """The settings table of a .toml or .json config file; a one-line error (exit 2) when unreadable."""
    where = str(path)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        _fail("config file does not exist", where)
    except OSError as e:
        _fail(f"config file cannot be read ({e.strerror or e})", where)
    if p.suffix.lower() == ".json":
        try:
            values = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail(f"is not valid JSON ({' '.join(str(e).split())})", where)
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            _fail("TOML configs need Python >= 3.11; write the config as .json", where)
        try:
            values = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            _fail(f"is not valid TOML ({' '.join(str(e).split())})", where)
    if not isinstance(values, dict):
        _fail("a config must be a table/object of settings", where)
    return values


def load_config(path: str | Path | None, *, kind: str = "train", overrides: dict | None = None
                ) -> tuple[TrainConfig, set[str]]:
    """Read and check a config file (None: all defaults). Returns the config and the keys the file set.

    ``kind="adapt"`` starts from `ADAPT_DEFAULTS` and refuses the keys in `FIXED_BY_BASE`.
    """
    values: dict = {}
    where = None
    if path is not None:
        where = str(path)
        values = read_config_values(path)
    given: set[str] = set()
    config = _fill(TrainConfig, values, "", where, given)
    if kind == "adapt":
        bad = sorted(k for k in given if k in FIXED_BY_BASE)
        if bad:
            _fail(f"key {bad[0]!r} is fixed by the base model in an adaptation (remove it)", where)
        for k, v in ADAPT_DEFAULTS.items():
            if k not in given:
                setattr(config, k, v)
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(config, k, v)
            given.add(k)
    _validate(config, where)
    return config, given


def config_hash(config: TrainConfig, extra: dict | None = None) -> str:
    """What a checkpoint must match to be resumed: the config without `RESUME_FREE` keys, plus `extra`."""
    d = config.to_dict()
    for k in RESUME_FREE:
        d.pop(k, None)
    blob = json.dumps({"config": d, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def doc_rows(config_cls, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every key of a config dataclass (nested ones as `a.b`), from its
    defaults and its source comments; the training and federation key tables both come from here."""
    import inspect

    rows = []

    def walk(cls, prefix):
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            s = line.strip()
            if ":" in s and "#" in s and not s.startswith("#"):
                comments[s.split(":")[0].strip()] = s.split("#", 1)[1].strip()
        obj = cls()
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, json.dumps(value), comments.get(f.name, "")))

    walk(config_cls, "")
    return rows


def config_table_markdown() -> str:
    """The key table of docs/training.md (a test keeps the two equal)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, meaning in doc_rows(TrainConfig):
        adapt = ADAPT_DEFAULTS.get(key)
        if adapt is not None:
            default += f" (adapt: {json.dumps(adapt)})"
        if key in FIXED_BY_BASE:
            meaning += " (adapt: taken from the base model)"
        if key == "patch_size":
            meaning += " (adapt: the base model's unless set)"
        lines.append(f"| `{key}` | `{default}` | {meaning} |")
    return "\n".join(lines)
