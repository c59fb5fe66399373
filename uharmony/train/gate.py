"""The domain gate's training: its loss inside `uharmony train|adapt`, and `uharmony refit-gate`.

The gate learns from whole images whose domain is known; it needs no labels. Each step it sees its
own batch of ``gate.batch_size`` cases (domains balanced), larger than the segmentation batch since
a 32^3 view costs little, each view jittered (`uharmony.augment.views`) unless ``gate.augment`` is
off. The segmentation network is untouched by it: the gate is a separate small CNN.

`uharmony refit-gate --model M --data a.json b.json ... --out OUT` retrains only the gate of a
model (every other weight byte-identical) on datalists of the model's domains, labelled or not,
then recalibrates the unfamiliar-input score and reports gate accuracy per domain before and after.
Use it when the gate misroutes: unlabelled scans of each domain are enough. A negative-free gate
refit this way becomes a trained one (its card says so and forgets the LDA means).

``gate.method = "negative-free"`` (the default) replaces the trained gate: its convolutions are the pretrained
contrast encoder (`uharmony.train.contrast`, as a federation's gate), never trained, and its routing
rows come from linear discriminant analysis of each domain's pooled features (`fit_routing`): no
cross-entropy, no negatives, and an adaptation adds a domain by adding its mean, without moving the
features the old domains are routed by.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from uharmony.errors import BadDatalistError, ExitCode, UHarmonyError
from uharmony.progress import Reporter


def gate_loss(model, items, sampler, route: dict[str, int], rng: np.random.Generator, *, batch_size: int,
              augment: bool, device, framing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the gate on a fresh balanced batch of whole-image views (drawn from ``rng``).

    ``framing`` > 0 (with ``augment``): each view is made anew from its full image, reframed by up to
    that fraction per side (`uharmony.augment.views.reframe`), instead of the case's fixed view.
    """
    from uharmony.augment.views import framed_views, jitter_views

    ids = [sampler.draw(rng) for _ in range(batch_size)]
    if augment and framing > 0:
        small = framed_views([items[i].image for i in ids], rng, framing, model.gate.downsample).to(device)
    else:
        small = torch.stack([items[i].small for i in ids]).to(device)
    if augment:
        small = jitter_views(small, rng)
    target = torch.tensor([route[items[i].domain] for i in ids], device=device)
    logits, _ = model.gate(small)
    return F.cross_entropy(logits.float(), target)


def gate_features(model, items) -> torch.Tensor:
    """The gate's features (style, then pooled) of the items' un-augmented views, (N, F) on the CPU."""
    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return torch.cat([model.gate(torch.stack([it.small for it in items[i:i + 16]]).to(dev))[1].cpu()
                          for i in range(0, len(items), 16)])


def domain_feature_stats(model, items) -> dict:
    """Per domain of the items: count, mean and scatter of the gate's pooled features (`FeatureStats`)."""
    from uharmony.fed.aggregate import FeatureStats

    dim = model.gate.pooled_dim
    feats = gate_features(model, items).double().numpy()[:, -dim:]
    domains = np.asarray([it.domain for it in items])
    return {d: FeatureStats.of(feats[domains == d]) for d in dict.fromkeys(domains.tolist())}


def use_contrast_encoder(model, *, steps: int, views: int, reporter: Reporter) -> dict:
    """Load the contrast encoder of the model's gate shape into its convolutions (pretrained first, once
    per gate shape, when none is shipped or cached); returns what the card records."""
    from uharmony.train.contrast import ensure_encoder, load_encoder

    gate = model.gate
    reporter.log("the gate's contrast encoder: loading it, or pretraining it first if this gate shape has none cached")
    path = ensure_encoder(gate.convs[0].in_channels, gate.input_size, [c.out_channels for c in gate.convs],
                          steps=steps, views=views, progress=lambda stage, i, n: reporter.progress(
                              f"contrast encoder {stage}", i, n))
    return {"encoder": path.name, "pretraining": load_encoder(gate, path)}


def fit_routing(model, stats: dict, remembered: dict | None = None) -> dict:
    """Set the gate's routing rows by LDA (`uharmony.fed.aggregate.fit_gate_lda`) from per-domain feature
    statistics; returns the card's record (shrinkage, each domain's count and mean).

    ``remembered``: the card record of an earlier fit; a domain of the model without statistics here
    keeps its remembered mean (the shared covariance is estimated from the domains that have data).
    """
    from uharmony.fed.aggregate import FeatureStats, fit_gate_lda

    stats = dict(stats)
    counts = {d: int(st.count) for d, st in stats.items()}
    dim = model.gate.pooled_dim
    for d, rec in ((remembered or {}).get("domains") or {}).items():
        if d in model.domains and d not in stats:
            counts[d] = int(rec["count"])
            # count 1, no scatter: adds one case and one class to the pooled covariance's degrees of freedom
            stats[d] = FeatureStats(1, np.asarray(rec["mean"], np.float64), np.zeros((dim, dim)))
    missing = [d for d in model.domains if d not in stats]
    if missing:
        raise BadDatalistError(f"the negative-free gate has no cases and no remembered mean for domain(s) "
                               f"{', '.join(missing)}; give their datalists with --keep")
    rows, shrinkage = fit_gate_lda(stats, model.domains)
    state = {k[len("gate."):]: torch.from_numpy(v) for k, v in rows.items()}
    with torch.no_grad():
        for d in model.domains:
            model.gate.classifier[d].weight.copy_(state[f"classifier.{d}.weight"])
            model.gate.classifier[d].bias.copy_(state[f"classifier.{d}.bias"])
    return lda_record(stats, shrinkage, model.domains, counts)


def lda_record(stats: dict, shrinkage: float, domains: list[str], counts: dict[str, int] | None = None) -> dict:
    """The card's ``gate.lda``: the shrinkage and each described domain's case count and feature mean, what
    `uharmony adapt` needs to refit the routing rows later without that domain's cases."""
    counts = counts or {d: int(st.count) for d, st in stats.items()}
    return {"fit": "linear discriminant analysis of the fixed gate's pooled features, pooled within-domain "
                   "covariance with OAS shrinkage", "shrinkage": round(shrinkage, 6),
            "domains": {d: {"count": counts[d], "mean": [float(f"{x:.7g}") for x in stats[d].mean]}
                        for d in domains if d in stats}}


@torch.no_grad()
def confusion(model, items, device) -> dict[str, dict[str, int]]:
    """Per true domain: how many (un-augmented) views the gate sent to each model domain."""
    model.eval()
    out: dict[str, dict[str, int]] = {}
    for it in items:
        chosen = model.domains[int(model.gate(it.small[None].to(device))[0].argmax(1))]
        out.setdefault(it.domain, dict.fromkeys(model.domains, 0))[chosen] += 1
    return out


def accuracy(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """Per domain: the fraction of its views sent to itself (the confusion matrix's diagonal)."""
    return {d: round(row[d] / sum(row.values()), 4) for d, row in counts.items()}


def run_refit_gate(model_ref: str | None, data: list[str], out: str, *, steps: int = 1500, batch_size: int = 16,
                   lr: float = 1e-3, augment: bool = True, framing: float = 0.0, seed: int = 0, overwrite: bool = False,
                   device: str | None = None, reporter: Reporter | None = None, argv=None) -> tuple[Path, dict]:
    """The whole of `uharmony refit-gate`; returns (package folder, card)."""
    import copy

    from uharmony.augment.views import FOV_VIEWS
    from uharmony.data.datalist import check_against_model
    from uharmony.device import choose_device
    from uharmony.model.package import load_model, save_package
    from uharmony.model.registry import resolve_model
    from uharmony.train.data import BalancedSampler, load_datasets, prepare_case
    from uharmony.train.trainer import calibrate_gate, prepare_output

    reporter = reporter or Reporter("none")
    out_p = Path(out)
    prepare_output(out_p, overwrite=overwrite, resume=False)
    model_dir = resolve_model(model_ref)
    model, card = load_model(model_dir, "cpu")  # bad model: exit 4
    datasets = load_datasets(data, require_labels=False)
    problems = [f"{ds.path}: domain {ds.domain!r} is not a domain of the model (it has: {', '.join(model.domains)}); "
                f"add it with `uharmony adapt` first" for ds in datasets if ds.domain not in model.domains]
    if len(model.domains) < 2:
        problems.append(f"{model_dir}: the model has one domain; its gate has nothing to choose")
    if problems:
        raise BadDatalistError("\n".join([f"{len(problems)} problem(s)", *problems]))
    check_against_model(datasets, card)  # channels, as `uharmony adapt` checks them (exit 5)
    if steps < 1 or batch_size < 1 or not lr > 0 or not 0 <= framing < 0.5:
        raise UHarmonyError("--steps and --batch-size must be >= 1, --lr > 0 and --framing in [0, 0.5)",
                            code=ExitCode.USAGE)

    dev = choose_device(device or "auto")
    spacing = card["input"]["spacing_mm"]
    route = {d: model.domains.index(d) for d in model.domains}

    def load(split: str):
        cases = [(ds, c) for ds in datasets for c in (ds.training if split == "training" else ds.validation)]
        items = []
        for i, (ds, case) in enumerate(cases):
            items.append(prepare_case(case, spacing, None, [], model.gate.downsample, card["input"]["normalization"]))
            reporter.progress(f"load {split}", i + 1, len(cases))
        return items

    t0 = time.time()
    with torch.no_grad():
        train_items, held = load("training"), load("validation")
    if not train_items:
        raise BadDatalistError("no training cases in the datalists")
    reporter.log(f"loaded {len(train_items)} training and {len(held)} validation views in {time.time() - t0:.0f} s")
    judge = held or train_items
    model = model.to(dev)
    before = confusion(model, judge, dev)
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("gate.")}

    sampler = BalancedSampler([{d: [i for i, it in enumerate(train_items) if it.domain == d] for d in model.domains}])
    optimizer = torch.optim.AdamW(model.gate.parameters(), lr=lr, weight_decay=1e-4)
    model.eval()  # the segmentation network stays as it is (no norm statistics are updated)
    model.gate.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(1, steps + 1):
        rng = np.random.default_rng([seed, step])
        for g in optimizer.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        loss = gate_loss(model, train_items, sampler, route, rng, batch_size=batch_size, augment=augment, device=dev,
                         framing=framing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        reporter.progress("gate", step, steps)
    seconds = time.time() - t0
    after = confusion(model, judge, dev)
    threshold, calibration = calibrate_gate(model, train_items, held or train_items, route, dev, framing=framing,
                                           seed=seed)
    calibration["held_split"] = "validation" if held else "training (no validation split)"
    moved = [k for k, v in model.state_dict().items() if not k.startswith("gate.") and not torch.equal(v, frozen[k])]
    if moved:  # only the gate may change; a bug if anything else did
        raise UHarmonyError(f"refit-gate changed non-gate weights ({', '.join(moved[:3])}); nothing was written",
                            code=ExitCode.INTERNAL)

    split = "validation" if held else "training"
    acc_before, acc_after = accuracy(before), accuracy(after)
    reporter.metric(step=steps, loss=round(float(np.mean(losses[-50:])), 5), gate_accuracy=acc_after, phase="after")
    lines = [f"gate accuracy per domain ({split} split, {len(judge)} views): before -> after"]
    lines += [f"  {d:<14} {acc_before[d]:6.0%} -> {acc_after[d]:6.0%}" for d in acc_after]
    print("\n".join(lines), file=sys.stderr, flush=True)

    card = copy.deepcopy(card)
    if card["gate"].get("method") == "negative-free":
        # its convolutions were trained just now: the fixed features and remembered LDA means no longer hold
        card["gate"]["method"] = "trained"
        card["gate"].pop("lda", None)
        reporter.log("the negative-free gate is now a trained gate (card gate.method = trained)")
    card["gate"]["unfamiliar_threshold"] = round(threshold, 6)
    card["gate"]["calibration"] = calibration
    if framing > 0:  # a gate trained on reframed scans is asked about several fields of view (uharmony segment)
        card["gate"]["fov_views"] = list(FOV_VIEWS)
    else:
        card["gate"].pop("fov_views", None)
    card["gate"]["refit"] = {
        "command": "uharmony " + " ".join(argv if argv is not None else sys.argv[1:]),
        "datalists": [str(ds.path) for ds in datasets], "training_views": len(train_items), "split": split,
        "steps": steps, "batch_size": batch_size, "lr": lr, "augment": augment, "framing": framing, "seed": seed,
        "seconds": round(seconds, 1), "accuracy_before": acc_before, "accuracy_after": acc_after,
        "confusion_after": after}
    if isinstance(card.get("evaluation"), dict):
        card["evaluation"].setdefault("notes", []).append(
            "The gate was refit after this evaluation (gate.refit); its gate accuracies predate the refit.")
    return out_p, save_package(model.cpu(), card, out_p, overwrite=overwrite)
