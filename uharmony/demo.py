"""`uharmony demo`: the main job on the bundled model and a sample it has never seen.

The sample is a synthetic T1-like head phantom made on the spot from a fixed seed (90001) that no
training run uses; its true labels come with it, so the demo also prints the Dice it reached.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from uharmony.progress import Reporter

DEMO_SEED = 90001
DEMO_STYLE = "synth-t1"
DEMO_SPACING = 1.0


def run_demo(out: Path, device: str = "auto", reporter: Reporter | None = None) -> int:
    from uharmony.cli import human_summary
    from uharmony.data import synth
    from uharmony.infer.segment import Segmenter

    t0 = time.perf_counter()
    reporter = reporter or Reporter("auto")
    out.mkdir(parents=True, exist_ok=True)
    sample, truth = out / "sample_t1.nii.gz", out / "sample_t1_truth.nii.gz"
    if not sample.exists() or not truth.exists():
        reporter.log(f"making the sample (synthetic T1-like head, seed {DEMO_SEED}, {DEMO_SPACING:g} mm)...")
        case = synth.make_case(DEMO_SEED, DEMO_STYLE, spacing_mm=DEMO_SPACING)
        synth.write_case(case, sample, truth)
    segmenter = Segmenter(None, device, reporter)
    outputs = dict(output=out / "sample_t1_seg.nii.gz", report_path=out / "sample_t1_report.json",
                   preview_path=out / "sample_t1_preview.png")
    report = segmenter.segment_files([sample], overwrite=True, **outputs)
    reporter.result(report["outputs"], report)
    import nibabel as nib

    pred = np.asarray(nib.load(outputs["output"]).dataobj)
    ref = np.asarray(nib.load(truth).dataobj)
    dice = {}
    for c in report["classes"]:
        p, r = pred == c["value"], ref == c["value"]
        denom = int(p.sum()) + int(r.sum())
        dice[c["name"]] = 2 * int((p & r).sum()) / denom if denom else float("nan")
    if reporter.mode != "jsonl":
        print(human_summary(report))
        print("Dice against the sample's true labels: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
        print(f"look at {outputs['preview_path']}")
        print(f"demo wall time {time.perf_counter() - t0:.1f} s (sample generation included)")
    return 0
