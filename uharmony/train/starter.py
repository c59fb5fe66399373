"""Train the bundled starter model on synthetic phantoms: two contrast styles = two domains.

    python -m uharmony.train.starter --out uharmony/models/starter

It proves the pipeline (gate, routing, heads, card) rather than being a clinical model. Seeds:
training cases 0..N-1, calibration/validation cases 5000+, the demo uses 90001, tests use 7xxxx.
The third style (synth-flair) is never seen in training; it checks the unfamiliar-input flag.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from uharmony import __version__
from uharmony.data import synth
from uharmony.data.preprocess import DEFAULT_NORMALIZATION, normalize_intensity
from uharmony.model import familiarity
from uharmony.model.network import ArchConfig, UHarmonyNet, polynomial_penalty
from uharmony.model.package import save_package
from uharmony.model.terminology import STANDARD_CLASSES

SPACING = 2.0
PATCH = (64, 64, 64)
VALIDATION_SEED0 = 5000
CONTRAST_CLASSES = [1, 2, 3]  # CSF, grey and white matter: present in every head, unlike lesions


def class_table() -> list[dict]:
    classes = [{"value": 0, "name": "background"}]
    for value, name in enumerate(synth.CLASS_NAMES[1:], start=1):
        std = STANDARD_CLASSES[name]
        classes.append({"value": value, "name": name, "color": std["color"], "terminology": std["terminology"]})
    return classes


def prepare(case: synth.SynthCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's view of a synthetic case (already RAS at the model spacing): normalised image, labels."""
    image = normalize_intensity(torch.from_numpy(case.image)[None], DEFAULT_NORMALIZATION)
    return image, torch.from_numpy(case.labels.astype(np.int64))[None]


def random_patch(image, labels, rng: np.random.Generator, size=PATCH, fg_prob=0.67):
    """A patch centred on a random foreground voxel (fg_prob) or anywhere; zero-padded at edges."""
    shape = np.array(image.shape[1:])
    if rng.random() < fg_prob:
        fg = torch.nonzero(labels[0] > 0)
        centre = fg[rng.integers(len(fg))].numpy()
    else:
        centre = np.array([rng.integers(s) for s in shape])
    start = centre - np.array(size) // 2
    out_i = torch.full((image.shape[0], *size), float(image.min()))
    out_l = torch.zeros((1, *size), dtype=labels.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    s = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    d = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
    out_i[(slice(None), *d)] = image[(slice(None), *s)]
    out_l[(slice(None), *d)] = labels[(slice(None), *s)]
    return out_i, out_l


def gate_view(model: UHarmonyNet, images: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model.gate.downsample(im[None]) for im in images])


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, n: int) -> list[float]:
    out = []
    for c in range(1, n):
        p, r = pred == c, ref == c
        denom = int(p.sum() + r.sum())
        out.append(float(2 * (p & r).sum() / denom) if denom else float("nan"))
    return out


def train(out: Path, *, cases_per_domain: int, steps: int, seed: int, lr: float, val_cases: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    domains = list(synth.TRAINING_STYLES)
    t0 = time.time()
    data = {d: [prepare(synth.make_case(i, d, spacing_mm=SPACING)) for i in range(cases_per_domain)] for d in domains}
    print(f"generated {cases_per_domain} cases x {len(domains)} domains in {time.time() - t0:.0f} s", file=sys.stderr)
    config = ArchConfig(in_channels=1, num_classes=len(synth.CLASS_NAMES), domains=domains)
    model = UHarmonyNet(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    gate_loss = torch.nn.CrossEntropyLoss()
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        patches, targets, whole = [], [], []
        for d in domains:  # balanced: one case of every domain per step
            image, labels = data[d][rng.integers(cases_per_domain)]
            p, l = random_patch(image, labels, rng)
            patches.append(p)
            targets.append(l)
            whole.append(image)
        x, y = torch.stack(patches), torch.stack(targets)
        routing = torch.eye(len(domains))
        loss_seg = seg_loss(model(x, routing), y)
        g_logits, _ = model.gate(gate_view(model, whole))
        loss_gate = gate_loss(g_logits, torch.arange(len(domains)))
        loss = loss_seg + 0.5 * loss_gate + 1e-4 * polynomial_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            rate = (time.time() - t0) / step
            print(f"step {step}/{steps} seg {loss_seg.item():.3f} gate {loss_gate.item():.3f} "
                  f"({rate:.2f} s/step, {rate * (steps - step) / 60:.1f} min left)", file=sys.stderr, flush=True)
    train_seconds = time.time() - t0
    model.eval()
    provenance = {
        "command": "python -m uharmony.train.starter " + " ".join(sys.argv[1:]),
        "data": f"uharmony.data.synth phantoms, seeds 0..{cases_per_domain - 1} per style, {SPACING:g} mm",
        "steps": steps, "batch": f"{len(domains)} patches of {PATCH} (one per domain)", "seed": seed,
        "learning_rate": lr, "seconds": round(train_seconds), "hardware": f"{platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU", "uharmony_version": __version__, "torch": torch.__version__,
        "licence_of_sources": "synthetic data generated by this repository (Apache-2.0)",
    }
    return finish(model, out, provenance, fit_cases=cases_per_domain, val_cases=val_cases)


def segment_case(model: UHarmonyNet, image: torch.Tensor, domain: int) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(image[None], PATCH, 1, lambda p: model(p, domain), overlap=0.5,
                                    mode="gaussian")[0].argmax(0)


def finish(model: UHarmonyNet, out: Path, provenance: dict, *, fit_cases: int, val_cases: int) -> dict:
    """Calibrate the unfamiliar-input score, evaluate on fresh seeds, and write the package.

    The contrast fingerprints are fitted on the training seeds (routed to their true domain); the
    threshold is 1.25 x the largest score of held-back cases of the training styles.
    """
    domains = model.domains
    voxel_ml = SPACING**3 / 1000.0
    fit_rows: dict[str, list] = {d: [] for d in domains}
    with torch.inference_mode():
        for d_i, d in enumerate(domains):
            for i in range(fit_cases):
                image, _ = prepare(synth.make_case(i, d, spacing_mm=SPACING))
                fit_rows[d].append(familiarity.fingerprint(image, segment_case(model, image, d_i), CONTRAST_CLASSES,
                                                           voxel_ml))
        calibration = familiarity.fit(fit_rows)
        evaluation, in_scores, held = evaluate(model, domains, val_cases, calibration)
    threshold = float(np.max(in_scores) * 1.25)
    evaluation["unfamiliar_flag_rate"] = {s: float(np.mean(np.array(v) > threshold)) for s, v in held.items()}
    evaluation["false_unfamiliar_rate_in_domain"] = float(np.mean(np.array(in_scores) > threshold))
    card = {
        "name": "uharmony-starter",
        "version": "0.1.0",
        "description": "Starter model on synthetic head phantoms (two MRI-like contrast styles); proves the pipeline.",
        "input": {
            "channels": [{"name": "image"}],
            "normalization": dict(DEFAULT_NORMALIZATION),
            "spacing_mm": [SPACING] * 3,
            "orientation": "RAS",
            "patch_size": list(PATCH),
            "overlap": 0.5,
            "sw_batch_size": 1,
        },
        "domains": [
            {"name": "synth-t1", "modality": "MR", "description": "synthetic T1-like phantoms (WM > GM > CSF)",
             "annotated_classes": list(synth.CLASS_NAMES[1:])},
            {"name": "synth-t2", "modality": "MR", "description": "synthetic T2-like phantoms (CSF > GM > WM)",
             "annotated_classes": list(synth.CLASS_NAMES[1:])},
        ],
        "classes": class_table(),
        "gate": {"unfamiliar_threshold": round(threshold, 4), "routing": "argmax",
                 "calibration": {"score": familiarity.SCORE_NAME, "classes": CONTRAST_CLASSES,
                                 "domains": calibration,
                                 "fitted_on": f"training seeds 0..{fit_cases - 1} per domain",
                                 "threshold_rule": "1.25 x the largest score of held-back in-domain cases "
                                                   f"(seeds {VALIDATION_SEED0}..{VALIDATION_SEED0 + val_cases - 1})"}},
        "intended_use": "Testing and demonstrating the UHarmony pipeline. Not for clinical use; not for real scans.",
        "limitations": [
            "Trained only on synthetic geometric head phantoms; it has never seen a real scan.",
            "Its two domains are synthetic T1-like and T2-like renderings; FLAIR-, CT- and real-looking images are "
            "outside its training and should be flagged as unfamiliar.",
            "No evaluation on real images.",
            "The lesion class was not learned (validation Dice 0): do not use it to find lesions.",
        ],
        "training": provenance,
        "evaluation": evaluation,
    }
    return save_package(model, card, out, overwrite=True)


def evaluate(model: UHarmonyNet, domains: list[str], val_cases: int, calibration: dict):
    """Gate accuracy, Dice (routed by the gate, as `--domain auto`) and familiarity scores on fresh seeds."""
    voxel_ml = SPACING**3 / 1000.0
    correct, dice, in_scores = {}, {}, []
    for d_i, d in enumerate(domains):
        hits, scores = [], []
        for i in range(val_cases):
            image, labels = prepare(synth.make_case(VALIDATION_SEED0 + i, d, spacing_mm=SPACING))
            chosen = int(model.gate(gate_view(model, [image]))[0].argmax(1))
            hits.append(chosen == d_i)
            seg = segment_case(model, image, chosen)
            in_scores.append(familiarity.score(familiarity.fingerprint(image, seg, CONTRAST_CLASSES, voxel_ml),
                                               calibration))
            scores.append(dice_per_class(seg, labels[0], len(synth.CLASS_NAMES)))
        correct[d] = float(np.mean(hits))
        dice[d] = {name: round(float(np.nanmean([s[c] for s in scores])), 4)
                   for c, name in enumerate(synth.CLASS_NAMES[1:])}
    held = {}
    for style in synth.HELD_BACK_STYLES + ("synth-ct",):
        held[style] = []
        for i in range(val_cases):
            image, _ = prepare(synth.make_case(VALIDATION_SEED0 + i, style, spacing_mm=SPACING))
            chosen = int(model.gate(gate_view(model, [image]))[0].argmax(1))
            seg = segment_case(model, image, chosen)
            held[style].append(familiarity.score(familiarity.fingerprint(image, seg, CONTRAST_CLASSES, voxel_ml),
                                                 calibration))
    evaluation = {"gate_accuracy": correct, "dice_auto_domain": dice,
                  "validation_seeds": f"{VALIDATION_SEED0}..{VALIDATION_SEED0 + val_cases - 1}"}
    return evaluation, in_scores, held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models" / "starter"))
    p.add_argument("--cases", type=int, default=40, help="training cases per domain")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-cases", type=int, default=20)
    p.add_argument("--recalibrate", metavar="MODEL_DIR", default=None,
                   help="keep this package's weights; redo calibration and evaluation, write to --out")
    a = p.parse_args(argv)
    if a.recalibrate:
        from uharmony.model.card import load_card
        from uharmony.model.package import load_model

        model, _ = load_model(a.recalibrate)
        card = finish(model, Path(a.out), load_card(a.recalibrate)["training"], fit_cases=a.cases,
                      val_cases=a.val_cases)
        print(f"wrote {a.out}: {card['evaluation']}")
        return 0
    card = train(Path(a.out), cases_per_domain=a.cases, steps=a.steps, seed=a.seed, lr=a.lr, val_cases=a.val_cases)
    print(f"wrote {a.out}: gate accuracy {card['evaluation']['gate_accuracy']}, "
          f"unfamiliar flag {card['evaluation']['unfamiliar_flag_rate']}, dice {card['evaluation']['dice_auto_domain']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
