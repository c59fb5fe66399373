"""`uharmony adapt`: extend a model package to a new domain (modality) and/or new classes.

* A domain of the new data that the base model lacks becomes a new domain: its U-Harmony stage-2
  parameters, output head and gate output start as copies of the *closest* existing domain, the one
  the base gate favours on average (mean softmax) over the new training images.
* Classes the base model lacks (matched by name, case-insensitively) become new output channels of
  every head (`UHarmonyNet.add_classes`: existing outputs unchanged, new ones start small).
* Cases of the old domains given with ``--keep`` are replayed: every step draws the new data or
  the replayed data with equal probability (then a domain, then a case), so the gate keeps seeing
  negatives for the new domain and the old domains do not drift.
* A base model with the negative-free gate (``gate.method``) keeps its fixed features; the routing
  is refitted by LDA over the cases given here (a domain without cases keeps the mean its card
  remembers), so nothing of the gate is trained and the old domains' means do not move.
* Dice per class and gate accuracy per domain are measured before and after, with ``--domain
  auto`` routing (the gate decides), on the validation split of each datalist, or on its training
  cases where it has none (the card and the table say which).

Training itself is the loop of `uharmony.train.trainer` (same config keys, same determinism and
``--resume``); the architecture, spacing and gate come from the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from uharmony import __version__
from uharmony.augment.views import FOV_VIEWS
from uharmony.data.datalist import check_against_model, union_label_space
from uharmony.errors import ExitCode, UHarmonyError
from uharmony.model.card import class_names
from uharmony.model.network import UHarmonyNet
from uharmony.model.package import load_model, save_package
from uharmony.model.registry import resolve_model
from uharmony.progress import Reporter
from uharmony.train.config import config_hash, load_config, resolved_domain_lr_scale
from uharmony.train.data import BalancedSampler, Prepared, domain_sampler, load_datasets
from uharmony.train.trainer import (
    LoopState,
    calibrate_gate,
    card_name,
    check_resume,
    class_table,
    datalist_records,
    eval_sets,
    evaluate,
    format_table,
    hardware,
    prepare_items,
    prepare_output,
    run_steps,
    start_optimizer,
)
from uharmony.device import choose_device


def closest_domain(model: UHarmonyNet, items: list[Prepared]) -> tuple[str, dict[str, float]]:
    """The existing domain the gate favours on average over `items` (mean softmax), and the means."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        small = torch.stack([i.small for i in items]).to(device)
        probs = torch.softmax(model.gate(small)[0].float(), dim=1).mean(0).cpu()
    names = model.domains
    return names[int(probs.argmax())], {n: round(float(p), 4) for n, p in zip(names, probs)}


def expand_model(model: UHarmonyNet, new_domains: dict[str, list[Prepared]], n_new_classes: int, seed: int
                 ) -> dict[str, dict]:
    """Add the new domains (each like its closest) and classes; returns {domain: {"like":, "gate_mean":}}."""
    added = {}
    for name, items in new_domains.items():
        like, means = closest_domain(model, items)
        model.add_domain(name, like=like)
        added[name] = {"like": like, "gate_mean_probabilities": means}
    if n_new_classes > 0:
        model.add_classes(n_new_classes, generator=torch.Generator().manual_seed(seed))
    return added


def run_adapt(model_spec: str, data: list[str], keep: list[str], out: str, config_path: str | None, *,
              resume: bool = False, overwrite: bool = False, device: str | None = None,
              reporter: Reporter | None = None, argv: list[str] | None = None) -> dict:
    """The whole of `uharmony adapt`; returns the written card."""
    reporter = reporter or Reporter("none")
    cfg, given = load_config(config_path, kind="adapt", overrides={"device": device})
    out = Path(out)
    ckpt = prepare_output(out, overwrite=overwrite, resume=resume)
    dev = choose_device(cfg.device)

    base_dir = resolve_model(model_spec)
    model, base_card = load_model(base_dir, "cpu")  # bad model: exit 4
    all_ds = load_datasets(list(data) + list(keep))  # every problem of every datalist at once: exit 5
    new_ds, keep_ds = all_ds[:len(data)], all_ds[len(data):]
    check_against_model(all_ds, base_card)  # channels: exit 5
    base_classes = class_names(base_card)
    union, maps = union_label_space(all_ds, base=base_classes)
    spacing = [float(s) for s in base_card["input"]["spacing_mm"]]
    patch = tuple(cfg.patch_size) if "patch_size" in given else tuple(base_card["input"]["patch_size"])
    factor = int(np.prod(model.config.strides))
    if any(p % factor for p in patch):
        raise UHarmonyError(f"key 'patch_size' {list(patch)} must be divisible by the base model's total stride "
                            f"{factor}", config_path, code=ExitCode.USAGE)
    gate_size = list(model.gate.input_size)
    # What the adaptation really uses, so the card's config says it (these keys cannot be set for adapt).
    arch = model.config
    cfg.spacing_mm, cfg.patch_size, cfg.gate.input_size = spacing, list(patch), gate_size
    for key in (f.name for f in dataclasses.fields(cfg.model)):  # every model key is the base's (same names)
        value = getattr(arch, key)
        setattr(cfg.model, key, list(value) if isinstance(value, (list, tuple)) else value)
    cfg.gate.filters = list(arch.gate_filters)
    cfg.method = base_card.get("training", {}).get("method", "uharmony") if isinstance(base_card.get("training"),
                                                                                      dict) else "uharmony"
    records = datalist_records(all_ds)
    base_sha = base_card["weights"]["sha256"]
    meta = {"kind": "adapt", "datalists": [r["sha256"] for r in records],
            "config_hash": config_hash(cfg, {"base": base_sha, "data": len(data), "patch": list(patch)})}
    if resume:
        step_dir, ck_state = check_resume(ckpt, meta)

    t_load = time.time()
    view = model.gate.downsample  # the gate's un-augmented whole-image view, as at inference
    new_items = prepare_items(new_ds, maps, union, spacing, view, reporter, split="training")
    keep_items = prepare_items(keep_ds, maps, union, spacing, view, reporter, split="training")
    new_eval, new_split = eval_sets(new_ds, maps, union, spacing, view, reporter, train_items=new_items)
    keep_eval, keep_split = eval_sets(keep_ds, maps, union, spacing, view, reporter, train_items=keep_items)
    reporter.log(f"loaded {len(new_items)} new and {len(keep_items)} replayed training cases in "
                 f"{time.time() - t_load:.0f} s")
    eval_items = {**{d: v for d, v in keep_eval.items()}, **{d: v for d, v in new_eval.items()}}
    splits = {**keep_split, **new_split}
    if set(new_eval) & set(keep_eval):  # the same domain in new and kept data: evaluate both sets under one name
        for d in set(new_eval) & set(keep_eval):
            eval_items[d] = keep_eval[d] + new_eval[d]

    model = model.to(dev)
    reporter.log("evaluating the base model")
    before = evaluate(model, eval_items, union, mode="auto", patch=patch, device=dev, reporter=reporter)
    reporter.metric(step=0, loss=None, dice=before["dice"], gate_accuracy=before["gate_accuracy"], phase="before")
    for d, split in splits.items():
        if split == "training":
            reporter.log(f"note: {d} has no validation split; its before/after figures are on its training cases")

    data_domains = list(dict.fromkeys(d.domain for d in all_ds))
    fresh = [d for d in data_domains if d not in model.domains]
    by_domain = {d: [i for i in new_items + keep_items if i.domain == d] for d in fresh}
    added = expand_model(model, by_domain, len(union) - model.config.num_classes, cfg.seed)
    for d, info in added.items():
        reporter.log(f"new domain {d}: initialised from {info['like']} (the gate's mean probabilities on the new "
                     f"images: {info['gate_mean_probabilities']})")
    n_new_classes = len(union) - len(base_classes)
    if n_new_classes:
        reporter.log(f"new classes: {', '.join(union[len(base_classes):])}")
    model = model.to(dev)
    route = {d: model.domains.index(d) for d in data_domains}
    base_gate = base_card.get("gate", {})
    negative_free = base_gate.get("method") == "negative-free"
    cfg.gate.method = "negative-free" if negative_free else "trained"
    lda = None
    if negative_free:
        from uharmony.train.gate import domain_feature_stats, fit_routing

        lda = fit_routing(model, domain_feature_stats(model, new_items + keep_items), base_gate.get("lda"))
        kept = [d for d in model.domains if d not in data_domains]
        reporter.log("the negative-free gate's routing refitted by LDA over the given cases"
                     + (f" (remembered means of {', '.join(kept)})" if kept else ""))

    items = new_items + keep_items
    domains_trained = len(set(route.values()))
    optimizer, scaler, start = start_optimizer(model, cfg, domains_trained, dev,
                                               (step_dir, ck_state) if resume else None, reporter)
    n_new = len(new_items)
    groups = [{d: [i for i in range(n_new) if items[i].domain == d] for d in data_domains},
              {d: [i for i in range(n_new, len(items)) if items[i].domain == d] for d in data_domains}]
    # The gate sees every domain equally often. Through the new/replayed groups it would see the new
    # domain as often as all old ones together, a prior that drifted old cases onto the new domain.
    state = LoopState(model=model, config=cfg, items=items, sampler=BalancedSampler(groups), route=route, device=dev,
                      patch=patch, train_gate=not negative_free, gate_sampler=domain_sampler(items))

    def validate(step: int, loss: float) -> None:
        result = evaluate(model, eval_items, union, mode="auto", patch=patch, device=dev, reporter=reporter)
        reporter.metric(step=step, loss=round(loss, 5) if np.isfinite(loss) else None, dice=result["dice"],
                        gate_accuracy=result["gate_accuracy"])

    seconds, last_loss = run_steps(state, start=start, reporter=reporter, ckpt=ckpt, meta=meta, optimizer=optimizer,
                                   scaler=scaler, validate=validate)
    after = evaluate(model, eval_items, union, mode="auto", patch=patch, device=dev, reporter=reporter)
    reporter.metric(step=cfg.steps, loss=round(last_loss, 5) if np.isfinite(last_loss) else None, dice=after["dice"],
                    gate_accuracy=after["gate_accuracy"], phase="after")

    # Familiarity: refit the Gaussians of the domains that have data here; keep the others' (base) ones.
    held = [i for v in eval_items.values() for i in v]
    threshold, calibration = calibrate_gate(model, items, held, route, dev, framing=cfg.gate.framing, seed=cfg.seed)
    base_threshold = float(base_card["gate"]["unfamiliar_threshold"])
    threshold = max(threshold, base_threshold)
    stale = [d for d in model.domains if d not in data_domains]
    calibration.update(threshold_rule="the larger of the base model's threshold and 1.25 x the largest score of "
                                      "the evaluated cases", base_threshold=base_threshold,
                       refit_domains=data_domains, kept_from_base=stale)

    rows = []
    for d in eval_items:
        tag = f"{d} (new)" if d in added else d
        rows.append((f"{tag} before", splits[d], {"dice": before["dice"][d], "gate": before["gate_accuracy"][d]}))
        rows.append((f"{tag} after", splits[d], {"dice": after["dice"][d], "gate": after["gate_accuracy"][d]}))
    table = format_table("adaptation: Dice per class and gate accuracy, --domain auto routing", rows, union)
    if reporter.mode != "jsonl":
        print(table, file=sys.stderr, flush=True)

    card = copy.deepcopy(base_card)
    for k in ("format", "architecture", "weights"):
        card.pop(k, None)
    card["name"] = card_name(out)
    card["description"] = (f"{base_card['name']} adapted with `uharmony adapt` to "
                           + ", ".join(f"{d.name} ({d.domain})" for d in new_ds))
    annotated = {}
    for ds in all_ds:
        annotated.setdefault(ds.domain, set()).update(maps[ds.name][v] for v in ds.labels if v)
    for entry in card["domains"]:
        if entry["name"] in annotated:
            old = entry.get("annotated_classes", [])
            extra = [union[v] for v in sorted(annotated[entry["name"]]) if union[v] not in old]
            if extra or "annotated_classes" in entry:
                entry["annotated_classes"] = old + extra
    for d, info in added.items():
        members = [ds for ds in all_ds if ds.domain == d]
        card["domains"].append({"name": d, "modality": "+".join(members[0].channels),
                                "description": f"added by adaptation (initialised from {info['like']}); datasets: "
                                               + ", ".join(ds.name for ds in members),
                                "annotated_classes": [union[v] for v in sorted(annotated[d])]})
    base_entries = {c["value"]: c for c in base_card["classes"]}
    card["classes"] = [base_entries.get(c["value"], c) for c in class_table(union)]
    card["gate"]["unfamiliar_threshold"] = round(threshold, 6)
    card["gate"]["calibration"] = calibration
    card["gate"]["method"] = cfg.gate.method
    if lda is not None:
        card["gate"]["lda"] = lda
    if cfg.gate.framing > 0:  # else the base's views stay: its gate was trained for them
        card["gate"]["fov_views"] = list(FOV_VIEWS)
    card["limitations"] = list(card.get("limitations", [])) + [
        f"Adapted on {len(new_items)} case(s) of " + ", ".join(f"{d.name} ({d.domain})" for d in new_ds)
        + (f" with {len(keep_items)} replayed case(s)" if keep_items else " without replay of the old domains")]
    card["training"] = {
        "method": "adapt", "command": "uharmony " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base_model": {"name": base_card["name"], "version": base_card.get("version"), "sha256": base_sha,
                       "path": str(base_dir)},
        "config": cfg.to_dict(), "patch_size": list(patch),
        "datalists": [{**r, "role": "new" if i < len(data) else "keep", "training_cases": len(ds.training),
                       "validation_cases": len(ds.validation)} for i, (r, ds) in enumerate(zip(records, all_ds))],
        "new_domains": added, "new_classes": union[len(base_classes):],
        "steps": cfg.steps, "resumed_from_step": start or None, "seconds": round(seconds, 1),
        "hardware": hardware(dev), "uharmony_version": __version__, "torch": torch.__version__,
        "base_training": base_card.get("training"),
        "domain_lr_scale": resolved_domain_lr_scale(cfg.domain_lr_scale, domains_trained),
    }
    card["evaluation"] = {
        "routing": "auto", "split": splits, "cases": {d: len(v) for d, v in eval_items.items()},
        "note": "split 'training' means the datalist has no validation split; those figures are on training cases",
        "before": before, "after": after, "table": table.splitlines(),
    }
    written = save_package(model.cpu(), card, out, overwrite=overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return written
