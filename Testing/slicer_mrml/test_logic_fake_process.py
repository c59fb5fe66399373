"""SegmentLogic on slicer-core's real MRML, driven through a protocol-speaking stand-in process.

The stand-in (fake_uharmony) lets these tests control timing and failure exactly: cancel in the
middle of a slow stage, a chosen exit code. The same paths with the real library are in
test_e2e_uharmony.py.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from mrml_testing import add_volume, ijk_to_ras, oblique_flipped_matrix, phantom
from mrml_helpers import ras_centroid_from_kji, segment_ras_centroid, tertile_labels

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from UHarmonySegmentLib import SegmentLogic, SubprocessRunner  # noqa: E402
from UHarmonySegmentLib.Logic import INPUT_ATTRIBUTE, SegmentError  # noqa: E402
from UHarmonySegmentLib.ProcessRunner import pid_alive  # noqa: E402


def make_logic(scene, tmp_path, env, **kwargs):
    temp_root = tmp_path / "private"
    temp_root.mkdir(exist_ok=True)
    return SegmentLogic(scene, SubprocessRunner(grace_period_s=3.0), temp_root=str(temp_root),
                        environment=env, library_module="fake_uharmony", **kwargs)


def segments_by_name(node):
    seg = node.GetSegmentation()
    return {seg.GetNthSegment(i).GetName(): seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())}


def test_oblique_flipped_volume_comes_back_aligned_named_and_tagged(scene, tmp_path, fake_environment):
    array = phantom()
    matrix = oblique_flipped_matrix()
    assert np.linalg.det(matrix[:3, :3]) < 0  # really a flipped frame
    volume = add_volume(scene, array, matrix)
    before_array = slicer.util.arrayFromVolume(volume).copy()
    before_matrix = ijk_to_ras(volume)
    before_mtime = volume.GetImageData().GetMTime()

    logic = make_logic(scene, tmp_path, fake_environment)
    progress = []
    result = logic.segment_sync([volume], on_progress=lambda *a: progress.append(a))

    assert result.succeeded, result.message
    assert result.warnings == []
    node = result.segmentation_node
    assert node is not None and scene.IsNodePresent(node)
    assert node.GetName() == "scan segmentation"
    # progress events became increasing fractions that end at 1
    fractions = [p[3] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    # world coordinates: each segment's centroid equals the one computed from the input array
    expected = tertile_labels(array)
    names = segments_by_name(node)
    for value, name in ((1, "cerebrospinal fluid"), (2, "grey matter"), (3, "white matter")):
        centroid, count = segment_ras_centroid(node, names[name])
        assert count == int((expected == value).sum())
        np.testing.assert_allclose(centroid, ras_centroid_from_kji(expected == value, matrix), atol=1e-3)

    # names, colours and terminology from the card; the standard table fills what the card lacks
    seg = node.GetSegmentation()
    csf = seg.GetSegment(names["cerebrospinal fluid"])
    assert csf.GetLabelValue() == 1
    assert csf.GetColor() == pytest.approx((0.333333, 0.737255, 1.0), abs=1e-6)
    assert "SCT^65216001^Cerebrospinal Fluid" in csf.GetTerminology()
    grey = seg.GetSegment(names["grey matter"])
    assert "SCT^389081007^Gray Matter" in grey.GetTerminology()  # not in the card: standard table
    lesion = seg.GetSegment(names["lesion"])  # a class with no voxel: an empty segment, still tagged
    assert segment_ras_centroid(node, names["lesion"])[1] == 0
    assert lesion.GetColor() == pytest.approx((144 / 255, 238 / 255, 144 / 255), abs=1e-4)
    assert lesion.GetTerminology().split("~")[1:3] == ["SCT^49755003^Morphologically Altered Structure", "SCT^4147007^Mass"]
    assert "background" not in names

    # reference geometry = the input's; a closed surface exists for 3D; display node made
    ref = node.GetSegmentation().GetConversionParameter("Reference image geometry")
    probe = slicer.vtkMRMLSegmentationNode()
    probe.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert ref == probe.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert seg.ContainsRepresentation("Closed surface")
    surface = vtk.vtkPolyData()
    node.GetClosedSurfaceRepresentation(names["white matter"], surface)
    assert surface.GetNumberOfPoints() > 0
    assert node.GetDisplayNode() is not None

    # provenance
    assert node.GetAttribute(INPUT_ATTRIBUTE) == volume.GetID()
    assert node.GetAttribute("UHarmony.Model") == "fake"
    assert node.GetAttribute("UHarmony.ModelSHA256") == "0" * 64
    assert node.GetAttribute("UHarmony.Domain") == "synth-t1"
    assert json.loads(node.GetAttribute("UHarmony.DomainProbabilities")) == {"synth-t1": 0.9, "synth-t2": 0.1}
    stored = json.loads(node.GetAttribute("UHarmony.Report"))
    assert "inputs" not in stored and "output" not in stored  # no dangling temp paths in the scene

    # the input is untouched and the private folder is gone
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before_array)
    np.testing.assert_array_equal(ijk_to_ras(volume), before_matrix)
    assert volume.GetImageData().GetMTime() == before_mtime
    assert volume.GetStorageNode() is None
    assert os.listdir(tmp_path / "private") == []
    assert not logic.is_running


def test_seg_nrrd_written_by_slicer_reads_back_with_slicerio(scene, tmp_path, fake_environment):
    slicerio = pytest.importorskip("slicerio")
    array, matrix = phantom(), oblique_flipped_matrix()
    volume = add_volume(scene, array, matrix)
    result = make_logic(scene, tmp_path, fake_environment).segment_sync([volume])
    path = str(tmp_path / "result.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(result.segmentation_node)

    read = slicerio.read_segmentation(path)
    segments = {s["name"]: s for s in read["segments"]}
    assert set(segments) == {"cerebrospinal fluid", "grey matter", "white matter", "lesion"}
    assert segments["white matter"]["color"] == pytest.approx([0.980392, 0.980392, 0.823529], abs=1e-5)
    csf_terms = segments["cerebrospinal fluid"]["terminology"]
    assert list(csf_terms["type"]) == ["SCT", "65216001", "Cerebrospinal Fluid"]
    assert list(csf_terms["category"]) == ["SCT", "123037004", "Anatomical Structure"]
    assert csf_terms["contextName"] == "Segmentation category and type - DICOM master list"
    assert not segments["cerebrospinal fluid"]["nameAutoGenerated"]
    assert not segments["cerebrospinal fluid"]["colorAutoGenerated"]
    assert segments["lesion"]["labelValue"] == 4
    # geometry, independently: slicerio's voxels and IJK->LPS give the same RAS centroid
    voxels = read["voxels"]
    ijk_to_lps = np.asarray(read["ijkToLPS"], float)
    ijk_to_ras_file = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    expected = tertile_labels(array)
    for value, name in ((1, "cerebrospinal fluid"), (3, "white matter")):
        label_value = segments[name]["labelValue"]
        layer = segments[name].get("layer", 0)
        data = voxels if voxels.ndim == 3 else voxels[layer]
        mask_ijk = data == label_value  # slicerio arrays are indexed (i, j, k)
        i, j, k = np.nonzero(mask_ijk)
        centroid = (ijk_to_ras_file @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].mean(axis=1)
        assert mask_ijk.sum() == (expected == value).sum()
        np.testing.assert_allclose(centroid, ras_centroid_from_kji(expected == value, matrix), atol=1e-3)


def test_cancel_after_first_progress_ends_process_and_removes_files(scene, tmp_path, fake_environment):
    env = dict(fake_environment, FAKE_UHARMONY_DELAY="5")
    volume = add_volume(scene, phantom(), oblique_flipped_matrix())
    logic = make_logic(scene, tmp_path, env)
    seen = {}

    def on_progress(stage, done, total, fraction):
        if "first" not in seen:
            seen["first"] = (stage, done)
            seen["temp"] = logic._task.temp_dir
            seen["temp_existed"] = os.path.isdir(logic._task.temp_dir)
            task.cancel()

    started = time.monotonic()
    task = logic.segment([volume], on_progress=on_progress)
    result = task.wait(60)
    elapsed = time.monotonic() - started

    assert result is not None and result.cancelled, result and result.message
    assert seen["first"] == ("read", 0) and seen["temp_existed"]
    assert elapsed < 4.5  # SIGTERM ended it; we did not sit through a 5 s stage
    worker = int(open(env["FAKE_UHARMONY_PIDFILE"]).read())
    assert worker == task.pid
    deadline = time.monotonic() + 5
    while pid_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(worker)
    assert not os.path.exists(seen["temp"])
    assert os.listdir(tmp_path / "private") == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not logic.is_running


def test_failure_surfaces_message_and_exit_code_and_adds_nothing(scene, tmp_path, fake_environment):
    env = dict(fake_environment, FAKE_UHARMONY_FAIL="3:input_0.nrrd: the image is constant (every voxel is 0)")
    volume = add_volume(scene, phantom(), oblique_flipped_matrix())
    logic = make_logic(scene, tmp_path, env)
    finished = []
    task = logic.segment([volume], on_finished=finished.append)
    result = task.wait(60)
    assert finished == [result]
    assert result.status == "failed" and result.exit_code == 3
    assert "the image is constant" in result.message and "bad input image" in result.message
    assert result.message.startswith("'scan': the image is constant")  # volume name instead of the temp file
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert os.listdir(tmp_path / "private") == []
    with pytest.raises(SegmentError) as info:
        logic.segment_sync([volume])
    assert info.value.result.exit_code == 3


def test_replace_reuses_the_previous_result_and_add_makes_a_new_one(scene, tmp_path, fake_environment):
    volume = add_volume(scene, phantom(), oblique_flipped_matrix())
    logic = make_logic(scene, tmp_path, fake_environment)
    first = logic.segment_sync([volume]).segmentation_node
    second = logic.segment_sync([volume], replace=True).segmentation_node
    assert second is first
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert first.GetSegmentation().GetNumberOfSegments() == 4  # replaced, not appended
    third = logic.segment_sync([volume], replace=False).segmentation_node
    assert third is not first and third.GetName() != first.GetName()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2


def test_volume_under_linear_transform_is_hardened_copy_and_input_untouched(scene, tmp_path, fake_environment):
    array, matrix = phantom(), oblique_flipped_matrix()
    volume = add_volume(scene, array, matrix)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    to_parent = np.eye(4)
    to_parent[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)  # 90 degrees about S
    to_parent[:3, 3] = (40.0, -5.0, 12.0)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, to_parent[r, c])
    transform.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = make_logic(scene, tmp_path, fake_environment).segment_sync([volume])
    assert result.succeeded
    assert any("hardened" in w for w in result.warnings)
    node = result.segmentation_node
    assert node.GetParentTransformNode() is None  # the result lives in world coordinates
    centroid, _ = segment_ras_centroid(node, segments_by_name(node)["white matter"])
    np.testing.assert_allclose(centroid, ras_centroid_from_kji(tertile_labels(array) == 3, to_parent @ matrix), atol=1e-3)
    assert volume.GetParentTransformNode() is transform
    np.testing.assert_array_equal(ijk_to_ras(volume), matrix)


def test_non_linear_transform_is_refused_with_a_message(scene, tmp_path, fake_environment):
    volume = add_volume(scene, phantom(), oblique_flipped_matrix())
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    spline = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (((0, 0, 0), (1, 0, 0)), ((50, 0, 0), (50, 3, 0)), ((0, 50, 0), (0, 50, 2)), ((0, 0, 50), (4, 0, 50))):
        src.InsertNextPoint(p)
        dst.InsertNextPoint(q)
    spline.SetSourceLandmarks(src)
    spline.SetTargetLandmarks(dst)
    transform.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = make_logic(scene, tmp_path, fake_environment).segment([volume]).result
    assert result is not None and result.status == "failed"  # refused before any process started
    assert "non-linear transform" in result.message and "scan" in result.message
    assert not os.path.exists(fake_environment["FAKE_UHARMONY_PIDFILE"])
    assert os.listdir(tmp_path / "private") == []


@pytest.mark.parametrize("kind", ["label", "empty", "none", "vector"])
def test_unusable_inputs_are_refused_before_running(scene, tmp_path, fake_environment, kind):
    if kind == "label":
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(node, np.ones((4, 4, 4), np.uint8))
        expected = "only scalar"
    elif kind == "empty":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing")
        expected = "no image data"
    elif kind == "vector":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "rgb")
        image = vtk.vtkImageData()
        image.SetDimensions(4, 4, 4)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
        node.SetAndObserveImageData(image)
        expected = "several components"
    else:
        node = None
        expected = "not selected"
    result = make_logic(scene, tmp_path, fake_environment).segment([node]).result
    assert result.status == "failed" and expected in result.message
    assert os.listdir(tmp_path / "private") == []


def test_stray_stdout_lines_are_logged_not_fatal_and_busy_logic_refuses_a_second_run(scene, tmp_path, fake_environment):
    env = dict(fake_environment, FAKE_UHARMONY_STRAY="1", FAKE_UHARMONY_DELAY="0.3")
    volume = add_volume(scene, phantom(), oblique_flipped_matrix())
    logic = make_logic(scene, tmp_path, env)
    logs = []
    task = logic.segment([volume], on_log=logs.append)
    with pytest.raises(RuntimeError, match="already running"):
        logic.segment([volume])
    result = task.wait(60)
    assert result.succeeded
    assert "a stray line that is not JSON" in logs
    assert "fake_uharmony: starting" in logs  # stderr reaches the log too


def test_unstartable_interpreter_fails_cleanly(scene, tmp_path, fake_environment):
    volume = add_volume(scene, phantom(), oblique_flipped_matrix())
    logic = make_logic(scene, tmp_path, fake_environment, python_executable=str(tmp_path / "no-such-python"))
    result = logic.segment([volume]).result
    assert result.status == "failed" and "no-such-python" in result.message
    assert os.listdir(tmp_path / "private") == []
    assert not logic.is_running
