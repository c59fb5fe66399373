"""`uharmony demo`: the main job on the bundled model and a scan it has never seen.

``--sample real`` (default): a REAL whole-head T1 (the ITK example subject "KmeansTest_T1", Debian's
insighttoolkit5-examples, Apache-2.0), fetched into the cache by the set-up step (`make demo` runs
`python -m uharmony.data.sources itk-examples` first). Its labels never fed the training generator; the
demo prints the AGREEMENT with its automatic k-means labels inside the brain mask.

``--sample synthetic``: a synthetic T1-like head phantom made on the spot from seed 90001 (no training
run uses it), with its true labels, so the demo prints Dice. Needs nothing but the package.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from uharmony.progress import Reporter

DEMO_SEED = 90001
DEMO_STYLE = "synth-t1"
DEMO_SPACING = 1.0


def _synthetic_sample(out: Path, reporter: Reporter) -> tuple[Path, Path, None]:
    from uharmony.data import synth

    sample, truth = out / "sample_t1.nii.gz", out / "sample_t1_truth.nii.gz"
    if not sample.exists() or not truth.exists():
        reporter.log(f"making the sample (synthetic T1-like head, seed {DEMO_SEED}, {DEMO_SPACING:g} mm)...")
        case = synth.make_case(DEMO_SEED, DEMO_STYLE, spacing_mm=DEMO_SPACING)
        synth.write_case(case, sample, truth)
    return sample, truth, None


def _real_sample(out: Path, reporter: Reporter) -> tuple[Path, np.ndarray, np.ndarray]:
    import shutil

    from uharmony.bench.real import itk_reference

    path, ref, mask = itk_reference()  # fetched by the set-up step (or now, from the package index)
    sample = out / "sample_t1.nii.gz"
    if not sample.exists():
        shutil.copyfile(path, sample)
    reporter.log(f"sample: a real whole-head T1 (ITK example KmeansTest_T1, 2x2x3 mm), copied to {sample}")
    return sample, ref, mask


def run_demo(out: Path, device: str = "auto", reporter: Reporter | None = None, sample: str = "real") -> int:
    import nibabel as nib

    from uharmony.cli import human_summary
    from uharmony.infer.segment import Segmenter

    t0 = time.perf_counter()
    reporter = reporter or Reporter("auto")
    out.mkdir(parents=True, exist_ok=True)
    if sample == "real":
        sample_path, ref, mask = _real_sample(out, reporter)
    else:
        sample_path, truth, mask = _synthetic_sample(out, reporter)
        ref = np.asarray(nib.load(truth).dataobj)
    segmenter = Segmenter(None, device, reporter)
    outputs = {"output": out / "sample_t1_seg.nii.gz", "report_path": out / "sample_t1_report.json",
               "preview_path": out / "sample_t1_preview.png"}
    report = segmenter.segment_files([sample_path], overwrite=True, **outputs)
    reporter.result(report["outputs"], report)
    pred = np.asarray(nib.load(outputs["output"]).dataobj)
    region = mask if mask is not None else np.ones(pred.shape, bool)
    dice = {}
    for c in report["classes"]:
        if mask is not None and c["value"] not in (1, 2, 3):
            continue  # the k-means reference has CSF, grey and white matter only
        p, r = (pred == c["value"]) & region, (ref == c["value"]) & region
        denom = int(p.sum()) + int(r.sum())
        dice[c["name"]] = 2 * int((p & r).sum()) / denom if denom else float("nan")
    if reporter.mode != "jsonl":
        print(human_summary(report))
        what = ("Agreement (Dice) with the sample's automatic k-means labels inside its brain mask (not accuracy: "
                "the reference is itself automatic): " if mask is not None else
                "Dice against the sample's true labels: ")
        print(what + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
        print(f"look at {outputs['preview_path']}")
        print(f"demo wall time {time.perf_counter() - t0:.1f} s")
    return 0
