"""The site's ClientApp: local training with GIN and local evaluation, with the trainer's own step.

The site's settings (its datalist, device, where to log events) come from the site itself, never from
the server: `uharmony fed join` writes them to a private JSON file whose path the site executor passes
in ``UHARMONY_FED_SITE_SETTINGS``. The server's message carries the global arrays and the round's
training settings (``config``: round numbers, architecture, classes, local steps, learning rate, ...).

Training a round = the trainer's `train_step` for steps ``(r-1)*L+1 .. r*L`` of a schedule of
``rounds*L`` steps (warm-up and decay span the whole federation), balanced over the site's cases, GIN
on the network's input, and the gate's cross-entropy on its own domain (``gate_method = "averaged"``)
or, by default (``"negative-free"``), no gate training but the statistics of the fixed gate's features
over the site's cases (`gate_feature_stats`). What goes back is in `uharmony.fed.messages` (names,
shapes, sample count, domain, whitelisted scalars only).
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from uharmony.fed import messages as M

app = ClientApp()


@dataclass
class Site:
    """A site's prepared data for one round."""

    domain: str
    train: list  # Prepared
    evaluate: list  # Prepared
    classes: list[str]
    settings: dict


def site_settings() -> dict:
    path = os.environ.get("UHARMONY_FED_SITE_SETTINGS")
    if not path:
        raise RuntimeError("UHARMONY_FED_SITE_SETTINGS is not set: this ClientApp runs under `uharmony fed join`")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def round_settings(config) -> dict:
    return {"round": int(config["global-round"]), "rounds": int(config["num-rounds"]),
            "sites": int(config["num-sites"]), "arch": json.loads(config["arch"]),
            "classes": json.loads(config["classes"]), "train": json.loads(config["train"])}


def load_site(settings: dict, rs: dict, gate_view) -> Site:
    from uharmony.data.datalist import union_label_space
    from uharmony.errors import BadDatalistError
    from uharmony.progress import Reporter
    from uharmony.train.data import load_datasets
    from uharmony.train.trainer import prepare_items

    datasets = load_datasets([settings["data"]])
    classes = rs["classes"]
    union, maps = union_label_space(datasets, base=classes)
    if len(union) != len(classes):
        raise BadDatalistError(f"class(es) {union[len(classes):]} are not among the federation's classes "
                               f"{classes[1:]}", settings["data"])
    domain = datasets[0].domain
    arch_domains = rs["arch"]["domains"]
    if not rs["train"]["joint"] and domain not in arch_domains:
        raise BadDatalistError(f"domain {domain!r} is not one of the federation's domains {arch_domains}",
                               settings["data"])
    spacing = rs["train"]["spacing_mm"]
    quiet = Reporter("none")
    train = prepare_items(datasets, maps, union, spacing, gate_view, quiet, split="training")
    val = prepare_items(datasets, maps, union, spacing, gate_view, quiet, split="validation") or train
    return Site(domain=domain, train=train, evaluate=val[: int(rs["train"]["eval_cases"])], classes=classes,
                settings=settings)


def build_model(rs: dict, arrays):
    import torch

    from uharmony.model.network import ArchConfig, UHarmonyNet
    from uharmony.model.package import load_portable_state_dict, portable_state_dict

    model = UHarmonyNet(ArchConfig.from_dict(rs["arch"]))
    full = portable_state_dict(model)
    for k, v in M.from_arrays(arrays).items():  # Flower sends 0-d arrays as shape (1,): reshape by name
        if k in full and v.size == full[k].numel():
            full[k] = torch.from_numpy(v.copy()).reshape(full[k].shape)
    load_portable_state_dict(model, full)
    return model


def train_config(rs: dict, domain: str):
    from uharmony.train.config import GateConfig, TrainConfig

    t = rs["train"]
    return TrainConfig(steps=rs["rounds"] * t["local_steps"], batch_size=t["batch_size"], patch_size=t["patch_size"],
                       spacing_mm=t["spacing_mm"], fg_prob=t["fg_prob"], lr=t["lr"], weight_decay=t["weight_decay"],
                       poly_weight_decay=t["poly_weight_decay"], domain_lr_scale=site_lr_scale(t),
                       seed=int(t["seed"]) * 1000003 + zlib.crc32(domain.encode()) % 1000003,
                       amp=t["amp"], augment=site_augment(t),
                       gate=GateConfig(input_size=rs["arch"]["gate_input_size"], filters=rs["arch"]["gate_filters"],
                                       weight=t["gate_weight"]))


def site_augment(t: dict):
    """The GIN/IPA settings the coordinator sent, checked as a config file's are (a ValueError names the first
    bad one); keys a coordinator that predates them does not send take the defaults."""
    import dataclasses

    from uharmony.train.config import AugmentConfig, validate_augment

    received = {f.name: t[f.name] for f in dataclasses.fields(AugmentConfig) if f.name in t}
    a = dataclasses.replace(AugmentConfig(), **received)  # the training defaults for keys not sent

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"the coordinator sent {key} = {t.get(key.removeprefix('train.'))!r}; it {what}")

    for key in ("gin", "ipa"):
        need(isinstance(getattr(a, key), bool), "train." + key, "must be true or false")
    for key in ("gin_p", "ipa_weight"):
        value = getattr(a, key)
        need(isinstance(value, (int, float)) and not isinstance(value, bool), "train." + key, "must be a number")
    validate_augment(a.gin_p, a.gin_kernel_sizes, a.ipa_weight, "train.", need)
    return a


def site_lr_scale(t: dict) -> float:
    """The coordinator's resolved `domain_lr_scale` (1 from a coordinator that predates it); a received value
    outside (0, 100] is refused, as the config loader would."""
    scale = float(t.get("domain_lr_scale", 1.0))
    if not 0 < scale <= 100:
        raise ValueError(f"the coordinator sent domain_lr_scale = {scale}; a site accepts (0, 100]")
    return scale


def local_train(rs: dict, arrays, settings: dict, device=None) -> tuple[dict, int, dict]:
    """Train one round locally; returns (arrays to send, sample count, metrics)."""
    import numpy as np
    import torch

    from uharmony.device import choose_device
    from uharmony.train.data import BalancedSampler
    from uharmony.train.losses import MarginalDiceCELoss
    from uharmony.train.trainer import LoopState, make_optimizer, train_step

    dev = device or choose_device(settings.get("device", "auto"))
    model = build_model(rs, arrays)
    site = load_site(settings, rs, model.gate.downsample)
    cfg = train_config(rs, site.domain)
    joint = rs["train"]["joint"]
    fixed_gate = fixed_gate_of(rs)
    if fixed_gate and len(site.train) < M.MIN_STATS_CASES:  # the mean of one case would be that case's features
        from uharmony.errors import BadDatalistError

        raise BadDatalistError(f"the federation's negative-free gate needs at least {M.MIN_STATS_CASES} training "
                               f"cases per site, this datalist has {len(site.train)}", settings["data"])
    route = {site.domain: 0 if joint else model.domains.index(site.domain)}
    model = model.to(dev)
    state = LoopState(model=model, config=cfg, items=site.train,
                      sampler=BalancedSampler([{site.domain: list(range(len(site.train)))}]), route=route,
                      device=dev, patch=tuple(cfg.patch_size), train_gate=not joint and not fixed_gate)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp and dev.type == "cuda")
    loss_fn = MarginalDiceCELoss(model.config.num_classes)
    local = rs["train"]["local_steps"]
    first = (rs["round"] - 1) * local
    losses = []
    t0 = time.time()
    for step in range(first + 1, first + local + 1):
        losses.append(train_step(state, min(step, cfg.steps), optimizer, scaler, loss_fn)["loss"])
    seconds = time.time() - t0
    from uharmony.model.package import portable_state_dict

    tensors = portable_state_dict(model.cpu())
    keys = M.site_keys(list(tensors), list(model.domains), site.domain, fixed_gate)
    out = {k: tensors[k].numpy() for k in keys}
    stats = gate_feature_stats(model, site.train) if fixed_gate else None
    fault = fault_for(settings, rs["round"])
    if fault is not None:  # fault injection for tests only (see `fault_for`)
        sent = M.from_arrays(arrays)
        out = {k: (sent[k] + fault * (v - sent[k])).astype(v.dtype) for k, v in out.items()}
    metrics = {"loss": float(np.mean(losses)), "train_seconds": seconds}
    return out, len(site.train), {**metrics, "domain": site.domain, "gate_stats": stats}


def fixed_gate_of(rs: dict) -> bool:
    """Negative-free gate: fixed convolutions, never trained at a site; the site sends feature statistics.

    The coordinator resolves the method (`server_app.gate_method_of`: "averaged" for a plain FedAvg model).
    """
    return rs["train"].get("gate_method") == "negative-free"


def gate_feature_stats(model, items):
    """Count, mean and scatter of the fixed gate's pooled features over the site's un-augmented views; mean and
    scatter diagonal of its style features (for the unfamiliar-input score)."""
    from uharmony.fed.aggregate import FeatureStats
    from uharmony.train.gate import gate_features

    dim = model.gate.pooled_dim
    feats = gate_features(model, items).double().numpy()
    return FeatureStats.of(feats[:, -dim:], style=feats[:, :-dim])


def unfamiliar_max(model, items, domain: str) -> float | None:
    """The largest unfamiliar-input score of the items under the received model's calibration: the
    coordinator sets the flag's threshold from the sites' values. None while the site's own domain has
    no fitted Gaussian."""
    from uharmony.train.gate import gate_features

    if not items or float(model.gate.calibration[domain].count) <= 0:
        return None
    return float(model.gate.unfamiliar_score(gate_features(model, items).to(next(model.parameters()).device)).max())


def fault_for(settings: dict, round_no: int) -> float | None:
    """Test-only fault injection from the site's own settings: ``{"fault": {"scale": 100, "round": 2}}``.

    Scales the site's update (local - global) in that round, as a broken or hostile site would. It
    is never set by the server and `uharmony fed join` sets it only from ``UHARMONY_FED_FAULT``.
    """
    f = settings.get("fault") or {}
    if f.get("round") == round_no and f.get("scale"):
        return float(f["scale"])
    return None


def local_evaluate(rs: dict, arrays, settings: dict, device=None) -> tuple[int, dict, str]:
    """Dice per class (gate-routed, as `uharmony segment`) and gate accuracy on the site's own cases."""
    from uharmony.device import choose_device
    from uharmony.train.trainer import evaluate

    dev = device or choose_device(settings.get("device", "auto"))
    model = build_model(rs, arrays)
    site = load_site(settings, rs, model.gate.downsample)
    model = model.to(dev)
    joint = rs["train"]["joint"]
    result = evaluate(model, {site.domain: site.evaluate}, site.classes, mode="joint" if joint else "auto",
                      patch=tuple(rs["train"]["patch_size"]), device=dev)
    dice = {k: v for k, v in result["dice"][site.domain].items() if v is not None}
    metrics = {"dice": dice, "gate_accuracy": result["gate_accuracy"][site.domain]}
    if fixed_gate_of(rs):
        metrics["unfamiliar_max"] = unfamiliar_max(model, site.evaluate, site.domain)
    return len(site.train), metrics, site.domain


def _event(settings: dict, entry: dict) -> None:
    path = settings.get("events")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _reply(msg: Message, samples: int, metrics: dict, classes: list[str], domain: str, arrays=None,
           gate_stats=None) -> Message:
    content = {M.METRICS: M.metrics_record(samples, metrics, classes[1:]),
               M.SITE_RECORD: ConfigRecord({"domain": domain})}
    if arrays is not None:
        content[M.ARRAYS] = M.to_arrays(arrays)
    if gate_stats is not None:
        content[M.GATE_STATS] = M.gate_stats_record(gate_stats)
    return Message(RecordDict(content), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = site_settings()
    rs = round_settings(msg.content[M.CONFIG])
    arrays, samples, info = local_train(rs, msg.content[M.ARRAYS], settings)
    _event(settings, {"phase": "train", "round": rs["round"], "total": rs["rounds"], "sites": rs["sites"],
                      "loss": info["loss"], "seconds": round(info["train_seconds"], 2)})
    metrics = {"loss": info["loss"] if math.isfinite(info["loss"]) else None}
    return _reply(msg, samples, metrics, rs["classes"], info["domain"], arrays, info["gate_stats"])


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = site_settings()
    rs = round_settings(msg.content[M.CONFIG])
    samples, metrics, domain = local_evaluate(rs, msg.content[M.ARRAYS], settings)
    _event(settings, {"phase": "evaluate", "round": rs["round"], "total": rs["rounds"], "sites": rs["sites"],
                      **metrics})
    return _reply(msg, samples, metrics, rs["classes"], domain)
