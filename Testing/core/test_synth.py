"""Synthetic head phantoms: determinism, anatomy, contrast orders, geometry, NIfTI output."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uharmony.data import synth as S

REPO = Path(__file__).resolve().parents[2]
ML = 1000.0  # mm^3 per mL


@pytest.fixture(scope="module")
def anat2():
    return S.make_anatomy(3, spacing_mm=2.0)


@pytest.fixture(scope="module")
def anat1():
    return S.make_anatomy(3, spacing_mm=1.0)


def _interior(mask):
    """Voxels whose 6 neighbours share the mask: medians free of partial volume."""
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    m[:, :, 1:] &= mask[:, :, :-1]
    m[:, :, :-1] &= mask[:, :, 1:]
    return m


def _medians(tissue, image):
    """Median per tissue over its deepest voxels (eroded up to twice): in CT the thin CSF layer
    under 1000-HU bone is otherwise all partial volume; the ventricles are not."""
    out = {}
    for name, k in S.TISSUES.items():
        m = tissue == k
        for _ in range(2):
            e = _interior(m)
            if e.sum() < 20:
                break
            m = e
        out[name] = float(np.median(image[m])) if m.any() else None
    return out


def test_public_constants():
    assert S.CLASS_NAMES[0] == "background" and len(S.CLASS_NAMES) == 5
    for i, n in enumerate(("air", "csf", "grey", "white", "lesion")):
        assert S.TISSUES[n] == i
    assert {"synth-t1", "synth-t2", "synth-flair", "synth-ct"} <= set(S.STYLES)
    for st in S.STYLES.values():
        assert set(st.means) == set(S.TISSUES)


def test_same_seed_identical_different_seed_differs():
    a = S.make_case(5, "synth-t1")
    b = S.make_case(5, "synth-t1")
    c = S.make_case(6, "synth-t1")
    assert a.image.dtype == np.float32 and a.labels.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.image[:10, :10, :10], c.image[:10, :10, :10])


def test_bit_identical_in_another_process_with_one_thread():
    shape = (48, 56, 48)
    here = S.make_case(11, "synth-flair", spacing_mm=4.0, shape=shape)
    code = ("import hashlib, torch; torch.set_num_threads(1);"
            "from uharmony.data import synth as S;"
            f"c = S.make_case(11, 'synth-flair', spacing_mm=4.0, shape={shape});"
            "print(hashlib.sha256(c.image.tobytes() + c.labels.tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=REPO).stdout.strip()
    assert out == hashlib.sha256(here.image.tobytes() + here.labels.tobytes()).hexdigest()


def test_labels_and_plausible_volumes(anat1, anat2):
    vols = {}
    for (tissue, affine), sp in ((anat2, 2.0), (anat1, 1.0)):
        labels = S.labels_from_tissue(tissue)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
        assert np.allclose(np.diag(affine)[:3], sp)
        vv = sp ** 3 / ML
        vols[sp] = {k: (labels == k).sum() * vv for k in (1, 2, 3, 4)}
        assert all(vols[sp][k] > 0 for k in (1, 2, 3)), vols[sp]
        assert 300 < vols[sp][2] < 900 and 300 < vols[sp][3] < 900, vols[sp]
        assert 80 < vols[sp][1] < 500, vols[sp]
    for k in (1, 2, 3):  # same anatomy in millimetres at both spacings
        assert abs(vols[1.0][k] - vols[2.0][k]) / vols[1.0][k] < 0.15, (k, vols)


def test_classes_present_and_lesions_mostly_in_white_matter():
    with_lesion, ring_wm, ring_all = 0, 0, 0
    for seed in range(8):
        t, _ = S.make_anatomy(seed, spacing_mm=3.0)
        assert all((t == k).any() for k in (1, 2, 3)), seed
        les = t == S.TISSUES["lesion"]
        if les.any():
            with_lesion += 1
            ring = ~_interior(~les) & ~les  # voxels just outside the lesions
            ring_wm += (ring & (t == S.TISSUES["white"])).sum()
            ring_all += ring.sum()
    assert with_lesion >= 5
    assert ring_wm > 0.5 * ring_all


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrast_orders(seed):
    tissue, _ = S.make_anatomy(seed, spacing_mm=2.0)
    has_lesion = (tissue == S.TISSUES["lesion"]).sum() >= 20
    images = {s: S.render(tissue, s, seed) for s in S.STYLES}
    m = {s: _medians(tissue, im) for s, im in images.items()}
    t1, t2, fl, ct = m["synth-t1"], m["synth-t2"], m["synth-flair"], m["synth-ct"]
    assert t1["white"] > t1["grey"] > t1["csf"]
    assert t1["fat"] > t1["grey"] and t1["skull"] < t1["csf"]
    assert t2["csf"] > t2["grey"] > t2["white"]
    assert fl["grey"] > fl["white"] > fl["csf"]
    if has_lesion:
        assert t2["lesion"] > t2["grey"]
        assert fl["lesion"] > max(fl["grey"], fl["white"], fl["csf"])
    assert ct["skull"] > 500 and ct["air"] < -900
    assert 20 <= ct["white"] < ct["grey"] <= 45
    # CT CSF away from bone (ventricles, deep sulci): thin CSF under the skull is partial volume.
    bone = (tissue == S.TISSUES["skull"]) | (tissue == S.TISSUES["marrow"])
    for _ in range(4):
        bone = ~_interior(~bone)  # dilate by one voxel
    ct_img = images["synth-ct"]
    csf_deep = float(np.median(ct_img[(tissue == S.TISSUES["csf"]) & ~bone]))
    assert csf_deep < ct["white"] and -5 < csf_deep < 25


def test_styles_share_labels_and_differ_in_intensity():
    cases = [S.make_case(4, s, spacing_mm=3.0) for s in S.STYLES]
    for c in cases[1:]:
        assert np.array_equal(c.labels, cases[0].labels)
        assert np.array_equal(c.affine, cases[0].affine)
    brain = cases[0].labels == 3
    # Normalised WM/GM ratios distinguish the MRI styles.
    ratios = [np.median(c.image[brain]) / np.median(c.image[cases[0].labels == 2]) for c in cases]
    assert len({round(r, 2) for r in ratios}) == len(ratios)


def test_geometry_and_head_centre(anat2):
    tissue, affine = anat2
    assert tissue.shape == S.default_shape(2.0) == (96, 112, 96)
    assert np.allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    idx = np.argwhere(tissue > 0)
    world = idx * 2.0 + affine[:3, 3]
    assert np.all(np.abs(world.mean(0)) < 12), world.mean(0)
    centre_vox = (np.asarray(tissue.shape) - 1) / 2
    assert np.allclose(affine[:3, :3] @ centre_vox + affine[:3, 3], 0)
    t, a = S.make_anatomy(3, spacing_mm=2.0, shape=(40, 50, 60))
    assert t.shape == (40, 50, 60) and np.allclose(np.diag(a)[:3], 2.0)


def test_write_case_roundtrip_and_cli(tmp_path):
    nib = pytest.importorskip("nibabel")
    case = S.make_case(2, "synth-ct", spacing_mm=4.0)
    S.write_case(case, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    img, lab = nib.load(tmp_path / "img.nii.gz"), nib.load(tmp_path / "lab.nii.gz")
    assert np.array_equal(np.asarray(img.dataobj), case.image)
    assert np.array_equal(np.asarray(lab.dataobj), case.labels)
    assert lab.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, case.affine) and np.allclose(lab.affine, case.affine)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert S.main(["--seed", "2", "--style", "synth-ct", "--spacing", "4",
                   "--out", str(tmp_path / "cli.nii.gz"), "--labels", str(tmp_path / "cli_l.nii.gz")]) == 0
    assert np.array_equal(np.asarray(nib.load(tmp_path / "cli.nii.gz").dataobj), case.image)


def test_unknown_style():
    t, _ = S.make_anatomy(0, spacing_mm=8.0)
    with pytest.raises(KeyError):
        S.render(t, "synth-pd", 0)
