"""`uharmony train`: one model learned jointly from several datalists (DESIGN.md, "Method").

Per step: a domain is drawn uniformly, then a case of it (balanced sampling), then a patch centred
on foreground with probability ``fg_prob``; GIN (or IPA) changes the network's input only, on the
training device; the loss is the marginal partial-label Dice+CE of each case's annotated classes
(union label space), plus, with ``gate.method = "trained"``, the gate's cross-entropy on whole
low-resolution images (never GIN: its own larger batch of geometrically jittered views,
`uharmony.train.gate`; the default negative-free gate is fitted once by LDA, before the first step,
and is not in the loss), plus the polynomial penalty. Every step's randomness comes from
``numpy.random.default_rng([seed, step])`` (case, patch, the seed of the ``torch.Generator`` GIN draws
from, the gate's batch and jitter), so a run resumed from a checkpoint is the same as an uninterrupted
one (bit-identical on the CPU).

Methods (config ``method``): ``uharmony`` (U-Harmony layers, one head per domain, the gate routes
at inference); ``oracle`` (trained identically; evaluated with the true domain, and the card says
so); ``joint`` (plain InstanceNorm, one head, no gate training: the baseline); ``separate`` (the
``joint`` network trained on each datalist alone: one package per datalist in ``OUT/<dataset name>``).
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from uharmony import __version__
from uharmony.augment.views import FOV_VIEWS, framed_views
from uharmony.data.datalist import Dataset, union_label_space
from uharmony.data.preprocess import DEFAULT_NORMALIZATION
from uharmony.device import autocast, choose_device
from uharmony.errors import ExitCode, OutputError, UHarmonyError
from uharmony.model.network import ArchConfig, UHarmonyNet, polynomial_penalty
from uharmony.model.package import save_package
from uharmony.model.terminology import standard_class
from uharmony.progress import Reporter
from uharmony.train.checkpoint import checkpoint_dir, load_checkpoint, read_checkpoint_state, save_checkpoint
from uharmony.train.config import TrainConfig, config_hash, load_config, resolved_domain_lr_scale
from uharmony.train.data import BalancedSampler, Prepared, datalist_sha256, load_datasets, prepare_case, random_patch
from uharmony.train.gate import domain_feature_stats, fit_routing, gate_loss, use_contrast_encoder
from uharmony.train.losses import MarginalDiceCELoss

OVERLAP = 0.5  # sliding-window overlap for validation and in the card (what `uharmony segment` uses)
JOINT_DOMAIN = "joint"
ROUTING_TEXT = {"auto": "the gate, as --domain auto", "oracle": "the true domain (oracle)", "joint": "one head"}


# ------------------------------------------------------------------------------------ the step loop


@dataclass
class LoopState:
    """What the step loop needs; built by `uharmony train` and `uharmony adapt` alike."""

    model: UHarmonyNet
    config: TrainConfig
    items: list[Prepared]  # training cases
    sampler: BalancedSampler
    route: dict[str, int]  # case domain -> model domain index used for routing and the gate target
    device: torch.device
    patch: tuple[int, int, int]
    train_gate: bool = True
    history: list[dict] = field(default_factory=list)
    gate_sampler: BalancedSampler | None = None  # the gate's batches; None: `sampler`

    def __post_init__(self):
        if self.gate_sampler is None:
            self.gate_sampler = self.sampler


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up over 5 % of the steps, then polynomial decay (power 0.9); a function of the step only."""
    warm = max(1, round(0.05 * config.steps))
    return config.lr * min(1.0, step / warm) * (1.0 - (step - 1) / config.steps) ** 0.9


def make_optimizer(model: torch.nn.Module, config: TrainConfig, domains_trained: int = 1) -> torch.optim.Optimizer:
    """AdamW: weight decay on conv/linear weights only; each domain's own parameters (U-Harmony stage 2,
    heads) in a group whose learning rate is `domain_lr_scale` x the schedule's (its ``lr_scale``)."""
    scale = resolved_domain_lr_scale(config.domain_lr_scale, domains_trained)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        own = ".harmony." in name or name.startswith("heads.")
        groups.setdefault((p.ndim > 1 and ".harmony." not in name, own), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
                               "lr_scale": scale if own else 1.0} for (decay, own), params in groups.items()],
                             lr=config.lr)


def start_optimizer(model: torch.nn.Module, config: TrainConfig, domains_trained: int, device: torch.device,
                    checkpoint: tuple[Path, dict] | None, reporter: Reporter):
    """The optimiser and AMP grad scaler, restored with the model from ``checkpoint`` (the step folder and
    its state, from `check_resume`) when resuming: (optimizer, scaler, first step)."""
    optimizer = make_optimizer(model, config, domains_trained)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    start = 0
    if checkpoint is not None:
        step_dir, ck_state = checkpoint
        start = load_checkpoint(step_dir, ck_state, model=model, optimizer=optimizer, scaler=scaler)
        reporter.log(f"resuming from step {start} of {config.steps} ({step_dir})")
    return optimizer, scaler, start


def train_step(state: LoopState, step: int, optimizer, scaler, loss_fn: MarginalDiceCELoss) -> dict:
    """One optimiser step; all its randomness comes from (seed, step)."""
    from uharmony.augment.gin import GIN, IPA, consistency_kl

    cfg, model, device = state.config, state.model, state.device
    rng = np.random.default_rng([cfg.seed, step])
    chosen = [state.sampler.draw(rng) for _ in range(cfg.batch_size)]
    patches = [random_patch(state.items[i], rng, state.patch, cfg.fg_prob, cfg.class_balance) for i in chosen]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    x = torch.stack([p[0] for p in patches]).to(device)
    y = torch.stack([p[1] for p in patches]).to(device).long()
    annotated = [state.items[i].annotated for i in chosen]
    target = torch.tensor([state.route[state.items[i].domain] for i in chosen], device=device)
    routing = F.one_hot(target, len(model.domains)).float()
    for g in optimizer.param_groups:
        g["lr"] = lr_at(cfg, step) * g.get("lr_scale", 1.0)

    model.train()
    out: dict = {}
    with autocast(device) if cfg.amp else contextlib.nullcontext():
        if cfg.augment.ipa:
            view_a, view_b = IPA(p=cfg.augment.gin_p, generator=generator, kernel_sizes=cfg.augment.gin_kernel_sizes)(x)
            la, lb = model(view_a, routing), model(view_b, routing)
            seg = 0.5 * (loss_fn(la, y, annotated) + loss_fn(lb, y, annotated))
            kl = consistency_kl(la, lb)
            seg = seg + cfg.augment.ipa_weight * kl
            out["kl"] = float(kl.detach())
        else:
            if cfg.augment.gin:
                x = GIN(p=cfg.augment.gin_p, generator=generator, kernel_sizes=cfg.augment.gin_kernel_sizes)(x)
            seg = loss_fn(model(x, routing), y, annotated)
        total = seg
        if state.train_gate and len(model.domains) > 1 and cfg.gate.weight > 0:
            # its own batch, drawn last so the segmentation part of a step does not depend on it
            gate = gate_loss(model, state.items, state.gate_sampler, state.route, rng, batch_size=cfg.gate.batch_size,
                             augment=cfg.gate.augment, device=device, framing=cfg.gate.framing)
            total = total + cfg.gate.weight * gate
            out["gate"] = float(gate.detach())
        if cfg.poly_weight_decay > 0:
            total = total + cfg.poly_weight_decay * polynomial_penalty(model)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    out.update(loss=float(total.detach()), seg=float(seg.detach()))
    if not math.isfinite(out["loss"]):
        raise UHarmonyError(f"the loss became {out['loss']} at step {step}; lower lr or turn amp off",
                            code=ExitCode.INTERNAL)
    return out


def run_steps(state: LoopState, *, start: int, reporter: Reporter, ckpt: Path | None, meta: dict,
              optimizer, scaler, validate) -> tuple[float, float]:
    """Steps start+1..steps with checkpoints and validations; returns (seconds, mean loss since the last validation)."""
    cfg = state.config
    loss_fn = MarginalDiceCELoss(state.model.config.num_classes)
    t0 = time.time()
    window: list[float] = []
    reporter.progress("train", start, cfg.steps)
    for step in range(start + 1, cfg.steps + 1):
        out = train_step(state, step, optimizer, scaler, loss_fn)
        window.append(out["loss"])
        state.history.append({"step": step, **out})
        if ckpt is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(ckpt, step=step, model=state.model, optimizer=optimizer, scaler=scaler, meta=meta)
        reporter.progress("train", step, cfg.steps)
        if validate is not None and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            validate(step, float(np.mean(window)))
            window = []
    return time.time() - t0, (float(np.mean(window)) if window else float("nan"))


# ------------------------------------------------------------------------------------- evaluation


def route_index(model: UHarmonyNet, item: Prepared, mode: str) -> tuple[int, int]:
    """(routing index, gate's argmax) for a case: mode auto (the gate), oracle (its true domain), joint."""
    with torch.no_grad():
        logits, _ = model.gate(item.small[None].to(next(model.parameters()).device))
    gate_choice = int(logits.argmax(1))
    if mode == "oracle":
        return model.domains.index(item.domain), gate_choice
    if mode == "joint":
        return 0, gate_choice
    return gate_choice, gate_choice


def predict(model: UHarmonyNet, item: Prepared, routing: int, patch, device, overlap: float = OVERLAP) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    x = item.image[None].to(device)
    with torch.no_grad():
        logits = sliding_window_inference(
            x, roi_size=tuple(patch), sw_batch_size=1, overlap=overlap, mode="gaussian", padding_mode="constant",
            cval=float(x.min()), predictor=lambda p: _routed(model, p, routing, device))
    return logits[0].float().argmax(0).cpu()


def _routed(model, patches, routing, device):
    with autocast(device):
        return model(patches, routing)


def case_dice(pred: torch.Tensor, ref: torch.Tensor, annotated: list[int]) -> dict[int, float]:
    """Dice per annotated class; predicted classes the case does not annotate count as background."""
    out = {}
    for c in annotated:
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out[c] = 2.0 * int((p & r).sum()) / denom if denom else float("nan")
    return out


def evaluate(model: UHarmonyNet, items: dict[str, list[Prepared]], classes: list[str], *, mode: str, patch,
             device, reporter: Reporter | None = None, overlap: float = OVERLAP) -> dict:
    """Dice per class and gate accuracy per domain (domain = the datalists' domain of each case).

    ``mode``: ``auto`` routes by the gate (what `uharmony segment --domain auto` does), ``oracle`` by
    the true domain, ``joint`` to the one head. Gate accuracy is reported where the case's domain is
    one of the model's (None otherwise: a domain the model does not know yet).
    """
    model.eval()
    dice: dict[str, dict[str, float | None]] = {}
    gate_acc: dict[str, float | None] = {}
    total = sum(len(v) for v in items.values())
    done = 0
    if reporter is not None:
        reporter.progress("validate", 0, total)
    for domain, cases in items.items():
        per_class: dict[int, list[float]] = {}
        hits = []
        for item in cases:
            routing, gate_choice = route_index(model, item, mode)
            if domain in model.domains:
                hits.append(gate_choice == model.domains.index(domain))
            pred = predict(model, item, routing, patch, device, overlap)
            for c, v in case_dice(pred, item.labels[0].long(), item.annotated).items():
                per_class.setdefault(c, []).append(v)
            done += 1
            if reporter is not None:
                reporter.progress("validate", done, total)
        dice[domain] = {classes[c]: _mean(v) for c, v in sorted(per_class.items())}
        gate_acc[domain] = round(float(np.mean(hits)), 4) if hits and mode != "joint" else None
    return {"dice": dice, "gate_accuracy": gate_acc}


def _mean(values: list[float]) -> float | None:
    v = [x for x in values if not math.isnan(x)]
    return round(float(np.mean(v)), 4) if v else None


def format_table(title: str, rows: list[tuple[str, str, dict]], classes: list[str]) -> str:
    """rows: (label, split, {"dice": {class: v}, "gate": acc})."""
    used = [c for c in classes[1:] if any(c in r[2]["dice"] for r in rows)]
    width = max([len(r[0]) for r in rows] + [6])
    head = f"{'domain':<{width}}  {'split':<10}  {'gate':>5}  " + "  ".join(f"{c[:14]:>14}" for c in used)
    lines = [title, head]
    for label, split, r in rows:
        gate = "-" if r.get("gate") is None else f"{r['gate']:.2f}"
        cells = []
        for c in used:
            v = r["dice"].get(c)
            cells.append(f"{'-' if v is None else f'{v:.3f}':>14}")
        lines.append(f"{label:<{width}}  {split:<10}  {gate:>5}  " + "  ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ shared parts


def prepare_items(datasets: list[Dataset], maps: dict[str, dict[int, int]], union: list[str], spacing, gate_view,
                  reporter: Reporter, *, split: str) -> list[Prepared]:
    todo = []
    for ds in datasets:
        annotated = sorted(v for k, v in maps[ds.name].items() if k != 0)
        for case in getattr(ds, split):
            todo.append((case, maps[ds.name], annotated))
    items = []
    for i, (case, m, annotated) in enumerate(todo):
        items.append(prepare_case(case, spacing, m, annotated, gate_view))
        reporter.progress("load", i + 1, len(todo))  # training cases, then validation cases
    return items


def eval_sets(datasets: list[Dataset], maps, union, spacing, gate_view, reporter, *, limit: int | None = None,
              train_items: list[Prepared] | None = None) -> tuple[dict[str, list[Prepared]], dict[str, str]]:
    """Validation cases per domain; a domain with no validation split is evaluated on its training cases."""
    val = prepare_items(datasets, maps, union, spacing, gate_view, reporter, split="validation")
    by_domain: dict[str, list[Prepared]] = {}
    for item in val:
        by_domain.setdefault(item.domain, []).append(item)
    split = {d: "validation" for d in by_domain}
    for item in train_items or []:
        if item.domain not in split or split[item.domain] == "training":
            by_domain.setdefault(item.domain, []).append(item)
            split[item.domain] = "training"
    if limit:
        by_domain = {d: v[:limit] for d, v in by_domain.items()}
    return by_domain, split


def class_table(union: list[str]) -> list[dict]:
    classes = []
    for value, name in enumerate(union):
        entry = {"value": value, "name": "background" if value == 0 else name}
        std = standard_class(name) if value else None
        if std:
            entry.update(color=std["color"], terminology=std["terminology"])
        classes.append(entry)
    return classes


def calibrate_gate(model: UHarmonyNet, fit_items: list[Prepared], held_items: list[Prepared], route: dict[str, int],
                   device, *, framing: float = 0.0, framed_per_case: int = 4, seed: int = 0) -> tuple[float, dict]:
    """Fit each domain's Gaussian on un-augmented training cases; threshold = 1.25 x the largest held score.

    ``framing`` > 0: each case also contributes ``framed_per_case`` reframed views (`reframe`, drawn from
    ``seed``), to the fit and to the held scores, so a familiar scan framed more tightly or loosely
    than the training cases is still familiar; the threshold is then 1.25 x the held scores' 99th
    percentile, since the few most extreme random framings (a side cut deep into the head) would
    otherwise set it high enough to pass a binary mask or a label map as a familiar scan.
    """
    def views(items: list[Prepared], rng: np.random.Generator) -> list[torch.Tensor]:
        out = []
        for it in items:
            out.append(it.small[None])
            if framing > 0:
                out.append(framed_views([it.image] * framed_per_case, rng, framing, model.gate.downsample))
        return out

    def view_domains(items: list[Prepared]) -> list[int]:  # the domain index of each view of `views`
        return [route[it.domain] for it in items for _ in range(1 + (framed_per_case if framing > 0 else 0))]

    model.eval()
    with torch.no_grad():
        fit_views = views(fit_items, np.random.default_rng([seed, 1]))
        feats = torch.cat([model.gate(v.to(device))[1] for v in fit_views])
        model.gate.fit_calibration(feats, torch.tensor(view_domains(fit_items), device=device))
        scores = [float(s) for v in views(held_items, np.random.default_rng([seed, 2]))
                  for s in model.gate.unfamiliar_score(model.gate(v.to(device))[1])]
    top = float(np.percentile(scores, 99)) if framing > 0 and scores else max(scores, default=0.0)
    threshold = max(1.25 * top, 1e-6) if scores else 1e6
    info = {"score": "min over domains of the mean squared z-distance of gate style features",
            "threshold_rule": "1.25 x the 99th percentile of the held views' scores (plain and reframed)"
                              if framing > 0 else "1.25 x the largest score of the held cases",
            "fit_cases": len(fit_items), "held_cases": len(held_items)}
    if framing > 0:
        info["framing"] = {"max_fraction_per_side": framing, "reframed_views_per_case": framed_per_case, "seed": seed}
    return threshold, info


def hardware(device: torch.device) -> str:
    text = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text + f", {device.type}"


def prepare_output(out: Path, *, overwrite: bool, resume: bool) -> Path:
    """Refuse an existing output (unless --overwrite) and a stale checkpoint (unless --resume/--overwrite)."""
    if out.exists() and not overwrite:
        raise OutputError("exists already (use --overwrite to replace it)", out)
    ckpt = checkpoint_dir(out)
    if not resume and ckpt.exists():
        if not overwrite:
            raise OutputError("holds the checkpoint of an earlier run: add --resume to continue it, or --overwrite "
                              "to start again", ckpt)
        shutil.rmtree(ckpt)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot be created ({e.strerror or e})", out.parent) from None
    return ckpt


def check_resume(ckpt: Path, meta: dict) -> tuple[Path, dict]:
    step_dir, state = read_checkpoint_state(ckpt)
    if state.get("datalists") != meta["datalists"]:
        raise UHarmonyError("checkpoint was written for other datalists (or they changed since); cannot resume",
                            ckpt, code=ExitCode.USAGE)
    if state.get("config_hash") != meta["config_hash"]:
        raise UHarmonyError("checkpoint was written with a different config (only device, val_every, val_cases and "
                            "checkpoint_every may change); cannot resume", ckpt, code=ExitCode.USAGE)
    return step_dir, state


def datalist_records(datasets: list[Dataset]) -> list[dict]:
    return [{"name": d.name, "domain": d.domain, "path": str(d.path), "sha256": datalist_sha256(d.path)}
            for d in datasets]


def card_name(out: Path) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9._-]", "-", out.name).lstrip("._-")
    return name or "uharmony-model"


# --------------------------------------------------------------------------------- uharmony train


def run_train(data: list[str], out: str, config_path: str | None, *, resume: bool = False, overwrite: bool = False,
              device: str | None = None, reporter: Reporter | None = None, argv: list[str] | None = None
              ) -> list[tuple[Path, dict]]:
    """The whole of `uharmony train`; returns (package folder, card) of each model written.

    One model, except for ``method = "separate"``: one package per datalist, in ``OUT/<dataset name>``.
    """
    reporter = reporter or Reporter("none")
    cfg, _ = load_config(config_path, overrides={"device": device})
    out = Path(out)
    if cfg.method == "separate":
        return _run_separate(data, out, cfg, resume=resume, overwrite=overwrite, reporter=reporter, argv=argv)
    ckpt = prepare_output(out, overwrite=overwrite, resume=resume)
    dev = choose_device(cfg.device)
    datasets = load_datasets(data)  # every problem of every datalist at once (exit 5)
    card = train_package(datasets, out, cfg, ckpt=ckpt, dev=dev, resume=resume, overwrite=overwrite,
                         reporter=reporter, argv=argv)
    return [(out, card)]


def _run_separate(data: list[str], out: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool, reporter: Reporter,
                  argv) -> list[tuple[Path, dict]]:
    """The separate baseline: a plain model (as `joint`) per datalist, each trained on that datalist alone."""
    from uharmony.model.card import load_card

    if out.exists() and not (overwrite or resume):
        raise OutputError("exists already (use --overwrite to replace it)", out)
    dev = choose_device(cfg.device)
    datasets = load_datasets(data)
    names: list[str] = []
    for ds in datasets:
        name = card_name(Path(ds.name))
        while name in names:
            name += "-2"
        names.append(name)
    plans = []
    for ds, name in zip(datasets, names):
        sub = out / name
        done = resume and (sub / "card.json").is_file()
        again = resume and not done and checkpoint_dir(sub).exists()
        ckpt = None if done else prepare_output(sub, overwrite=overwrite, resume=again)
        plans.append((ds, sub, done, again, ckpt))
    results = []
    for i, (ds, sub, done, again, ckpt) in enumerate(plans):
        if done:
            reporter.log(f"separate model {i + 1}/{len(plans)}: {sub} is finished already; kept")
            results.append((sub, load_card(sub)))
            continue
        reporter.log(f"separate model {i + 1}/{len(plans)}: {ds.name} ({ds.domain}) -> {sub}")
        results.append((sub, train_package([ds], sub, cfg, ckpt=ckpt, dev=dev, resume=again, overwrite=overwrite,
                                           reporter=reporter, argv=argv)))
    return results


def train_package(datasets: list[Dataset], out: Path, cfg: TrainConfig, *, ckpt: Path, dev: torch.device,
                  resume: bool, overwrite: bool, reporter: Reporter, argv) -> dict:
    """Train one model on `datasets` (already checked) and write its package; returns the card."""
    union, maps = union_label_space(datasets)
    records = datalist_records(datasets)
    meta = {"kind": "train", "config_hash": config_hash(cfg), "datalists": [r["sha256"] for r in records]}
    if resume:
        step_dir, ck_state = check_resume(ckpt, meta)

    data_domains = list(dict.fromkeys(d.domain for d in datasets))
    joint = cfg.method in ("joint", "separate")  # plain InstanceNorm, one head, no gate training
    model_domains = [JOINT_DOMAIN] if cfg.method == "joint" else data_domains  # separate: one datalist, one domain
    route = {d: (0 if joint else model_domains.index(d)) for d in data_domains}
    patch = tuple(cfg.patch_size)

    torch.manual_seed(cfg.seed)
    arch = ArchConfig(in_channels=len(datasets[0].channels), num_classes=len(union), domains=list(model_domains),
                      filters=list(cfg.model.filters), strides=list(cfg.model.strides),
                      harmony_levels=0 if joint else cfg.model.harmony_levels, poly_degree=cfg.model.poly_degree,
                      clamp=cfg.model.clamp, poly_scale=cfg.model.poly_scale, gate_input_size=list(cfg.gate.input_size),
                      gate_filters=list(cfg.gate.filters))
    model = UHarmonyNet(arch)
    t_load = time.time()
    items = prepare_items(datasets, maps, union, cfg.spacing_mm, model.gate.downsample, reporter, split="training")
    val_items, val_split = eval_sets(datasets, maps, union, cfg.spacing_mm, model.gate.downsample, reporter,
                                     train_items=items)
    reporter.log(f"loaded {len(items)} training cases of {len(data_domains)} domain(s) "
                 f"({', '.join(data_domains)}) in {time.time() - t_load:.0f} s; classes: {', '.join(union[1:])}")
    for d, split in val_split.items():
        if split == "training":
            reporter.log(f"note: {d} has no validation split; it is validated on its training cases")

    model = model.to(dev)
    negative_free = cfg.gate.method == "negative-free" and not joint
    gate_record: dict = {"method": "trained"}
    if negative_free:  # fixed features, routing fitted once: nothing of the gate is trained in the loop
        gate_record = {"method": "negative-free", **use_contrast_encoder(
            model, steps=cfg.gate.pretrain_steps, views=cfg.gate.pretrain_views, reporter=reporter)}
        model = model.to(dev)
        gate_record["lda"] = fit_routing(model, domain_feature_stats(model, items))
        reporter.log(f"the gate routes by LDA on its contrast encoder's features (shrinkage "
                     f"{gate_record['lda']['shrinkage']:.3f})")
    domains_trained = len(set(route.values()))  # 1 for joint: one route for every domain
    optimizer, scaler, start = start_optimizer(model, cfg, domains_trained, dev,
                                               (step_dir, ck_state) if resume else None, reporter)

    groups = [{d: [i for i, it in enumerate(items) if it.domain == d]} for d in data_domains]
    state = LoopState(model=model, config=cfg, items=items, sampler=BalancedSampler(groups), route=route, device=dev,
                      patch=patch, train_gate=not joint and not negative_free)
    mode = "joint" if joint else "oracle" if cfg.method == "oracle" else "auto"
    limited = {d: v[:cfg.val_cases] for d, v in val_items.items()}

    def validate(step: int, loss: float, sets=limited) -> dict:
        result = evaluate(model, sets, union, mode=mode, patch=patch, device=dev, reporter=reporter)
        reporter.metric(step=step, loss=round(loss, 5) if math.isfinite(loss) else None, dice=result["dice"],
                        gate_accuracy=result["gate_accuracy"])
        if reporter.mode != "jsonl":
            rows = [(d, val_split[d], {"dice": result["dice"][d], "gate": result["gate_accuracy"][d]})
                    for d in result["dice"]]
            title = f"validation at step {step} (training loss {loss:.4f}; routing: {ROUTING_TEXT[mode]})"
            print(format_table(title, rows, union),
                  file=sys.stderr, flush=True)
        return result

    seconds, last_loss = run_steps(state, start=start, reporter=reporter, ckpt=ckpt, meta=meta, optimizer=optimizer,
                                   scaler=scaler, validate=validate)
    final = validate(cfg.steps, last_loss, sets=val_items)

    fit_items = items
    held = [i for d, v in val_items.items() for i in v if val_split[d] == "validation"] or items
    threshold, calibration = calibrate_gate(model, fit_items, held, route, dev, framing=cfg.gate.framing,
                                            seed=cfg.seed)
    calibration["held_split"] = "validation" if held is not items else "training (no validation split)"

    domains_card = []
    for d in model_domains:
        members = [ds for ds in datasets if cfg.method == "joint" or ds.domain == d]
        annotated = sorted({maps[ds.name][v] for ds in members for v in ds.labels if v})
        domains_card.append({
            "name": d, "modality": "+".join(members[0].channels),
            "description": ("all training domains in one: " + ", ".join(data_domains)) if cfg.method == "joint"
            else "datasets: " + ", ".join(ds.name for ds in members),
            "annotated_classes": [union[v] for v in annotated]})
    card = {
        "name": card_name(out), "version": "0.1.0",
        "description": f"U-Harmony model trained with `uharmony train` (method {cfg.method}) on "
                       + ", ".join(ds.name for ds in datasets),
        "input": {"channels": [{"name": c} for c in datasets[0].channels],
                  "normalization": dict(DEFAULT_NORMALIZATION), "spacing_mm": list(cfg.spacing_mm),
                  "orientation": "RAS", "patch_size": list(patch), "overlap": OVERLAP, "sw_batch_size": 1},
        "domains": domains_card,
        "classes": class_table(union),
        "gate": {"unfamiliar_threshold": round(threshold, 6), "routing": "argmax", "calibration": calibration,
                 **({"fov_views": list(FOV_VIEWS)} if cfg.gate.framing > 0 else {}),
                 **({} if joint else gate_record)},
        "intended_use": "Research. Trained by the user with `uharmony train`; validate it on your own data before "
                        "relying on it. Not a medical device.",
        "limitations": ["Only as good as its training data: " + ", ".join(f"{d.name} ({d.domain})" for d in datasets),
                        "Inputs unlike every training domain are flagged as unfamiliar; their results are unreliable."],
        "training": {
            "method": cfg.method, "command": "uharmony " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": cfg.to_dict(), "datalists": [{**r, "training_cases": len(ds.training),
                                                    "validation_cases": len(ds.validation)}
                                                   for r, ds in zip(records, datasets)],
            "steps": cfg.steps, "resumed_from_step": start or None, "seconds": round(seconds, 1),
            "hardware": hardware(dev), "uharmony_version": __version__, "torch": torch.__version__,
            "domains": data_domains,
            # the factor in effect (the config's 0 means the number of domains trained)
            "domain_lr_scale": resolved_domain_lr_scale(cfg.domain_lr_scale, domains_trained),
        },
        "evaluation": {"routing": mode, "split": val_split, "cases": {d: len(v) for d, v in val_items.items()},
                       **final},
    }
    if cfg.method == "oracle":
        card["gate"]["oracle"] = ("trained as the oracle baseline: evaluated with the true domain; use "
                                  "`uharmony segment --domain NAME` to reproduce it")
        card["limitations"].append("Oracle baseline: its evaluation was routed by the true domain, not the gate.")
    if cfg.method == "joint":
        card["limitations"].append("Joint baseline: plain InstanceNorm and one head for all domains (no routing).")
    if cfg.method == "separate":
        card["limitations"].append("Separate baseline: plain InstanceNorm, trained on this one dataset alone.")
    written = save_package(model.cpu(), card, out, overwrite=overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return written
