"""Deterministic synthetic whole-head phantoms rendered in several contrast styles (domains).

The SynthSeg idea on a geometric phantom: an anatomy (tissue ids) is built in continuous millimetre
coordinates from a seed, then rendered per style with random per-tissue intensities, partial-volume
blur, an optional thick-slice axis, a smooth bias field (MRI) and noise.

* Same seed -> same anatomy at any spacing or grid (all random draws are made before the grid is
  known; random fields live on a fixed millimetre box in head coordinates).
* Same (seed, style, spacing, shape) -> bit-identical image. Only numpy element-wise maths and torch
  interpolation (one output element per computation, so no thread-count-dependent reductions).

``python -m uharmony.data.synth --seed 7 --style synth-t1 --spacing 1 --out x.nii.gz --labels y.nii.gz``
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("background", "cerebrospinal fluid", "grey matter", "white matter", "lesion")

# Tissue ids 0..4 equal the class values; the rest are non-target structures (label 0).
TISSUES: dict[str, int] = {
    "air": 0,
    "csf": 1,
    "grey": 2,
    "white": 3,
    "lesion": 4,
    "skull": 5,   # cortical bone (tables, skull base)
    "scalp": 6,   # skin, galea, muscle, soft tissue of face and neck
    "fat": 7,     # subcutaneous and orbital fat
    "eye": 8,     # vitreous
    "marrow": 9,  # diploe (fatty marrow between the skull tables)
}
N_TISSUES = len(TISSUES)
FOV_MM = (192.0, 224.0, 192.0)  # default field of view (LR, AP, SI)

AIR, CSF, GREY, WHITE, LESION, SKULL, SCALP, FAT, EYE, MARROW = range(N_TISSUES)
_TISSUE_TO_LABEL = np.array([t if t < len(CLASS_NAMES) else 0 for t in range(N_TISSUES)], np.uint8)


def labels_from_tissue(tissue: np.ndarray) -> np.ndarray:
    """Class label map (uint8, 0..4) from a tissue-id map."""
    return _TISSUE_TO_LABEL[tissue]


# --------------------------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How a tissue map becomes an image.

    ``means`` maps tissue name -> (mean, jitter sd). MRI: relative units, jitter relative (the case's
    global scale multiplies them); CT: Hounsfield units, jitter in HU. Jitter is clipped at 2 sd so the
    documented contrast orders always hold.
    """

    name: str
    modality: str  # "mri" or "ct"
    means: dict
    noise: tuple[float, float]  # MRI: Rician sigma as a fraction of the grey-matter mean; CT: HU sd
    scale: tuple[float, float] = (100.0, 3000.0)  # MRI global scale range (log-uniform)
    bias: tuple[float, float] = (0.10, 0.30)  # MRI multiplicative bias amplitude range
    # Partial-volume Gaussian sigma in voxels. A real scan averaged onto 2 mm voxels has sigma
    # ~0.3-0.5 voxel; at ~1 voxel the phantom looked far blurrier than any real 2 mm image.
    blur_vox: tuple[float, float] = (0.3, 0.7)
    lowres_p: float = 0.3  # probability of one thick-slice axis
    lowres_mm: tuple[float, float] = (3.0, 5.0)  # its slice thickness
    lowres_axes: tuple[int, ...] = (0, 1, 2)


STYLES: dict[str, Style] = {
    # MPRAGE-like: WM > GM > CSF, fat and diploe bright, cortical bone dark, lesion hypointense.
    "synth-t1": Style(
        "synth-t1", "mri",
        {"air": (0.0, 0.0), "csf": (0.22, 0.05), "grey": (0.60, 0.05), "white": (0.95, 0.05),
         "lesion": (0.42, 0.05), "skull": (0.07, 0.10), "scalp": (0.48, 0.06), "fat": (1.15, 0.05),
         "eye": (0.18, 0.06), "marrow": (0.85, 0.06)},
        noise=(0.01, 0.04)),
    # Fast spin echo T2: CSF > GM > WM, lesion bright, fat moderately bright, muscle dark.
    "synth-t2": Style(
        "synth-t2", "mri",
        {"air": (0.0, 0.0), "csf": (1.00, 0.05), "grey": (0.58, 0.05), "white": (0.42, 0.05),
         "lesion": (0.85, 0.05), "skull": (0.05, 0.10), "scalp": (0.32, 0.06), "fat": (0.72, 0.06),
         "eye": (0.95, 0.05), "marrow": (0.60, 0.06)},
        noise=(0.01, 0.04)),
    # T2-FLAIR (held back from training): fluid suppressed, lesion brightest, GM > WM.
    "synth-flair": Style(
        "synth-flair", "mri",
        {"air": (0.0, 0.0), "csf": (0.08, 0.08), "grey": (0.68, 0.05), "white": (0.47, 0.05),
         "lesion": (1.00, 0.05), "skull": (0.05, 0.10), "scalp": (0.45, 0.06), "fat": (0.75, 0.06),
         "eye": (0.10, 0.08), "marrow": (0.60, 0.06)},
        noise=(0.015, 0.045)),
    # Non-contrast head CT in HU: bone very bright, GM slightly above WM, hypodense lesion.
    "synth-ct": Style(
        "synth-ct", "ct",
        {"air": (-1000.0, 3.0), "csf": (9.0, 2.0), "grey": (38.0, 2.0), "white": (29.0, 2.0),
         "lesion": (18.0, 3.0), "skull": (1150.0, 80.0), "scalp": (45.0, 4.0), "fat": (-90.0, 8.0),
         "eye": (8.0, 2.0), "marrow": (450.0, 60.0)},
        noise=(2.0, 6.0), bias=(0.0, 0.0), blur_vox=(0.3, 0.6), lowres_axes=(2,)),
}
TRAINING_STYLES = ("synth-t1", "synth-t2")  # the starter model's domains
HELD_BACK_STYLES = ("synth-flair",)  # never trained on: tests the unfamiliar-input flag


@dataclass
class SynthCase:
    image: np.ndarray  # float32 (i, j, k)
    labels: np.ndarray  # uint8 (i, j, k), values in 0..4
    affine: np.ndarray  # 4x4 RAS
    style: str
    seed: int


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------

_FIELD_L = 112.0  # random fields live on [-L, L]^3 mm in head coordinates
_FIELD_N = 96  # grid points per axis of that box (2.4 mm)


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur_axis(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian blur along one axis; shifted-slice sums keep it exact and thread-independent."""
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="edge")  # edge: the border level (air) is preserved
    n = x.shape[axis]
    out = np.zeros_like(x)
    tmp = np.empty_like(x)
    for t, w in enumerate(k):
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(t, t + n)
        np.multiply(xp[tuple(sl)], w, out=tmp)
        out += tmp
    return out


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    for ax in range(x.ndim):
        x = _blur_axis(x, sigma, ax)
    return x


def _smooth_noise(rng: np.random.Generator, feature_mm: float) -> np.ndarray:
    """Unit-variance smooth random field on the (_FIELD_N)^3 grid, correlation length ~feature_mm.

    Drawn on a coarse grid (spacing = feature_mm), lightly smoothed, then upsampled: cheap at any
    feature size.
    """
    n = max(4, int(round(2 * _FIELD_L / feature_mm)) + 1)
    g = _blur(rng.standard_normal((n, n, n), dtype=np.float32), 1.0)
    g = F.interpolate(torch.from_numpy(g)[None, None], size=(_FIELD_N,) * 3,
                      mode="trilinear", align_corners=True)[0, 0].numpy()
    g = g - g.mean()
    return g / (g.std() + 1e-8)


def _sample_fields(fields: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Trilinear samples of fields (C, n, n, n) over [-L, L]^3 at head-local points of any shape."""
    shape = x.shape
    # grid_sample's last grid axis is (W, H, D) = (z, y, x) for a (C, x, y, z) volume.
    g = np.stack([z.ravel(), y.ravel(), x.ravel()], axis=-1) * np.float32(1.0 / _FIELD_L)
    g = torch.from_numpy(g.astype(np.float32, copy=False)).view(1, -1, 1, 1, 3)
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(fields))[None], g, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[0, :, :, 0, 0].numpy().reshape((fields.shape[0],) + shape)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def default_shape(spacing_mm: float) -> tuple[int, int, int]:
    return tuple(int(round(f / spacing_mm)) for f in FOV_MM)


def grid_affine(shape, spacing_mm: float) -> np.ndarray:
    """RAS affine with the given isotropic spacing and the grid centre at world (0, 0, 0)."""
    aff = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    aff[:3, 3] = -(np.asarray(shape, np.float64) - 1) / 2 * spacing_mm
    return aff


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass
class _Ellipsoid:
    centre: np.ndarray  # head-local mm
    axes: np.ndarray  # semi-axes mm
    bend: float = 0.0  # ends bend down (ventricle horns), fraction of the SI semi-axis


def _draw_anatomy(rng: np.random.Generator) -> dict:
    """Every random draw of an anatomy, in a fixed order, before any grid exists."""
    u = rng.uniform
    P: dict = {}
    P["axes"] = np.array([u(70, 80), u(85, 100), u(75, 88)])  # outer scalp semi-axes LR, AP, SI
    P["centre"] = np.array([u(-4, 4), u(-5, 5), u(-4, 3)])
    P["R"] = _rotation(np.deg2rad(u(-8, 8)), np.deg2rad(u(-5, 5)), np.deg2rad(u(-5, 5)))
    P["deform_mm"] = u(1.5, 3.0)
    P["t_scalp"], P["t_skull"], P["t_csf"], P["t_grey"] = u(4, 6), u(5, 8), u(2, 4), u(3, 4)
    P["skin"], P["galea"] = 1.0, 1.0
    # Skull base: plane rising anteriorly (anterior fossa above the orbits, posterior fossa lower).
    # Lateral dip: middle cranial fossae (temporal lobes) lie lower than the midline.
    P["base_z"], P["base_k"], P["t_base"] = -u(0.36, 0.44) * P["axes"][2], u(0.15, 0.30), u(4, 7)
    P["base_dip"] = u(8, 16)
    P["sulc_depth"], P["sulc_w1"], P["sulc_w2"] = u(12, 20), u(0.10, 0.14), u(0.55, 0.70)
    # Interhemispheric fissure, with the corpus callosum (no fissure) over a central AP span.
    P["fiss_hw"], P["cc_z"], P["cc_y"], P["cc_half"] = u(0.8, 1.4), u(14, 20), u(-8, 2), u(30, 38)
    # Unit-variance smooth fields in head coordinates (see _rasterise for where they are sampled).
    P["fields"] = np.stack([
        _smooth_noise(rng, 40.0),  # 0 surface deformation
        _smooth_noise(rng, 30.0),  # 1 scalp thickness
        _smooth_noise(rng, 30.0),  # 2 skull thickness
        _smooth_noise(rng, 25.0),  # 3 csf thickness
        _smooth_noise(rng, 15.0),  # 4 grey-matter thickness
        _smooth_noise(rng, 3.5),   # 5 folding: sulci at its zero crossings
        _smooth_noise(rng, 20.0),  # 6 sulcal depth
        _smooth_noise(rng, 35.0),  # 7 midline wiggle
    ])
    P["lesion_field"] = _smooth_noise(rng, 4.0)[None]
    # Neck below the head, slightly posterior.
    a = P["axes"]
    P["neck"] = (u(0.50, 0.60) * a[0], u(0.45, 0.55) * a[1], -u(0.05, 0.15) * a[1])
    # Deep grey nuclei (thalamus, lentiform, caudate), mirrored with independent jitter.
    nuclei = []
    for c, ax in (((11, -12, 3), (7, 11, 8)), ((22, 4, 2), (5, 13, 9)), ((11, 14, 10), (4, 8, 6))):
        for side in (-1, 1):
            cc = np.array([side * c[0], c[1], c[2]]) + rng.uniform(-2, 2, 3)
            nuclei.append(_Ellipsoid(cc, np.array(ax) * rng.uniform(0.85, 1.15, 3)))
    P["nuclei"] = nuclei
    # Lateral ventricles: AP-elongated, bent down at the horns; random enlargement (atrophy).
    big = u(0.8, 1.5)
    vy, vz = u(-5, 5), u(8, 15)
    vents = []
    for side in (-1, 1):
        ax = np.array([u(3.5, 5.5) * big, u(19, 26), u(6, 9) * big])
        vents.append(_Ellipsoid(np.array([side * (ax[0] + u(1.0, 2.5)), vy + u(-2, 2), vz + u(-1, 1)]),
                                ax, bend=u(0.3, 0.7)))
    P["ventricles"] = vents
    # Eyes (radius, lateral offset) — positioned analytically from the head surface later.
    P["eye_r"], P["eye_x"] = u(11, 12.5), u(29, 34)
    # Lesions: 0..3 blobs centred in deep white matter.
    n_les = int(rng.choice(4, p=[0.15, 0.35, 0.30, 0.20]))
    lesions = []
    for _ in range(3):  # always draw 3 so the stream does not depend on n_les
        r = u(4, 15)
        cand = rng.uniform(-1, 1, (64, 3))
        lesions.append((r, cand))
    P["lesions"] = [(r, _pick_lesion_centre(P, r, cand)) for r, cand in lesions[:n_les]]
    P["lesions"] = [(r, c) for r, c in P["lesions"] if c is not None]
    return P


def _inside(e: _Ellipsoid, x, y, z, grow: float = 0.0):
    """Normalised radius^2 of points in an (optionally bent, grown by `grow` mm) ellipsoid."""
    ax = e.axes + grow
    v = (y - e.centre[1]) / ax[1]
    w = (z - e.centre[2] + e.bend * ax[2] * v * v) / ax[2]
    return ((x - e.centre[0]) / ax[0]) ** 2 + v * v + w * w


def _base_z(P: dict, x, y):
    """Height (local mm) of the skull base: a plane rising anteriorly, dipping laterally."""
    f32 = np.float32
    xa = x * f32(1.0 / P["axes"][0])
    return f32(P["base_z"]) + f32(P["base_k"]) * y - f32(P["base_dip"]) * xa * xa


def _pick_lesion_centre(P: dict, r: float, cand: np.ndarray):
    """First candidate (in a cube scaled to the brain core) that sits in deep white matter.

    Checked analytically in millimetres, not on the voxel grid, so the choice is spacing-free.
    """
    core = (P["axes"] - (P["t_scalp"] + P["t_skull"] + P["t_csf"] + P["t_grey"]) - 12.0) * 0.75
    pts = cand * core
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ok = (x / core[0]) ** 2 + (y / core[1]) ** 2 + (z / core[2]) ** 2 < 1.0
    ok &= z - _base_z(P, x, y) > r + 8.0
    ok &= np.abs(x) > 6.0  # off the midline (fissure, corpus callosum edges)
    for e in P["ventricles"] + P["nuclei"]:
        ok &= _inside(e, x, y, z, grow=0.5 * r + 2.0) > 1.0
    idx = np.flatnonzero(ok)
    return pts[idx[0]] if idx.size else None


def _box(P: dict, affine: np.ndarray, shape, centre_local, radius: float):
    """Index slices of the world-space bounding box of a local sphere (None if outside the grid)."""
    cw = P["centre"] + P["R"] @ np.asarray(centre_local, np.float64)
    inv = np.linalg.inv(affine)
    lo = inv[:3, :3] @ (cw - radius) + inv[:3, 3]
    hi = inv[:3, :3] @ (cw + radius) + inv[:3, 3]
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    sl = []
    for a in range(3):
        a0, a1 = max(0, int(np.floor(lo[a]))), min(shape[a], int(np.ceil(hi[a])) + 1)
        if a1 <= a0:
            return None
        sl.append(slice(a0, a1))
    return tuple(sl)


def make_anatomy(seed: int, *, spacing_mm: float = 2.0, shape: tuple[int, int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Tissue-id map (uint8, see TISSUES) and its RAS affine for one seeded head.

    The default shape covers FOV_MM (~192 x 224 x 192 mm) with the grid centre at world (0, 0, 0).
    """
    shape = default_shape(spacing_mm) if shape is None else tuple(int(s) for s in shape)
    affine = grid_affine(shape, spacing_mm)
    P = _draw_anatomy(np.random.default_rng(seed))
    return _rasterise(P, shape, affine), affine


def _rasterise(P: dict, shape, affine: np.ndarray) -> np.ndarray:
    f32 = np.float32
    a = P["axes"].astype(f32)
    R = P["R"]
    # Head-local coordinates p = R^T (w - c): sums of broadcast 1-D axes (the affine is diagonal).
    w = [affine[i, i] * np.arange(shape[i]) + affine[i, 3] - P["centre"][i] for i in range(3)]
    bc = [(slice(None), None, None), (None, slice(None), None), (None, None, slice(None))]
    p = []
    for k in range(3):
        acc = np.zeros(shape, f32)
        for i in range(3):
            acc += (R[i, k] * w[i]).astype(f32)[bc[i]]
        p.append(acc)
    x, y, z = p
    t = np.zeros(shape, np.uint8)
    # Neck: elliptic cylinder below the head (soft tissue with a fat rim); the head overwrites it.
    nx, ny, ny0 = P["neck"]
    en = np.sqrt((x / f32(nx)) ** 2 + ((y - f32(ny0)) / f32(ny)) ** 2)
    dn = (1 - en) * f32(min(nx, ny))
    neck = (dn > 0) & (z < f32(-0.3 * a[2]))
    t[neck] = SCALP
    t[neck & (dn > 1.0) & (dn < 4.0)] = FAT
    del en, dn, neck

    xa, ya, za = x / a[0], y / a[1], z / a[2]
    r = np.sqrt(xa * xa + ya * ya + za * za)
    # Everything below works on the voxels that can be head (about half the field of view):
    # r < 1.2 is >= 14 mm outside the ellipsoid, beyond the largest surface deformation (9 mm).
    sel = np.flatnonzero(r < 1.2)
    tv = t.reshape(-1)[sel]
    r = r.reshape(-1)[sel]
    xa, ya, za = (v.reshape(-1)[sel] for v in (xa, ya, za))
    x, y, z = (v.reshape(-1)[sel] for v in p)
    # Approximate signed distance to the outer ellipsoid: first-order (r-1)/|grad r| (exact for
    # a sphere, close for these mild eccentricities).
    g = np.sqrt((xa / a[0]) ** 2 + (ya / a[1]) ** 2 + (za / a[2]) ** 2) + f32(1e-6)
    del xa, ya, za
    # Fields are sampled mostly at the point's radial projection on the scalp ellipsoid, so layer
    # thickness varies over the surface, not with depth, and sulci run inwards; the 35% of the true
    # position mixed in makes the sulci bend and branch with depth instead of being straight spokes.
    rr = f32(0.65) / np.maximum(r, f32(0.05)) + f32(0.35)
    fx = _sample_fields(P["fields"], x * rr, y * rr, z * rr)
    depth = (1.0 - r) * r / g + f32(P["deform_mm"]) * np.clip(fx[0], -3, 3)  # mm below the skin
    del g, rr, r

    t_sc = f32(P["t_scalp"]) * (1 + f32(0.12) * fx[1])
    t_sk = f32(P["t_skull"]) * (1 + f32(0.15) * fx[2])
    t_csf = f32(P["t_csf"]) * np.clip(1 + f32(0.2) * fx[3], 0.5, 1.5)
    t_gm = f32(P["t_grey"]) * np.clip(1 + f32(0.12) * fx[4], 0.7, 1.3)
    base = z - _base_z(P, x, y)  # mm above the skull base

    # Scalp layers: skin, subcutaneous fat, galea.
    head = depth >= 0
    tv[head] = SCALP
    tv[head & (depth >= P["skin"]) & (depth < t_sc - f32(P["galea"]))] = FAT
    inner = depth - t_sc - t_sk  # mm below the inner table of the vault
    cranial = depth >= t_sc
    above = base >= 0
    # Skull vault (outer table, diploe, inner table) and skull base; soft tissue below the base.
    vault = cranial & above & (inner < 0)
    tv[vault] = SKULL
    tv[vault & (inner >= -0.7 * t_sk) & (inner < -0.3 * t_sk)] = MARROW
    tv[cranial & ~above & (base >= -f32(P["t_base"]))] = SKULL
    del vault, t_sc, t_sk, depth

    # Intracranial: CSF, cortex with sulci, white matter.
    ic = cranial & above & (inner >= 0)
    del cranial, above, head
    pv = np.minimum(inner, base) - t_csf  # mm below the pial surface (before folding)
    del inner, t_csf, base
    n = fx[5]
    sd = f32(P["sulc_depth"]) * np.clip(1 + f32(0.35) * fx[6], 0.3, 1.7)
    s1 = np.exp(-(n / f32(P["sulc_w1"])) ** 2)  # narrow: CSF in the sulcus
    s2 = np.exp(-(n / f32(P["sulc_w2"])) ** 2)  # wide: grey matter lining its walls
    fiss = (z > f32(P["cc_z"])) | (np.abs(y - f32(P["cc_y"])) > f32(P["cc_half"]))
    pf = np.where(fiss, np.abs(x - f32(1.5) * fx[7]) - f32(P["fiss_hw"]), f32(1e4))
    del fiss, fx
    csf = ic & (np.minimum(pv - sd * s1, pf) < 0)
    grey = ic & ~csf & (np.minimum(pv - sd * s2, pf) < t_gm)
    tv[ic] = WHITE
    tv[grey] = GREY
    tv[csf] = CSF
    del pv, sd, s1, s2, pf, csf, grey, ic, t_gm
    t.reshape(-1)[sel] = tv
    x, y, z = p

    # Deep structures, evaluated only inside their bounding boxes.
    for e in P["nuclei"]:
        sl = _box(P, affine, shape, e.centre, float(e.axes.max()) + 1)
        if sl is not None:
            m = (_inside(e, x[sl], y[sl], z[sl]) < 1) & (t[sl] == WHITE)
            t[sl][m] = GREY
    for e in P["ventricles"]:
        sl = _box(P, affine, shape, e.centre, float(e.axes.max()) * (1 + e.bend) + 1)
        if sl is not None:
            m = (_inside(e, x[sl], y[sl], z[sl]) < 1) & ((t[sl] == WHITE) | (t[sl] == GREY))
            t[sl][m] = CSF
    for rad, c in P["lesions"]:
        sl = _box(P, affine, shape, c, 1.4 * rad + 1)
        if sl is None:
            continue
        lx, ly, lz = (np.ascontiguousarray(v[sl]) for v in (x, y, z))
        bump = _sample_fields(P["lesion_field"], lx, ly, lz)[0]
        dist = np.sqrt((lx - c[0]) ** 2 + (ly - c[1]) ** 2 + (lz - c[2]) ** 2) / f32(rad)
        tt = t[sl]
        m = (dist + f32(0.25) * bump < 1) & ((tt == WHITE) | (tt == GREY) | (tt == LESION))
        tt[m] = LESION
    _add_eyes(P, affine, shape, t, x, y, z)
    return t


def _add_eyes(P, affine, shape, t, x, y, z):
    """Two eyes in orbital fat, just below the anterior skull base and behind the face surface."""
    a, re, ex = P["axes"], P["eye_r"], P["eye_x"]
    ey, ez = 0.8 * a[1], P["base_z"]
    for _ in range(3):  # surface point and base height depend on each other; converges quickly
        ez = _base_z(P, ex, ey) - P["t_base"] - re - 2.0
        ey = a[1] * np.sqrt(max(0.05, 1 - (ex / a[0]) ** 2 - (ez / a[2]) ** 2)) - re - 2.5
    for side in (-1, 1):
        c = np.array([side * ex, ey, ez])
        sl = _box(P, affine, shape, c, re + 8)
        if sl is None:
            continue
        tt = t[sl]
        d_eye = np.sqrt((x[sl] - c[0]) ** 2 + (y[sl] - c[1]) ** 2 + (z[sl] - c[2]) ** 2)
        d_orb = np.sqrt((x[sl] - c[0]) ** 2 + (y[sl] - c[1] + 6) ** 2 + (z[sl] - c[2]) ** 2)
        tt[(d_orb < re + 5) & ((tt == SCALP) | (tt == FAT))] = FAT
        tt[(d_eye < re) & (tt != AIR)] = EYE


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _style_seed(seed: int, style: str) -> list[int]:
    # zlib.crc32, not hash(): Python salts str hashes per process.
    return [int(seed), zlib.crc32(style.encode("utf-8"))]


def render(tissue: np.ndarray, style: str, seed: int, *, spacing_mm: float = 2.0) -> np.ndarray:
    """Float32 image of a tissue map in one style; deterministic in (tissue, style, seed, spacing)."""
    if style not in STYLES:
        raise KeyError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    st = STYLES[style]
    rng = np.random.default_rng(_style_seed(seed, style))
    shape = tissue.shape
    # All scalar draws first, in a fixed order.
    names = sorted(TISSUES, key=TISSUES.get)
    mu = np.array([st.means[nm][0] for nm in names], np.float64)
    sd = np.array([st.means[nm][1] for nm in names], np.float64)
    jit = np.clip(rng.standard_normal(N_TISSUES), -2, 2) * sd
    mri = st.modality == "mri"
    scale = float(np.exp(rng.uniform(*np.log(st.scale)))) if mri else 1.0
    means = (mu * (1 + jit) * scale) if mri else (mu + jit)
    sigma_pv = rng.uniform(*st.blur_vox)
    do_lowres = rng.uniform() < st.lowres_p
    lr_axis = int(st.lowres_axes[rng.integers(len(st.lowres_axes))])
    lr_mm = rng.uniform(*st.lowres_mm)
    bias_amp = rng.uniform(*st.bias) if mri else 0.0
    bias_grid = rng.standard_normal((5, 5, 5))
    noise_lvl = rng.uniform(*st.noise)

    img = means.astype(np.float32)[tissue]
    img = _blur(img, sigma_pv)  # partial volume
    factor = lr_mm / spacing_mm
    if do_lowres and factor >= 1.5:  # thick slices on one axis, then back to the grid
        tt = torch.from_numpy(img)[None, None]
        small = list(shape)
        small[lr_axis] = max(2, int(round(shape[lr_axis] / factor)))
        tt = F.interpolate(tt, size=tuple(small), mode="area")
        img = F.interpolate(tt, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    if mri:
        if bias_amp > 0:
            b = bias_grid / np.abs(bias_grid).max()  # in [-1, 1]; trilinear stays within it
            b = F.interpolate(torch.from_numpy(b.astype(np.float32))[None, None], size=shape,
                              mode="trilinear", align_corners=True)[0, 0].numpy()
            img = img * np.exp(np.float32(np.log1p(bias_amp)) * b)
        sigma = np.float32(noise_lvl * means[GREY])
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2 * n2)  # Rician magnitude noise
    else:
        img = img + rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_lvl)
        img = np.clip(img, -1024.0, 3071.0)
    return np.ascontiguousarray(img, dtype=np.float32)


def make_case(seed: int, style: str, *, spacing_mm: float = 2.0, shape=None) -> SynthCase:
    """One seeded head rendered in one style; styles of the same seed share the labels."""
    tissue, affine = make_anatomy(seed, spacing_mm=spacing_mm, shape=shape)
    image = render(tissue, style, seed, spacing_mm=spacing_mm)
    return SynthCase(image=image, labels=labels_from_tissue(tissue), affine=affine, style=style,
                     seed=int(seed))


def write_case(case: SynthCase, image_path, label_path=None) -> None:
    """Write the image (and optionally the label map) as NIfTI with the case's affine."""
    import nibabel as nib

    def _save(arr, path):
        img = nib.Nifti1Image(arr, case.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(case.affine, code=1)
        img.set_sform(case.affine, code=1)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))

    _save(np.asarray(case.image, np.float32), image_path)
    if label_path is not None:
        _save(np.asarray(case.labels, np.uint8), label_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uharmony.data.synth",
                                 description="Write one synthetic head phantom as NIfTI.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", default="synth-t1", choices=sorted(STYLES))
    ap.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size, mm")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="grid size (default covers FOV)")
    ap.add_argument("--out", required=True, help="image path (.nii.gz)")
    ap.add_argument("--labels", default=None, help="label map path (.nii.gz)")
    args = ap.parse_args(argv)
    case = make_case(args.seed, args.style, spacing_mm=args.spacing, shape=args.shape)
    write_case(case, args.out, args.labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
