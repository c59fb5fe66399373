"""`uharmony bench real`: the model on REAL images whose labels never fed the training generator.

Held out (see `uharmony.data.sources.HELD_OUT_SOURCES`):

* **MNI152 2009a** (nilearn): a real MRI (an average of 152 T1 scans, brain-extracted, 1 mm) with its
  own grey/white-matter probability maps. Reference: ``GM + WM > 0.5`` split by the larger map; CSF is
  DERIVED as the template's non-zero voxels that are neither (so its Dice is only indicative). The
  generator's brain came from a different template (CAT12/IXI), but both live in MNI space: similar
  shape, hence the second source.
* **ITK KmeansTest** (Debian ITK examples): one real subject, whole head, 2x2x3 mm, with a k-means
  tissue labelling inside a skull-strip mask (4 CSF, 5 GM, 6 WM by their mean intensities). The
  reference is automatic, so the figure is AGREEMENT, not accuracy; it is scored inside the mask, and
  the brain the model finds outside the mask is reported in mL.

Dice per tissue, a picture per image (three slices with the overlay), the gate's choice; for a model
with an ``mri-t1`` domain also the figures with ``--domain mri-t1`` (what a user who knows the scan is
a T1 gets), since both labelled images are T1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from uharmony.data import sources
from uharmony.data.io import write_json

TISSUES = {1: "cerebrospinal fluid", 2: "grey matter", 3: "white matter"}


def _dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    out = {}
    for v, name in TISSUES.items():
        p, r = pred == v, ref == v
        if mask is not None:
            p, r = p & mask, r & mask
        denom = int(p.sum()) + int(r.sum())
        out[name] = round(2 * int((p & r).sum()) / denom, 4) if denom else None
    return out


def mni_reference(root: Path | None = None) -> tuple[Path, np.ndarray]:
    d = sources.fetch("nilearn", root)
    t1 = np.asarray(nib.load(d / "t1.nii.gz").dataobj, np.float32)
    gm = np.asarray(nib.load(d / "gm.nii.gz").dataobj, np.float32) / 255.0
    wm = np.asarray(nib.load(d / "wm.nii.gz").dataobj, np.float32) / 255.0
    ref = np.zeros(t1.shape, np.uint8)
    ref[t1 > 0] = 1  # derived CSF: inside the extracted brain, neither GM nor WM
    brain = gm + wm > 0.5
    ref[brain & (gm >= wm)] = 2
    ref[brain & (wm > gm)] = 3
    return d / "t1.nii.gz", ref


def itk_reference(root: Path | None = None) -> tuple[Path, np.ndarray, np.ndarray]:
    d = sources.fetch("itk-examples", root)
    km = np.asarray(nib.load(d / "kmeans.nii.gz").dataobj)
    mask = np.asarray(nib.load(d / "brain.nii.gz").dataobj) > 0
    ref = np.zeros(km.shape, np.uint8)
    for k, v in {4: 1, 5: 2, 6: 3}.items():
        ref[(km == k) & mask] = v
    return d / "t1.nii.gz", ref, mask


def run_bench_real(model=None, *, out: str = "docs/images", json_path: str | None = None, device: str = "cpu") -> int:
    from uharmony.infer.preview import save_preview
    from uharmony.infer.segment import Segmenter

    seg = Segmenter(model, device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"model": seg.card["name"], "model_sha256": seg.card["weights"]["sha256"], "images": {}}

    forced = "mri-t1" if "mri-t1" in seg.model.domains else None  # both labelled real images are T1

    def run(name: str, path: Path, title: str, domain: str = "auto"):
        t = time.perf_counter()
        pred = seg.predict_files([path], domain=domain)
        if domain != "auto":
            return pred, round(time.perf_counter() - t, 1)
        vol = pred.reference
        save_preview(vol, pred.labels, seg.card["classes"], out_dir / f"real_{name}.png",
                     title=f"{title}: gate {pred.gate.chosen} ({max(pred.gate.probabilities.values()):.2f})"
                           + (", UNFAMILIAR" if pred.gate.unfamiliar else ""))
        return pred, round(time.perf_counter() - t, 1)

    path, ref = mni_reference()
    pred, secs = run("mni152", path, "MNI152 2009a T1 (held out)")
    results["images"]["mni152_2009a"] = {
        "source": "nilearn MNI152 2009a T1 + GM/WM maps (held out)", "reference": "template GM/WM maps; CSF derived",
        "dice": _dice(pred.labels, ref), "gate": pred.gate.to_dict(), "seconds": secs,
        "lesion_ml": round(float((pred.labels == 4).sum()) * 1e-3, 1)}
    if forced:
        pred, _ = run("mni152", path, "", domain=forced)
        results["images"]["mni152_2009a"]["dice_with_domain_" + forced] = _dice(pred.labels, ref)
    path, ref, mask = itk_reference()
    pred, secs = run("itk_kmeans", path, "ITK KmeansTest T1, one real subject (held out)")
    vox_ml = float(np.prod(nib.load(path).header.get_zooms()[:3])) / 1000.0
    outside = (pred.labels >= 1) & (pred.labels <= 4) & ~mask
    results["images"]["itk_kmeans_t1"] = {
        "source": "ITK example KmeansTest_T1 (Debian insighttoolkit5-examples; held out)",
        "reference": "k-means labels inside the skull-strip mask (automatic: agreement, not accuracy)",
        "agreement_dice_in_mask": _dice(pred.labels, ref, mask), "gate": pred.gate.to_dict(), "seconds": secs,
        "brain_labelled_outside_mask_ml": round(float(outside.sum()) * vox_ml, 1),
        "mask_ml": round(float(mask.sum()) * vox_ml, 1),
        "lesion_ml": round(float((pred.labels == 4).sum()) * vox_ml, 1)}
    if forced:
        pred, _ = run("itk_kmeans", path, "", domain=forced)
        results["images"]["itk_kmeans_t1"]["agreement_with_domain_" + forced] = _dice(pred.labels, ref, mask)
    d = sources.fetch("nibabel")
    pred, secs = run("nibabel_anatomical", d / "anatomical.nii", "nibabel anatomical.nii (tiny real brain)")
    results["images"]["nibabel_anatomical"] = {"source": "nibabel tests/data/anatomical.nii", "reference": None,
                                               "gate": pred.gate.to_dict(), "seconds": secs}
    print(json.dumps(results, indent=1))
    if json_path:
        write_json(json_path, results)
    return 0
