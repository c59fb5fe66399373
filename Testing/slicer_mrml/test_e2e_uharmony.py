"""End to end: real MRML (slicer-core) + the REAL `python -m uharmony segment` process + the bundled
model, through SubprocessRunner — the same path the module takes inside Slicer, minus Qt.

The input is a synthetic head (uharmony.data.synth, a small 64x72x64 grid at 2 mm to keep the CPU
run short) given an oblique AND flipped IJK-to-RAS: the voxels are mirrored along i (negative
determinant) and the world is rotated by 15 degrees. Checks are independent of the module's code:
nibabel on the library run directly on the same file, and slicerio on the written .seg.nrrd.
What is tested is the module's path (export, process, import, geometry), not the model's accuracy:
the segmentation must equal, voxel for voxel in world space, what the library itself writes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mrml_testing import REPO, add_volume, ijk_to_ras, library_ready
from mrml_helpers import ras_centroid_from_kji, segment_ras_centroid

slicer = pytest.importorskip("slicer")
nib = pytest.importorskip("nibabel")

from UHarmonySegmentLib import LibraryCommands, SegmentLogic, SubprocessRunner  # noqa: E402
from UHarmonySegmentLib.Logic import INPUT_ATTRIBUTE  # noqa: E402
from UHarmonySegmentLib.Presentation import model_choices, summarize_report  # noqa: E402
from UHarmonySegmentLib.ProcessRunner import pid_alive  # noqa: E402

ENV = {"PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def ready():
    ok, reason = library_ready()
    if not ok:
        pytest.skip(f"the real library cannot segment yet: {reason}")


@pytest.fixture(scope="module")
def sample(ready, tmp_path_factory):
    """(oblique/flipped NIfTI path, (k,j,i) image, IJK->RAS, (k,j,i) ground-truth labels)."""
    folder = tmp_path_factory.mktemp("sample")
    image_path, labels_path = folder / "synth.nii.gz", folder / "labels.nii.gz"
    subprocess.run([sys.executable, "-m", "uharmony.data.synth", "--seed", "90001", "--style", "synth-t1",
                    "--spacing", "2", "--shape", "64", "72", "64", "--out", str(image_path), "--labels", str(labels_path)],
                   check=True, cwd=REPO, env={**os.environ, **ENV}, capture_output=True)
    image, labels = nib.load(image_path), nib.load(labels_path)
    data = np.asarray(image.dataobj, dtype=np.float32)  # (i, j, k)
    truth = np.asarray(labels.dataobj).astype(np.uint8)
    affine = image.affine.astype(float)
    # mirror the voxels along i and fix the matrix: same world content, det < 0
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
    data, truth, affine = data[::-1].copy(), truth[::-1].copy(), affine @ flip
    # rotate the world by 15 degrees about A-P through the volume's centre: oblique
    centre = affine @ np.array([*(np.array(data.shape) - 1) / 2.0, 1.0])
    a = math.radians(15)
    rot = np.eye(4)
    rot[:3, :3] = [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    affine = back @ rot @ shift @ affine
    assert np.linalg.det(affine[:3, :3]) < 0
    oblique = folder / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), oblique)
    return str(oblique), np.ascontiguousarray(data.transpose(2, 1, 0)), affine, np.ascontiguousarray(truth.transpose(2, 1, 0))


@pytest.fixture(scope="module")
def direct_run(sample, tmp_path_factory):
    """The library run directly on the same oblique file: its label map read with nibabel."""
    folder = tmp_path_factory.mktemp("direct")
    out, report = folder / "labels.nii.gz", folder / "report.json"
    done = subprocess.run([sys.executable, "-m", "uharmony", "segment", sample[0], "-o", str(out), "--report", str(report),
                           "--device", "cpu", "--model", "starter"], cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    label = nib.load(out)
    return np.asarray(label.dataobj).astype(np.uint8).transpose(2, 1, 0), label.affine, json.loads(report.read_text())


def logic_for(scene, tmp_path):
    root = tmp_path / "private"
    root.mkdir(exist_ok=True)
    return SegmentLogic(scene, SubprocessRunner(grace_period_s=5.0), temp_root=str(root), environment=ENV)


def names_to_ids(node):
    seg = node.GetSegmentation()
    return {seg.GetNthSegment(i).GetName(): seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())}


def test_real_segment_of_oblique_flipped_volume_is_aligned_and_complete(scene, tmp_path, sample, direct_run):
    _, image, affine, _truth = sample
    direct_labels, direct_affine, direct_report = direct_run
    volume = add_volume(scene, image, affine, name="head")
    before = slicer.util.arrayFromVolume(volume).copy()

    logic = logic_for(scene, tmp_path)
    stages = []
    started = time.monotonic()
    result = logic.segment_sync([volume], model="starter", device="cpu",  # the small bundled model: fast
                                on_progress=lambda stage, *rest: stages.append(stage))
    elapsed = time.monotonic() - started
    assert result.succeeded, result.message
    assert elapsed < 120
    assert {"read", "infer", "write"} <= set(stages)
    node = result.segmentation_node
    ids = names_to_ids(node)

    commands = LibraryCommands(python_executable=sys.executable, environment=ENV)
    card = commands.model_info("starter")
    classes = {c["name"]: c for c in card["classes"] if c["value"] != 0}
    assert set(ids) == set(classes)
    for name, cls in classes.items():
        segment = node.GetSegmentation().GetSegment(ids[name])
        assert segment.GetLabelValue() == cls["value"]
        assert segment.GetColor() == pytest.approx(tuple(cls["color"]), abs=1e-5)
        assert f"SCT^{cls['terminology']['type']['code']}^" in segment.GetTerminology()

    # world coordinates: identical to the library's own output on the same file (read with nibabel)
    for name in ("cerebrospinal fluid", "grey matter", "white matter"):
        value = classes[name]["value"]
        centroid, count = segment_ras_centroid(node, ids[name])
        assert count == int((direct_labels == value).sum()) > 0
        np.testing.assert_allclose(centroid, ras_centroid_from_kji(direct_labels == value, direct_affine), atol=0.05)

    # provenance and the gate
    models = {m["name"]: m for m in commands.list_models()}
    assert node.GetAttribute(INPUT_ATTRIBUTE) == volume.GetID()
    assert node.GetAttribute("UHarmony.ModelSHA256") == result.report["model"]["sha256"] == direct_report["model"]["sha256"]
    assert models["starter"]["sha256"] == result.report["model"]["sha256"]
    probabilities = json.loads(node.GetAttribute("UHarmony.DomainProbabilities"))
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert probabilities == pytest.approx(direct_report["domain"]["probabilities"], abs=1e-4)
    chosen = direct_report["domain"]["chosen"]
    assert node.GetAttribute("UHarmony.Domain") == result.report["domain"]["chosen"] == chosen
    assert node.GetAttribute("UHarmony.Unfamiliar") == ("true" if direct_report["domain"]["unfamiliar"] else "false")
    assert node.GetAttribute("UHarmony.GateUnsure") == ("true" if direct_report["domain"]["unsure"] else "false")
    summary = summarize_report(result.report)
    assert summary.domain_text.startswith(chosen) and len(summary.rows) == len(classes)

    # the input is untouched; the private folder is gone
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
    np.testing.assert_allclose(ijk_to_ras(volume), affine)
    assert os.listdir(tmp_path / "private") == []

    # written as .seg.nrrd by Slicer's storage node, read back independently with slicerio
    slicerio = pytest.importorskip("slicerio")
    path = str(tmp_path / "head.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(node)
    read = slicerio.read_segmentation(path)
    segments = {s["name"]: s for s in read["segments"]}
    assert {n: s["labelValue"] for n, s in segments.items()} == {n: c["value"] for n, c in classes.items()}
    voxels = read["voxels"]
    to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(read["ijkToLPS"], float)
    value = classes["white matter"]["value"]
    i, j, k = np.nonzero(voxels == segments["white matter"]["labelValue"])
    centroid = (to_ras @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].mean(axis=1)
    np.testing.assert_allclose(centroid, ras_centroid_from_kji(direct_labels == value, direct_affine), atol=0.05)


def test_real_cancel_after_first_progress_event(scene, tmp_path, sample):
    volume = add_volume(scene, sample[1], sample[2], name="head")
    logic = logic_for(scene, tmp_path)
    seen = {}

    def on_progress(stage, done, total, fraction):
        if not seen:
            seen["temp"] = logic._task.temp_dir
            seen["existed"] = os.path.isdir(seen["temp"])
            task.cancel()

    task = logic.segment([volume], device="cpu", on_progress=on_progress)
    result = task.wait(120)
    assert result is not None and result.cancelled, result and result.message
    assert seen["existed"]
    deadline = time.monotonic() + 10
    while pid_alive(task.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(task.pid)
    assert not os.path.exists(seen["temp"])
    assert os.listdir(tmp_path / "private") == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_real_bad_input_reports_message_and_exit_code(scene, tmp_path, ready):
    volume = add_volume(scene, np.full((40, 48, 40), 7, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]), name="flat")
    result = logic_for(scene, tmp_path).segment_sync([volume], device="cpu", raise_on_error=False)
    assert result.status == "failed"
    assert result.exit_code == 3, result.message
    assert "constant" in result.message.lower()
    assert "'flat'" in result.message and "input_0" not in result.message  # the volume's name, not the temp file
    assert "bad input image" in result.message
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert os.listdir(tmp_path / "private") == []


def test_real_library_commands_feed_the_widget(ready):
    commands = LibraryCommands(python_executable=sys.executable, environment=ENV, runner_factory=SubprocessRunner)
    choices = model_choices(commands.list_models())
    assert choices[0].value == "brain" and choices[0].enabled and "bundled" in choices[0].label  # the default
    assert any(c.value == "starter" and c.enabled for c in choices)
    devices = commands.devices()
    assert {"cuda", "mps", "auto"} <= set(devices)
    got = []
    runner = commands.call_async(["info", "--model", "starter", "--json"], lambda data, error: got.append((data, error)))
    runner.wait(120)
    assert got and got[0][1] is None and got[0][0]["classes"]
