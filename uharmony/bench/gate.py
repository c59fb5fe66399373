"""`uharmony bench gate`: does the gate pick the right domain, and is what it never saw flagged?

Each case goes through the whole pipeline (the unfamiliar-input score may need the segmentation).

Fresh synthetic cases (seeds 60000+, never used in training or calibration) of each training style,
of the held-back style and of the CT-like style, at 1.5 mm so the model's resampling is exercised.
"""

from __future__ import annotations

import sys

import numpy as np

from uharmony.data.io import write_json

GATE_SEED0 = 60000


def gate_eval(model=None, cases: int = 20, spacing_mm: float = 1.5, seed0: int = GATE_SEED0) -> dict:
    from uharmony.data import synth
    from uharmony.data.io import Volume
    from uharmony.infer.segment import Segmenter

    seg = Segmenter(model, "cpu")
    domains = seg.model.domains
    styles = list(dict.fromkeys([*domains, *synth.HELD_BACK_STYLES, "synth-ct"]))
    result = {"cases_per_style": cases, "spacing_mm": spacing_mm, "seeds": f"{seed0}..{seed0 + cases - 1}",
              "threshold": float(seg.card["gate"]["unfamiliar_threshold"]), "styles": {}}
    for style in styles:
        chosen, flagged, scores = [], [], []
        for i in range(cases):
            case = synth.make_case(seed0 + i, style, spacing_mm=spacing_mm)
            g = seg.predict_volumes([Volume(case.image, case.affine, f"{style}-{seed0 + i}")]).gate
            chosen.append(g.chosen)
            flagged.append(g.unfamiliar)
            scores.append(g.score)
        entry = {"flagged_unfamiliar": float(np.mean(flagged)), "score_median": float(np.median(scores)),
                 "score_max": float(np.max(scores)), "score_min": float(np.min(scores))}
        if style in domains:
            entry["gate_accuracy"] = float(np.mean([c == style for c in chosen]))
        else:
            entry["chosen"] = {d: chosen.count(d) for d in domains}
        result["styles"][style] = entry
    return result


def run_bench_gate(cases: int = 20, model=None, json_path: str | None = None) -> int:
    r = gate_eval(model, cases)
    print(f"{cases} fresh cases per style at {r['spacing_mm']} mm, seeds {r['seeds']}, "
          f"unfamiliar threshold {r['threshold']:.3g}", file=sys.stderr)
    print(f"{'style':<14}{'trained on':>11}{'gate right':>12}{'flagged':>9}{'score median':>14}")
    for style, e in r["styles"].items():
        trained = "gate_accuracy" in e
        acc = f"{e['gate_accuracy']:.0%}" if trained else "-"
        print(f"{style:<14}{'yes' if trained else 'no':>11}{acc:>12}{e['flagged_unfamiliar']:>9.0%}{e['score_median']:>14.3g}")
    if json_path:
        write_json(json_path, r, indent=2)
    return 0
