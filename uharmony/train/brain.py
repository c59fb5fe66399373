"""The default brain model, reproducibly: data, training, real-image evaluation, card.

    make brain-model          # = the three steps below (about 4.5 h on 2 CPU cores)
    python -m uharmony.train.brain data --out work/heads
    python -m uharmony.train.brain train --data work/heads --out work/brain
    python -m uharmony.train.brain finish --model work/brain [--install]

`data` renders 36 training + 4 validation heads per domain (uharmony.data.heads, base seed 0),
80 + 20 more per domain for the gate only (base seed 50000, in `gate/`), and the same gate heads of
the domains that have gate-only variants again with them (`--for-gate`, in `gate2/`: T1 only, with
flatter T1 contrasts such as the MNI template's). `train` runs ten stages:
1. `uharmony train` on the four datalists with `configs/brain.toml` (-> OUT.stage1);
2. `uharmony adapt` of stage 1 on the same datalists with `configs/brain-continue.toml`
   (class-balanced patch centres: the lesion class centred as often as the others; -> OUT.stage2);
3. `uharmony refit-gate` of stage 2 on all the heads (-> OUT.stage3): the gate alone, on 4x more views;
4-9. `uharmony adapt` on the same datalists with `configs/brain-lesion-{a,...,f}.toml` (-> OUT.stage4
   ... OUT.stage9): GIN off and the gate frozen; the network was still under-trained after
   stage 2 and had not learnt the lesion class;
10. `uharmony refit-gate --framing 0.15` of stage 9 on the heads with `gate2/` for T1 (-> OUT): the
   gate alone again, so that it routes the flatter T1 contrasts the network already segments (release
   1.6 sent the skull-stripped MNI template to FLAIR), on scans reframed by up to 15 % per side (release
   1.7 sent the ITK subject cropped by 10 % per side to T2); `uharmony segment` then averages the
   gate over five fields of view.
`finish` runs `uharmony bench real` (held-out MNI152 2009a and ITK KmeansTest), writes the pictures
to docs/images, and completes the card: sources and licences, intended use, limits, what had no
real evaluation. `--install` copies the package into uharmony/models/brain (the bundled default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from uharmony.data import heads, sources
from uharmony.data.io import write_json

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "brain.toml"
CONTINUE_CONFIG = REPO / "configs" / "brain-continue.toml"
LESION_CONFIGS = tuple(REPO / "configs" / f"brain-lesion-{x}.toml" for x in "abcdef")  # stages 4-9
LAST_ADAPT_STAGE = 3 + len(LESION_CONFIGS)  # the last stage that trains the segmentation network
LAST_STAGE = LAST_ADAPT_STAGE + 1  # then the gate refit on the gate-only variants
DOMAINS = ("mri-t1", "mri-t2", "mri-flair", "ct")
TRAIN_CASES, VAL_CASES, BASE_SEED = 36, 4, 0
GATE_TRAIN_CASES, GATE_VAL_CASES, GATE_SEED = 80, 20, 50000  # views for the gate refit only
GATE_STEPS, GATE_BATCH = 1500, 16
GATE_FRAMING = 0.15  # stage 10: each side of a gate view's scan cropped or padded by up to 15 %
GATE_VARIANT_DOMAINS = tuple(d for d in DOMAINS if heads.DOMAINS[d].get("gate_variants"))  # mri-t1
# 27 instead of 64 windows on a 200^3 1 mm head: the under-a-minute CPU budget (docs/benchmarks.md)
OVERLAP = 0.25
# lesion pieces under half a millilitre go to the next likely class: the false lesion on lesion-free real
# brains is scattered specks (the largest 0.42 ml), while the synthetic FLAIR lesions keep their Dice
POSTPROCESS = {"min_component_ml": {"lesion": 0.5}}

INTENDED_USE = ("Research use only; not validated on patients and not a medical device. Whole-head brain scans "
                "(MRI T1, T1 with contrast, T2, PD, FLAIR, or non-contrast CT) segmented into cerebrospinal fluid, "
                "grey matter, white matter and lesion at 2 mm, returned on the input's grid.")
LIMITATIONS = [
    ("Trained only on synthetic images rendered from ONE brain anatomy (an MNI-space tissue template) under "
     "random deformation: anatomy far from an adult brain (children, large resections, severe atrophy) is unseen."),
    ("Evaluated on real images only for T1 (MNI152 2009a average and one ITK example subject); T2, PD, FLAIR "
     "and CT have had NO evaluation on real images, only on synthetic held-out cases."),
    ("Lesions were random smooth blobs, and the lesion class is learnt only weakly and mostly for FLAIR "
     "(synthetic Dice about 0.5; about 0.1 in T1, 0 in T2 and CT) and has had no evaluation on real lesions. "
     "Lesion pieces under 0.5 ml are relabelled (postprocess), which clears the 1-2 ml of false lesion specks "
     "on lesion-free real brains but also drops real lesions that small."),
    ("CSF was derived (intracranial volume minus grey and white matter), so its boundary with dura and bone "
     "is approximate."),
    "Works at 2 mm: thin cortex is partial-volumed; volumes are estimates.",
    ("Inputs unlike every training domain are flagged as unfamiliar; their results are unreliable. The gate "
     "looks at five fields of view: it routes both real T1 images to T1 however they are cropped or padded "
     "(p 0.66-0.98) and flags neither at any framing (the flag takes the most familiar view), while masks and "
     "label maps stay flagged; it misses contrasts whose tissue order no domain has, and was never tested on a "
     "real T2, FLAIR, PD or CT scan; pass the domain when you know it."),
]


def cmd_data(out: str) -> int:
    from uharmony.data.heads import main as heads_main

    code = heads_main(["--out", out, "--domains", *DOMAINS, "--train", str(TRAIN_CASES), "--val", str(VAL_CASES),
                       "--seed", str(BASE_SEED)])
    gate = ["--train", str(GATE_TRAIN_CASES), "--val", str(GATE_VAL_CASES), "--seed", str(GATE_SEED)]
    code = code or heads_main(["--out", str(Path(out) / "gate"), "--domains", *DOMAINS, *gate])
    return code or heads_main(["--out", str(Path(out) / "gate2"), "--domains", *GATE_VARIANT_DOMAINS, *gate,
                               "--for-gate"])


def cmd_train(data: str, out: str, resume: bool) -> int:
    """Stages 1-10 (see the module docstring); a finished stage's package is kept and not redone."""
    from uharmony.cli import main as cli_main

    lists = [str(Path(data) / d / "dataset.json") for d in DOMAINS]

    def refit_gate(model: str, variants: tuple[str, ...] = (), framing: float = 0.0) -> list[str]:
        """The gate refit on all heads; the domains in ``variants`` take their gate heads from gate2/."""
        gate = [str(Path(data) / ("gate2" if d in variants else "gate") / d / "dataset.json") for d in DOMAINS]
        return ["refit-gate", "--model", model, "--data", *lists, *gate, "--steps", str(GATE_STEPS),
                "--batch-size", str(GATE_BATCH), *(["--framing", str(framing)] if framing else [])]

    folders = [f"{out}.stage{n}" for n in range(1, LAST_STAGE)] + [out]  # stage n writes folders[n - 1]
    again = ["--resume"] if resume else []
    steps = [
        ["train", "--data", *lists, "--config", _shown(CONFIG), *again],
        ["adapt", "--model", folders[0], "--data", *lists, "--config", _shown(CONTINUE_CONFIG), *again],
        refit_gate(folders[1]),
        *(["adapt", "--model", folders[n - 2], "--data", *lists, "--config", _shown(c), *again]
          for n, c in enumerate(LESION_CONFIGS, start=4)),
        refit_gate(folders[LAST_ADAPT_STAGE - 1], GATE_VARIANT_DOMAINS, GATE_FRAMING),
    ]
    for folder, argv in zip(folders, steps, strict=True):
        if (Path(folder) / "card.json").is_file():
            print(f"{folder} is done already; kept", file=sys.stderr)
            continue
        code = cli_main([*argv, "--out", folder, "--device", "auto"])
        if code:
            return code
    return 0


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (``make`` runs in the repo)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def synthetic_evaluation(model_dir: str, data: str) -> dict:
    """Dice per class on the validation heads of each domain, routed by the gate and by the true domain."""
    import torch

    from uharmony.data.datalist import union_label_space
    from uharmony.model.package import load_model
    from uharmony.progress import Reporter
    from uharmony.train.data import load_datasets
    from uharmony.train.trainer import evaluate, prepare_items

    model, card = load_model(model_dir)
    datasets = load_datasets([str(Path(data) / d / "dataset.json") for d in DOMAINS])
    union, maps = union_label_space(datasets)
    items = prepare_items(datasets, maps, union, card["input"]["spacing_mm"], model.gate.downsample,
                          Reporter("none"), split="validation")
    sets = {d: [i for i in items if i.domain == d] for d in DOMAINS}
    kw = {"patch": tuple(card["input"]["patch_size"]), "device": torch.device("cpu"),
          "overlap": float(card["input"]["overlap"])}
    auto = evaluate(model, sets, union, mode="auto", **kw)
    oracle = evaluate(model, sets, union, mode="oracle", **kw)
    return {"routing": "auto", "split": {d: "validation" for d in DOMAINS}, "cases": {d: len(v) for d, v in sets.items()},
            "dice": auto["dice"], "gate_accuracy": auto["gate_accuracy"], "dice_oracle_routing": oracle["dice"],
            "overlap": kw["overlap"]}


def finish_card(card: dict, real: dict, synthetic: dict | None = None) -> dict:
    card = dict(card)
    card["name"] = "brain"
    card["version"] = "1.8.1"
    card["description"] = ("Default UHarmony brain model: one U-Harmony network with four domains (MRI T1-like, "
                           "T2/PD-like, FLAIR-like, CT), trained on atlas-based synthetic heads (GIN in stages 1-2).")
    card["intended_use"] = INTENDED_USE
    card["limitations"] = list(LIMITATIONS)
    card["input"]["overlap"] = OVERLAP
    card["postprocess"] = POSTPROCESS
    training = dict(card["training"])
    training["command"] = "make brain-model (python -m uharmony.train.brain data/train/finish)"
    refit = {"steps": GATE_STEPS, "batch_size": GATE_BATCH, "gate_base_seed": GATE_SEED,
             "gate_cases_per_domain": {"training": GATE_TRAIN_CASES, "validation": GATE_VAL_CASES}}
    training["stages"] = [
        {"stage": 1, "what": "uharmony train", "config": "configs/brain.toml"},
        {"stage": 2, "what": "uharmony adapt on the same datalists (lesion-balanced continuation)",
         "config": "configs/brain-continue.toml"},
        {"stage": 3, "what": "uharmony refit-gate", **refit},
        *({"stage": n, "what": "uharmony adapt on the same datalists (GIN off, gate frozen)",
           "config": str(c.relative_to(REPO))} for n, c in enumerate(LESION_CONFIGS, start=4)),
        {"stage": LAST_STAGE, "what": "uharmony refit-gate, the T1 gate heads rendered with the gate-only "
         "variants (uharmony.data.heads --for-gate), on reframed scans", **refit,
         "gate_only_variants": list(GATE_VARIANT_DOMAINS), "framing": GATE_FRAMING},
    ]
    training["generator"] = {"module": "uharmony.data.heads", "atlas_version": heads.ATLAS_VERSION,
                             "cases_per_domain": {"training": TRAIN_CASES, "validation": VAL_CASES},
                             "base_seed": BASE_SEED}
    training["sources"] = [{"name": n, "package": sources.SOURCES[n].package, "licence": sources.SOURCES[n].licence,
                            "url": sources.SOURCES[n].url, "role": "training anatomy"}
                           for n in sources.TRAINING_SOURCES]
    training["held_out_sources"] = [{"name": n, "package": sources.SOURCES[n].package,
                                     "licence": sources.SOURCES[n].licence, "role": "evaluation only"}
                                    for n in sources.HELD_OUT_SOURCES]
    card["training"] = training
    old = dict(card.get("evaluation", {}))
    if synthetic is not None:  # the final model's own figures; stage 2's before/after kept for the record
        evaluation = dict(synthetic)
        evaluation["synthetic_validation_note"] = (
            "dice/gate_accuracy: held-out synthetic heads of each domain (validation split), routed by the gate; "
            "dice_oracle_routing: the same, routed by the true domain. gate_accuracy on more cases: "
            "training.stages / gate.refit (accuracy_after, 20 + 4 heads per domain)")
        if "before" in old:  # the last stage's before/after, at the stage's overlap
            record = {k: old[k] for k in ("before", "after", "table") if k in old}
            evaluation["last_stage_adaptation"] = {"stage": LAST_ADAPT_STAGE, **record}
        elif "last_stage_adaptation" in old:  # finish run again on a finished package
            evaluation["last_stage_adaptation"] = old["last_stage_adaptation"]
    else:
        evaluation = old
    evaluation["real_images"] = real["images"]
    evaluation["not_evaluated_on_real_images"] = ["mri-t2 (T2, PD)", "mri-flair", "ct", "lesion (every modality)"]
    card["evaluation"] = evaluation
    return card


def portable_paths(obj, roots, name: str = "work"):
    """``obj`` (a card) with every ``root/`` in its strings written as ``name/``, deepest root first.

    The trainer records the absolute paths it was given (its datalists, base model, command line); a card
    that ships with the repository names no machine's folders, only the layout of `make brain-model`.
    """
    prefixes = sorted({str(Path(r).resolve()).rstrip("/") + "/" for r in roots}, key=len, reverse=True)

    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, str):
            for prefix in prefixes:
                o = o.replace(prefix, f"{name}/")
        return o

    return walk(obj)


def _set_inference(card_path: Path) -> None:
    """The overlap and the clean-up that ship, so that every evaluation of `finish` uses them."""
    card = json.loads(card_path.read_text())
    if card["input"].get("overlap") != OVERLAP or card.get("postprocess") != POSTPROCESS:
        card["input"]["overlap"] = OVERLAP
        card["postprocess"] = POSTPROCESS
        write_json(card_path, card)


def cmd_finish(model: str, install: bool, images: str, data: str | None = None) -> int:
    from uharmony.bench.real import run_bench_real
    from uharmony.model.card import validate_card

    card_path = Path(model) / "card.json"
    _set_inference(card_path)  # first, so that every evaluation below uses the overlap and clean-up that ship
    real_json = Path(model) / "real_eval.json"
    run_bench_real(model, out=images, json_path=str(real_json))
    real = json.loads(real_json.read_text())
    real_json.unlink()
    synthetic = synthetic_evaluation(model, data) if data else None
    card = finish_card(json.loads(card_path.read_text()), real, synthetic)
    card = portable_paths(card, [Path(model).resolve().parent] + ([Path(data).resolve().parent] if data else []))
    validate_card(card, card_path)
    write_json(card_path, card)
    if install:
        dest = REPO / "uharmony" / "models" / "brain"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(model, dest)
        print(f"installed into {dest}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uharmony.train.brain", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("data")
    p.add_argument("--out", required=True)
    p = sub.add_parser("train")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("finish")
    p.add_argument("--model", required=True)
    p.add_argument("--images", default=str(REPO / "docs" / "images"))
    p.add_argument("--install", action="store_true")
    p.add_argument("--data", default=None, help="the heads of `data`: adds the synthetic validation to the card")
    a = ap.parse_args(argv)
    if a.step == "data":
        return cmd_data(a.out)
    if a.step == "train":
        return cmd_train(a.data, a.out, a.resume)
    return cmd_finish(a.model, a.install, a.images, a.data)


if __name__ == "__main__":
    sys.exit(main())
