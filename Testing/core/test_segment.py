"""`uharmony segment` in process: grids, orientations, formats, multi-contrast, the gate, OOM fallback."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import world_centroid
from uharmony.data.io import Volume, read_volume, resample_onto, write_volume
from uharmony.errors import BadInputError, UHarmonyError
from uharmony.infer.segment import Segmenter

WM, CSF = 3, 1


@pytest.fixture(scope="module")
def starter(starter_dir):
    return Segmenter(starter_dir, "cpu")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_label_map_is_on_the_input_grid(starter, phantom, tmp_path, suffix):
    path, case = phantom
    src = tmp_path / f"in{suffix}"
    write_volume(src, case.image, case.affine)
    before = src.read_bytes()
    out, rep = tmp_path / f"seg{suffix}", tmp_path / "report.json"
    report = starter.segment_files([src], out, report_path=rep)
    seg = read_volume(out)
    assert seg.shape == case.image.shape
    np.testing.assert_allclose(seg.affine, case.affine, atol=1e-4)
    labels = np.asarray(seg.array)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4} and {1, 2, 3} <= set(np.unique(labels))
    assert src.read_bytes() == before  # the input is untouched
    on_disk = json.loads(rep.read_text())
    assert on_disk["domain"]["chosen"] == "synth-t1" and not on_disk["domain"]["unfamiliar"]
    assert on_disk["domain"]["unsure"] is False and on_disk["domain"]["probabilities"]["synth-t1"] > 0.8
    assert on_disk["model"]["sha256"] == starter.card["weights"]["sha256"]
    voxel_ml = 8.0 / 1000
    wm = next(c for c in on_disk["classes"] if c["name"] == "white matter")
    assert wm["voxels"] == int((labels == WM).sum())
    assert wm["volume_ml"] == pytest.approx(wm["voxels"] * voxel_ml, rel=1e-6)
    assert set(on_disk["timings_s"]) >= {"read", "preprocess", "gate", "network", "postprocess", "write", "total"}
    assert report["outputs"] == [str(out), str(rep)]


def test_the_starter_model_segments_a_fresh_phantom(starter, phantom):
    _, case = phantom
    pred = starter.predict_volumes([Volume(case.image, case.affine, "t1")])
    for value in (CSF, 2, WM):
        p, r = pred.labels == value, case.labels == value
        dice = 2 * (p & r).sum() / (p.sum() + r.sum())
        assert dice > 0.7, (value, dice)


def _flipped(v: Volume) -> Volume:
    arr = v.array[::-1, :, ::-1]
    n = np.array(v.shape)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[:3, 3] = [n[0] - 1, 0, n[2] - 1]
    return Volume(np.ascontiguousarray(arr), v.affine @ flip, "flipped")


def _permuted(v: Volume, order=(2, 0, 1)) -> Volume:
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, order]  # new axis a is old axis order[a]
    return Volume(np.ascontiguousarray(np.transpose(v.array, order)), v.affine @ perm, "permuted")


def _oblique(v: Volume, degrees: float = 25.0) -> Volume:
    """The same head on a grid rotated about an oblique axis (world-space resampling)."""
    axis = np.array([1.0, 1.0, 0.3]) / np.linalg.norm([1.0, 1.0, 0.3])
    t = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    spacing = 2.0
    shape = (110, 120, 110)
    centre = (v.affine @ np.append((np.array(v.shape) - 1) / 2, 1))[:3]
    aff = np.eye(4)
    aff[:3, :3] = rot * spacing
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    ref = Volume(np.zeros(shape, np.float32), aff, "grid")
    return resample_onto(v, ref)


def test_flipped_and_permuted_axes_give_the_same_world_segmentation(starter, phantom):
    _, case = phantom
    base = Volume(case.image, case.affine, "base")
    ref = starter.predict_volumes([base]).labels
    flipped = _flipped(base)
    lab_f = starter.predict_volumes([flipped]).labels
    assert lab_f.shape == flipped.shape
    np.testing.assert_array_equal(lab_f[::-1, :, ::-1], ref)  # exact: reorientation is lossless
    permuted = _permuted(base)
    lab_p = starter.predict_volumes([permuted]).labels
    np.testing.assert_array_equal(np.transpose(lab_p, np.argsort((2, 0, 1))), ref)
    for value in (CSF, WM):
        c0 = world_centroid(ref, base.affine, value)
        np.testing.assert_allclose(world_centroid(lab_f, flipped.affine, value), c0, atol=1e-6)
        np.testing.assert_allclose(world_centroid(lab_p, permuted.affine, value), c0, atol=1e-6)


def test_oblique_grid_lands_on_the_same_world_coordinates(starter, phantom, tmp_path):
    _, case = phantom
    base = Volume(case.image, case.affine, "base")
    oblique = _oblique(base)
    src = tmp_path / "oblique.nrrd"
    write_volume(src, oblique.array, oblique.affine)
    out = tmp_path / "oblique_seg.nrrd"
    starter.segment_files([src], out)
    seg = read_volume(out)
    np.testing.assert_allclose(seg.affine, oblique.affine, atol=1e-4)
    truth = resample_onto(Volume(case.labels.astype(np.float32), case.affine, "truth"), oblique, order=0).array
    for value in (CSF, WM):
        got = world_centroid(np.asarray(seg.array), seg.affine, value)
        want = world_centroid(truth, oblique.affine, value)
        assert np.linalg.norm(got - want) < 2.5, (value, got, want)  # within about one voxel
        p, r = np.asarray(seg.array) == value, truth == value
        assert 2 * (p & r).sum() / (p.sum() + r.sum()) > 0.65


def test_gate_unsure_is_a_small_margin_between_its_first_two_choices():
    from uharmony.infer.segment import UNSURE_MARGIN, GateResult

    def gate(probs, mode="auto"):
        return GateResult(probs, max(probs, key=probs.get), mode, False, 1.0, 2.0)

    assert gate({"t1": 0.39, "t2": 0.25, "flair": 0.26, "ct": 0.10}).unsure  # nibabel's tiny real volume
    assert not gate({"t1": 0.72, "flair": 0.28}).unsure  # the MNI152 template: no majority needed
    assert gate({"a": 0.55, "b": 0.45}).unsure and not gate({"a": 0.7, "b": 0.3}).unsure  # two domains too
    assert not gate({"t1": 0.39, "t2": 0.25, "flair": 0.26, "ct": 0.10}, mode="forced").unsure  # the user chose
    assert not gate({"only": 1.0}).unsure
    assert gate({"a": 0.5 + UNSURE_MARGIN / 2 - 1e-3, "b": 0.5 - UNSURE_MARGIN / 2 + 1e-3}).to_dict()["unsure"] is True


def test_forced_domain_and_unknown_domain(starter, phantom):
    _, case = phantom
    pred = starter.predict_volumes([Volume(case.image, case.affine, "t1")], domain="synth-t2")
    assert pred.gate.chosen == "synth-t2" and pred.gate.mode == "forced"
    assert pred.gate.probabilities["synth-t1"] > 0.5  # the gate still reports what it thinks
    with pytest.raises(UHarmonyError, match="not a domain of this model"):
        starter.predict_volumes([Volume(case.image, case.affine, "t1")], domain="mri-flair")


def test_gate_picks_the_style_and_flags_the_held_back_one(starter_dir):
    from uharmony.bench.gate import gate_eval

    r = gate_eval(starter_dir, cases=6, spacing_mm=2.0, seed0=71000)
    for style in ("synth-t1", "synth-t2"):
        assert r["styles"][style]["gate_accuracy"] >= 0.95
        assert r["styles"][style]["flagged_unfamiliar"] <= 1 / 6
    assert r["styles"]["synth-flair"]["flagged_unfamiliar"] >= 5 / 6


def test_multi_contrast_inputs_on_different_grids(tiny_model_2ch, phantom, tmp_path):
    _, case = phantom
    first = tmp_path / "t1.nii.gz"
    write_volume(first, case.image, case.affine)
    moved = case.affine.copy()
    moved[:3, :3] *= 1.5  # coarser, shifted grid that still overlaps
    moved[:3, 3] += 7.0
    second = tmp_path / "t2.nrrd"
    write_volume(second, case.image[::2, ::2, ::2].copy(), moved)
    seg = Segmenter(tiny_model_2ch, "cpu")
    out = tmp_path / "seg.nii.gz"
    seg.segment_files([first, second], out)
    img = nib.load(out)
    assert img.shape == case.image.shape
    np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)

    far = case.affine.copy()
    far[:3, 3] += 5000.0
    third = tmp_path / "far.nii.gz"
    write_volume(third, case.image, far)
    with pytest.raises(BadInputError) as e:
        seg.segment_files([first, third], tmp_path / "seg2.nii.gz")
    assert "far.nii.gz" in str(e.value)
    assert not (tmp_path / "seg2.nii.gz").exists()
    with pytest.raises(BadInputError, match="expects 2 input image"):
        seg.segment_files([first], tmp_path / "seg3.nii.gz")


def test_cuda_out_of_memory_finishes_on_the_cpu(tiny_model, phantom, monkeypatch):
    """No GPU exists here: the device is marked CUDA and the first network call raises CUDA's OOM."""
    _, case = phantom
    seg = Segmenter(tiny_model, "cpu")
    real = seg.run_network
    calls = []

    def flaky(x, domain):
        calls.append(str(seg.device))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, domain)

    real_gate = seg.run_gate

    def gate_then_pretend_cuda(x, domain="auto"):
        seg.device = torch.device("cuda")  # from here on the segmenter believes it runs on a GPU
        return real_gate(x, domain)

    monkeypatch.setattr(seg, "run_network", flaky)
    monkeypatch.setattr(seg, "run_gate", gate_then_pretend_cuda)
    pred = seg.predict_volumes([Volume(case.image, case.affine, "t1")])
    assert calls == ["cuda", "cpu"]
    assert pred.labels.shape == case.image.shape
    assert any("out of memory" in n for n in pred.notes)
    assert seg.device.type == "cpu"


def test_memory_estimate_refuses_before_loading(tiny_model, phantom):
    from uharmony.errors import OutOfMemoryError

    path, _ = phantom
    seg = Segmenter(tiny_model, "cpu", max_memory=1 << 20)
    with pytest.raises(OutOfMemoryError, match="GiB"):
        seg.predict_files([path])


def test_drop_small_components_gives_specks_to_the_next_likely_class():
    from uharmony.infer.postprocess import drop_small_components

    scores = torch.zeros(4, 12, 12, 12)
    scores[0] = 1.0
    scores[2, 1:5, 1:5, 1:5] = 5.0  # a 64-voxel piece of class 2
    scores[2, 9, 9, 9] = scores[2, 10, 10, 10] = 5.0  # a 2-voxel piece (diagonal neighbours: 26-connected)
    scores[3, 9, 9, 9], scores[1, 10, 10, 10] = 3.0, 3.0  # their next most likely classes differ
    scores[3, 6:8, 6:8, 6:8] = 5.0  # class 3: 8 voxels, not cleaned
    labels = scores.argmax(0)
    before = labels.clone()
    assert drop_small_components(scores, labels, {2: 10, 1: 5}) == {2: 2, 1: 0}
    assert int((labels == 2).sum()) == 64 and int(labels[9, 9, 9]) == 3 and int(labels[10, 10, 10]) == 1
    changed = labels != before
    assert int(changed.sum()) == 2 and int((labels == 3).sum()) == 9
    assert drop_small_components(scores, labels, {2: 65}) == {2: 64} and not (labels == 2).any()
    assert drop_small_components(scores, labels, {3: 1}) == {3: 0}  # a floor of one voxel keeps everything


def test_segment_drops_small_components_by_card_and_by_option(starter_dir, phantom, tmp_path):
    """The card's `postprocess.min_component_ml`, the option that overrides it, and the report."""
    import shutil

    from uharmony.errors import ExitCode

    _, case = phantom
    vol = Volume(case.image, case.affine, "t1")
    plain = Segmenter(starter_dir, "cpu").predict_volumes([vol])
    wm_value = 3
    wm_ml = float((plain.labels == wm_value).sum()) * 8.0 / 1000  # 2 mm voxels
    # a floor above the whole white matter: every piece of it goes to the next likely class
    pkg = tmp_path / "starter"
    shutil.copytree(starter_dir, pkg)
    card = json.loads((pkg / "card.json").read_text())
    card["postprocess"] = {"min_component_ml": {"White Matter": wm_ml + 1}}
    (pkg / "card.json").write_text(json.dumps(card))
    seg = Segmenter(pkg, "cpu")
    cleaned = seg.predict_volumes([vol])
    assert not (cleaned.labels == wm_value).any()
    assert cleaned.removed_ml == {"white matter": pytest.approx(wm_ml, abs=1e-3)}
    moved = plain.labels == wm_value
    assert (cleaned.labels[~moved] == plain.labels[~moved]).all()  # nothing else changes
    assert set(np.unique(cleaned.labels[moved])) <= {0, 1, 2, 4}
    report = seg.make_report(cleaned, ["in"], "out")
    assert report["postprocess"] == {"min_component_ml": {"white matter": wm_ml + 1},
                                     "removed_ml": {"white matter": pytest.approx(wm_ml, abs=1e-3)}}
    wm = next(c for c in report["classes"] if c["name"] == "white matter")
    assert wm["voxels"] == 0
    # the option overrides the card, whatever the case of the name: 0 keeps every piece
    kept = Segmenter(pkg, "cpu", min_component_ml={"WHITE matter": 0}).predict_volumes([vol])
    assert (kept.labels == plain.labels).all() and kept.removed_ml == {}
    with pytest.raises(UHarmonyError, match="no class 'tumour'") as e:
        Segmenter(pkg, "cpu", min_component_ml={"tumour": 1.0})
    assert e.value.code == ExitCode.USAGE
