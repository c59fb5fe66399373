"""The coordinator's ``fed.toml`` (``uharmony fed serve|register --config``): TOML or JSON.

Every key has a default except ``domains``; unknown keys, wrong types and out-of-range values are
refused before anything starts, one line naming the key (exit 2). Relative paths are relative to the
config file's folder. README ("Running a federation") and docs/federation.md hold the same table as
the field comments below (`config_table_markdown`; a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from uharmony.errors import ExitCode, UHarmonyError
from uharmony.fed.aggregate import GATE_METHODS, MODES
from uharmony.train.config import (
    GateConfig,
    ModelConfig,
    _fill,
    doc_rows,
    read_config_values,
    resolved_domain_lr_scale,
    validate_augment,
    validate_network,
)

GATE_FEATURES = ("contrast", "random")
# The training config's negative-free gate keys; a federation sets them as gate_method/gate_pretrain_*.
_TRAIN_ONLY_GATE_KEYS = {"method": "gate_method", "pretrain_steps": "gate_pretrain_steps",
                         "pretrain_views": "gate_pretrain_views"}
DEFAULT_CLASSES = ("cerebrospinal fluid", "grey matter", "white matter", "lesion")


@dataclass
class FedTrainConfig:
    local_steps: int = 50  # optimiser steps each site trains per round
    batch_size: int = 2  # patches per step (1 with twice the local steps: as many patches in more, smaller steps; closer to centralized Dice in `bench fed`)
    patch_size: list[int] = field(default_factory=lambda: [64] * 3)  # training patch (= inference window), voxels
    spacing_mm: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])  # model grid spacing
    fg_prob: float = 0.67  # probability that a patch is centred on a foreground voxel
    lr: float = 3e-3  # peak learning rate (warm-up then poly decay over rounds x local_steps)
    domain_lr_scale: float = 0.0  # learning rate x this for each domain's own parameters (stage 2, head) at its site; 0: the number of the federation's domains (1 with aggregation = "fedavg")
    weight_decay: float = 1e-5  # AdamW weight decay on conv/linear weights
    poly_weight_decay: float = 1e-4  # weight of the penalty on stage-2 polynomial gammas (k >= 2)
    seed: int = 0  # seeds the initial model and (with the domain name) each site's steps
    gin: bool = True  # GIN augmentation at every site (FedGIN)
    gin_p: float = 0.5  # probability that a sample is GIN-augmented
    gin_kernel_sizes: list[int] = field(default_factory=lambda: [1, 3])  # GIN kernel sizes, one drawn per layer; [1] maps intensities voxel-wise
    ipa: bool = False  # IPA instead of plain GIN at every site: two GIN views, smooth-mask blend, KL consistency (2x cost)
    ipa_weight: float = 0.3  # weight of the KL consistency loss between the two IPA views
    amp: bool = True  # fp16 autocast on CUDA sites only
    eval_cases: int = 4  # at most this many of its validation cases each site evaluates per round


@dataclass
class FedConfig:
    domains: list[str] = field(default_factory=list)  # REQUIRED: the federation's domains, e.g. ["ct", "mri-t1"]
    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))  # foreground class names, in order
    channels: list[str] = field(default_factory=lambda: ["image"])  # input channel names (one file each)
    name: str = "uharmony-federated"  # the global model's name (its card's name)
    address: str = "0.0.0.0:9092"  # HOST:PORT the SuperLink listens on (sites, flwr CLI and ServerApp)
    out: str = "federation"  # folder for the global model, round log and the SuperLink's state
    ca_cert: str = "keys/ca.crt"  # CA certificate (from `uharmony fed keys ca`)
    server_cert: str = "keys/server.crt"  # the SuperLink's TLS certificate
    server_key: str = "keys/server.key"  # its private key
    insecure: bool = False  # no TLS, no site authentication: only when every end is on loopback
    rounds: int = 10  # federated rounds (a restarted coordinator continues up to this many)
    min_sites: int = 2  # sites needed to start a round (and to aggregate one)
    start_sites: int = 0  # sites to wait for before round 1 (0: min_sites), e.g. all registered sites
    round_timeout_s: float = 900.0  # how long a phase (train, evaluate) waits for replies
    deadline_s: float = 86400.0  # the whole run is stopped (and why is said) after this many seconds
    aggregation: str = "uharmony"  # uharmony (per-domain stage 2 + heads) or fedavg (plain model, all averaged)
    gate_method: str = "negative-free"  # negative-free (gate fitted from sites' feature statistics) or averaged
    gate_features: str = "contrast"  # negative-free gate's fixed features: contrast (pretrained encoder) or random
    gate_pretrain_steps: int = 1500  # steps of the contrast encoder's pretraining (cached per gate shape)
    gate_pretrain_views: int = 1800  # random-contrast synthetic views it pretrains on
    server_lr: float = 2.0  # server learning rate: the global model moves this many times the sites' mean update (1: plain FedAvg, the default with aggregation = "fedavg")
    reject_factor: float = 10.0  # reject updates whose norm exceeds this x the median of accepted norms
    gate_stats_limit: float = 5.0  # ignore a site's gate statistics beyond this many SDs of synthetic heads in every contrast
    evaluate: bool = True  # sites evaluate the new global model on their own cases every round
    train: FedTrainConfig = field(default_factory=FedTrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    # resolved at load time (not keys of the file)
    base: Path = field(default=Path("."), repr=False, compare=False)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p).resolve()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("base", None)
        return d


def _fail(msg: str, where) -> None:
    raise UHarmonyError(msg, where, code=ExitCode.USAGE)


def _validate(c: FedConfig, where) -> None:
    from uharmony.fed.flower import split_address

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            _fail(f"key {key!r} {what}", where)

    need(bool(c.domains), "domains", "is required: the federation's domain names, e.g. domains = [\"ct\", \"mri\"]")
    need(len(set(c.domains)) == len(c.domains), "domains", "must not repeat a name")
    import re

    need(all(re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", d) for d in c.domains), "domains",
         "must be names of letters, digits, '_' and '-'")
    need(bool(c.classes) and len({x.casefold() for x in c.classes}) == len(c.classes), "classes",
         "must be unique class names")
    need(bool(c.channels), "channels", "must name at least one channel")
    need(bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", c.name)), "name", "must be letters, digits, '.', '_', '-'")
    try:
        split_address(c.address, "address")
    except UHarmonyError as e:
        _fail(f"key 'address': {e.message}", where)
    need(c.rounds >= 1, "rounds", "must be >= 1")
    need(c.min_sites >= 1, "min_sites", "must be >= 1")
    need(c.start_sites >= 0, "start_sites", "must be >= 0")
    need(c.round_timeout_s > 0, "round_timeout_s", "must be > 0")
    need(c.deadline_s > 0, "deadline_s", "must be > 0")
    need(c.aggregation in MODES, "aggregation", f"must be one of {', '.join(MODES)}")
    need(c.gate_method in GATE_METHODS, "gate_method", f"must be one of {', '.join(GATE_METHODS)}")
    need(c.gate_features in GATE_FEATURES, "gate_features", f"must be one of {', '.join(GATE_FEATURES)}")
    need(c.gate_pretrain_steps >= 1, "gate_pretrain_steps", "must be >= 1")
    need(c.gate_pretrain_views >= 10, "gate_pretrain_views", "must be >= 10")
    need(c.gate_stats_limit > 0, "gate_stats_limit", "must be > 0")
    need(0 < c.server_lr <= 10, "server_lr", "must be in (0, 10]")
    need(c.reject_factor > 1, "reject_factor", "must be > 1")
    t = c.train
    need(t.local_steps >= 1, "train.local_steps", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(len(t.patch_size) == 3 and all(s >= 4 for s in t.patch_size), "train.patch_size", "must be 3 sizes >= 4")
    need(len(t.spacing_mm) == 3 and all(0.05 <= s <= 20 for s in t.spacing_mm), "train.spacing_mm",
         "must be 3 spacings between 0.05 and 20 mm")
    need(0 <= t.fg_prob <= 1, "train.fg_prob", "must be in [0, 1]")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(0 <= t.domain_lr_scale <= 100, "train.domain_lr_scale",
         "must be in [0, 100] (0: the number of the federation's domains)")
    need(t.weight_decay >= 0 and t.poly_weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.seed >= 0, "train.seed", "must be >= 0")
    validate_augment(t.gin_p, t.gin_kernel_sizes, t.ipa_weight, "train.", need)
    need(t.eval_cases >= 1, "train.eval_cases", "must be >= 1")
    validate_network(c.model, c.gate, t.patch_size, "train.patch_size", need)


def site_domain_lr_scale(settings: dict) -> float:
    """The factor a site's own-domain parameters learn at: `train.domain_lr_scale` of the settings
    (`FedConfig.to_dict()`), 0 resolved to the number of the federation's domains.

    A site trains only its domain, but on 1/D of the federation's steps, so its stage-2 parameters and head
    take 1/D of the steps the shared layers take in all, as in centralized training with D domains."""
    if settings["aggregation"] == "fedavg":  # a plain model has no per-domain parameters
        return 1.0
    return resolved_domain_lr_scale(settings["train"].get("domain_lr_scale", 0.0), len(settings["domains"]))


def load_fed_config(path: str | Path) -> FedConfig:
    where = str(path)
    p = Path(path)
    values = read_config_values(path)
    if "base" in values:
        _fail("unknown key 'base'", where)
    gate_values = values.get("gate")
    for key, fed_key in _TRAIN_ONLY_GATE_KEYS.items():
        if isinstance(gate_values, dict) and key in gate_values:
            _fail(f"key 'gate.{key}' is a training key; a federation sets {fed_key!r}", where)
    config = _fill(FedConfig, values, "", where, set())
    if config.aggregation == "fedavg" and "server_lr" not in values:
        config.server_lr = 1.0  # the FedGIN paper's setting is plain FedAvg; server_lr 2 was tuned for uharmony
    config.base = p.resolve().parent
    _validate(config, where)
    return config


def config_table_markdown() -> str:
    """The fed.toml key table of README/docs (a test keeps them equal)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, meaning in doc_rows(FedConfig, skip=("base",)):
        if key.startswith("gate.") and key[5:] in _TRAIN_ONLY_GATE_KEYS:
            continue
        if key.startswith(("model.", "gate.")):
            meaning = meaning or "as in docs/training.md"
        lines.append(f"| `{key}` | `{default}` | {meaning} |")
    return "\n".join(lines)
