"""UHarmonyTrain's Qt-free logic on slicer-core's REAL MRML: scene cases exported through storage
nodes (geometry checked in world coordinates on the written files, read back with SimpleITK, not
with the module's code), datalists the library accepts, the REAL `python -m uharmony adapt` and
`models add` processes on three tiny cases, cancel, refusals before anything runs, and the
federated site logic against a stand-in `fed` process (see test_join_* below for why a stand-in)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
import time

import numpy as np
import pytest
from mrml_testing import REPO, add_volume, ijk_to_ras, oblique_flipped_matrix, phantom

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

sys.path.insert(0, os.path.join(REPO, "UHarmonyTrain"))

from UHarmonySegmentLib import SubprocessRunner
from UHarmonySegmentLib.ProcessRunner import pid_alive
from UHarmonyTrainLib import (
    AdaptLogic,
    AdaptRequest,
    FederatedLogic,
    JoinRequest,
    MetricHistory,
    RoundHistory,
    SceneCase,
    chart_geometry,
)
from UHarmonyTrainLib.Cases import export_scene_cases, label_table
from UHarmonyTrainLib.Federated import interpret_availability, read_public_key

ENV = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
TINY_CLASSES = ["background", "cerebrospinal fluid", "grey matter", "white matter", "lesion"]


# -- helpers --------------------------------------------------------------------------------


def add_segmentation(scene, labels_kji, matrix, names: dict[int, str], volume, name="seg"):
    """A segmentation node made from a label array (Slicer's own import), segments renamed by value."""
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name}-labels")
    slicer.util.updateVolumeFromArray(label, labels_kji.astype(np.uint8))
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    label.SetIJKToRASMatrix(m)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, node, "")
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        segment.SetName(names[segment.GetLabelValue()])
    if volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    scene.RemoveNode(label)
    return node


def file_ijk_to_ras(path):
    """IJK->RAS of an image file, read with SimpleITK (LPS) and turned into RAS: independent of the module."""
    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m, sitk.GetArrayFromImage(image)  # array is (k, j, i)


def world_centroid(mask_kji, matrix):
    k, j, i = np.nonzero(mask_kji)
    return (matrix @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].mean(axis=1)


def private_root(tmp_path):
    root = tmp_path / "private"
    root.mkdir(exist_ok=True)
    return root


def adapt_logic(scene, tmp_path, **kwargs):
    return AdaptLogic(scene, SubprocessRunner(grace_period_s=3.0), temp_root=str(private_root(tmp_path)),
                      environment=ENV, **kwargs)


# -- metric and round series (plain Python) ---------------------------------------------------


def test_metric_history_series_comparison_and_chart():
    history = MetricHistory()
    history.add({"v": 1, "event": "metric", "step": 0, "loss": None, "phase": "before",
                 "dice": {"flair": {"grey matter": 0.2, "white matter": 0.4, "lesion": None}},
                 "gate_accuracy": {"flair": None}})
    history.add({"step": 50, "loss": 1.5, "dice": {"flair": {"grey matter": 0.5, "white matter": 0.7}}})
    history.add({"step": 100, "loss": 0.75, "phase": "after", "dice": {"flair": {"grey matter": 0.6, "white matter": 0.8}},
                 "gate_accuracy": {"flair": 1.0}})
    assert history.loss_series() == [(50.0, 1.5), (100.0, 0.75)]  # the "before" point has no loss
    dice = history.dice_series()
    assert list(dice) == ["flair"]
    assert dice["flair"] == [(0.0, pytest.approx(0.3)), (50.0, pytest.approx(0.6)), (100.0, pytest.approx(0.7))]
    rows = {(r.domain, r.name): r for r in history.comparison()}
    assert rows[("flair", "grey matter")].before == 0.2 and rows[("flair", "grey matter")].after == 0.6
    assert rows[("flair", "grey matter")].texts()[-1] == "+0.400"
    assert rows[("flair", "lesion")].after is None and rows[("flair", "lesion")].texts()[3] == "-"
    assert rows[("flair", "gate accuracy")].before is None and rows[("flair", "gate accuracy")].after == 1.0
    assert history.summary() == "Mean Dice flair: 0.300 -> 0.700"

    chart = chart_geometry(history.loss_series(), dice, 300, 150, x_max=200)
    left, top, right, bottom = chart.plot
    assert chart.loss_max == 2.0 and chart.x_range == (0.0, 200.0)
    loss_line, dice_line = chart.lines
    assert loss_line.axis == "right" and dice_line.name == "Dice flair"
    for line in chart.lines:
        for x, y in line.points:
            assert left <= x <= right and top <= y <= bottom
    # x = step / budget; Dice 0.7 at 70 % of the height; loss 0.75 of 2.0
    assert dice_line.points[-1][0] == pytest.approx(left + (right - left) / 2)
    assert dice_line.points[-1][1] == pytest.approx(bottom - 0.7 * (bottom - top))
    assert loss_line.points[-1][1] == pytest.approx(bottom - 0.375 * (bottom - top))
    assert chart_geometry([], {}, 300, 150).empty


def test_round_history_rows_progress_and_replacement():
    rounds = RoundHistory()
    assert rounds.fraction() == 0.0 and rounds.latest is None
    rounds.add({"round": 1, "total": 4, "sites": 3, "metrics": {"loss": 0.9, "dice": {"grey matter": 0.5, "white matter": 0.7},
                                                             "gate_accuracy": 0.8}})
    rounds.add({"round": 2, "total": 4, "sites": 2, "metrics": {"loss": 0.6}})
    assert rounds.add({"round": "x"}) is None
    rounds.add({"round": 2, "total": 4, "sites": 3, "metrics": {"loss": 0.5, "dice": {"grey matter": 0.7}}})
    assert [r.round for r in rounds.rows] == [1, 2]  # round 2 seen twice: the later event wins
    assert rounds.rows[0].dice == pytest.approx(0.6) and rounds.rows[0].texts() == ("1/4", "3", "0.900", "0.600", "0.800")
    assert rounds.latest.sites == 3 and rounds.fraction() == 0.5
    assert rounds.loss_series() == [(1.0, 0.9), (2.0, 0.5)]
    assert rounds.dice_series()["dice"][1] == (2.0, pytest.approx(0.7))


# -- exporting scene cases ------------------------------------------------------------------


def test_scene_cases_export_on_the_volume_grid_in_world_coordinates(scene, tmp_path):
    from uharmony.data.datalist import load_datalist

    array = phantom()
    matrix = oblique_flipped_matrix()
    volume = add_volume(scene, array, matrix, name="Patient^Jane")
    labels = np.zeros(array.shape, np.uint8)
    labels[array > 500] = 1  # the bright ball
    labels[(array > 0) & (array <= 500) & (np.indices(array.shape)[2] < 20)] = 2
    seg = add_segmentation(scene, labels, matrix, {1: "Grey Matter", 2: "Oedema"}, volume)
    # a second case under a linear transform (hardened on export, the node untouched)
    moved = add_volume(scene, array, matrix, name="moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    shift.SetElement(2, 3, -7.5)
    transform.SetMatrixTransformToParent(shift)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    seg2 = add_segmentation(scene, labels, matrix, {1: "grey matter", 2: "oedema"}, moved, name="seg2")
    seg2.SetAndObserveTransformNodeID(transform.GetID())  # drawn on the moved volume: moves with it
    before = slicer.util.arrayFromVolume(volume).copy()

    cases = [SceneCase(volume, seg), SceneCase(moved, seg2)]
    assert label_table(cases, TINY_CLASSES) == {0: "background", 2: "grey matter", 5: "Oedema"}
    out = tmp_path / "export"
    out.mkdir()
    exported = export_scene_cases(cases, str(out), "flair", TINY_CLASSES, channel_name="ch0")
    assert exported.cases == 2 and exported.datalists == [str(out / "dataset.json")]
    assert any("hardened copy" in n for n in exported.notes)

    # the library accepts the datalist as it is (all its checks: files, grids, label values)
    ds = load_datalist(out / "dataset.json")
    assert ds.domain == "flair" and ds.labels == {0: "background", 2: "grey matter", 5: "Oedema"}
    assert ds.channels == ["ch0"] and len(ds.training) == 2
    files = sorted(os.listdir(out / "imagesTr")) + sorted(os.listdir(out / "labelsTr"))
    assert not any("Jane" in f or "moved" in f for f in files)  # no node names (patient names) in file names

    shift_np = np.eye(4)
    shift_np[0, 3], shift_np[2, 3] = 25.0, -7.5
    for case, expected_matrix in zip(ds.training, (matrix, shift_np @ matrix)):
        image_matrix, image = file_ijk_to_ras(case.image[0])
        label_matrix, label = file_ijk_to_ras(case.label)
        # Slicer's writer may store a flipped frame with one axis reversed: compare in world coordinates
        np.testing.assert_allclose(world_centroid(image > 500, image_matrix), world_centroid(array > 500, expected_matrix),
                                   atol=1e-3)
        np.testing.assert_allclose(label_matrix, image_matrix, atol=1e-4)  # the label is on the image's grid
        assert set(np.unique(label)) == {0, 2, 5}
        for value, source in ((2, 1), (5, 2)):
            assert int((label == value).sum()) == int((labels == source).sum())
            np.testing.assert_allclose(world_centroid(label == value, label_matrix),
                                       world_centroid(labels == source, expected_matrix), atol=1e-3)
    # the scene is as it was
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
    np.testing.assert_allclose(ijk_to_ras(moved), matrix)
    assert moved.GetParentTransformNode() is transform
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_cases_with_different_segments_become_one_datalist_each(scene, tmp_path):
    from uharmony.data.datalist import load_datalist

    array = phantom(shape=(20, 22, 24))
    matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros(array.shape, np.uint8)
    labels[array > 500] = 1
    labels[(array > 0) & (array <= 500)] = 2
    a = add_volume(scene, array, matrix, "a")
    b = add_volume(scene, array, matrix, "b")
    cases = [SceneCase(a, add_segmentation(scene, labels, matrix, {1: "lesion", 2: "white matter"}, a, "sa")),
             SceneCase(b, add_segmentation(scene, (labels == 1).astype(np.uint8), matrix, {1: "lesion"}, b, "sb"))]
    exported = export_scene_cases(cases, str(tmp_path), "t2", TINY_CLASSES)
    assert len(exported.datalists) == 2
    tables = [load_datalist(p).labels for p in exported.datalists]
    assert tables == [{0: "background", 3: "white matter", 4: "lesion"}, {0: "background", 4: "lesion"}]
    assert any("different sets of classes" in n for n in exported.notes)


# -- refusals before anything runs ----------------------------------------------------------


def test_bad_inputs_are_refused_with_a_clear_message_before_running(scene, tmp_path, tiny_model):
    card = json.loads((tiny_model / "card.json").read_text(encoding="utf-8"))
    logic = adapt_logic(scene, tmp_path)
    array = phantom(shape=(20, 22, 24))
    matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = (array > 500).astype(np.uint8)
    volume = add_volume(scene, array, matrix, "v")
    good = add_segmentation(scene, labels, matrix, {1: "grey matter"}, volume, "good")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = (500.0, 0.0, 0.0)  # drawn on another image, 500 mm away
    elsewhere = add_segmentation(scene, labels, far, {1: "grey matter"}, None, "elsewhere")

    def refused(**fields):
        request = AdaptRequest(**{"base_model": str(tiny_model), "base_card": card, "model_name": "m", "steps": 3, **fields})
        result = logic.adapt_sync(request, timeout=60)
        assert result.status == "failed" and result.exit_code is None  # refused: no process ran
        assert logic._task.pid is None
        assert os.listdir(private_root(tmp_path)) == []
        return result.message

    assert "no labelled case" in refused(domain="dom-a")
    assert "empty: the segmentation has no segments" in refused(cases=[SceneCase(volume, empty)], domain="dom-a")
    message = refused(cases=[SceneCase(volume, elsewhere)], domain="dom-a")
    assert "lies outside the volume (mismatched geometry" in message and "v + elsewhere" in message
    assert "'Oedema' is not a class of the model" in refused(
        cases=[SceneCase(volume, add_segmentation(scene, labels, matrix, {1: "Oedema"}, volume, "o"))], domain="dom-a")
    assert "tick 'new modality'" in refused(cases=[SceneCase(volume, good)], domain="flair")
    assert "already has a domain 'dom-a'" in refused(cases=[SceneCase(volume, good)], domain="dom-a", new_modality=True)
    assert "not a valid domain name" in refused(cases=[SceneCase(volume, good)], domain="my flair", new_modality=True)
    assert "the budget must be 1 to" in refused(cases=[SceneCase(volume, good)], domain="dom-a", steps=0)
    message = refused(cases=[SceneCase(volume, good)], datalist=str(tmp_path), domain="dom-a")
    assert "either scene cases or a datalist" in message
    assert "no dataset.json" in refused(datalist=str(tmp_path), domain="dom-a")
    # a name already in the model folder
    (tmp_path / "user-models").mkdir()
    logic._model_folder = str(tmp_path / "user-models")
    (tmp_path / "user-models" / "m").mkdir()
    assert "already in your model folder" in refused(cases=[SceneCase(volume, good)], domain="dom-a")


# -- the real library, end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def synth_cases():
    """Three tiny FLAIR-like phantoms at 4 mm (uharmony.data.synth): (k,j,i) image, labels, IJK->RAS."""
    from uharmony.data import synth

    out = []
    for seed in (72011, 72012, 72013):
        case = synth.make_case(seed, "synth-flair", spacing_mm=4.0)
        out.append((np.ascontiguousarray(np.asarray(case.image, np.float32).transpose(2, 1, 0)),
                    np.ascontiguousarray(np.asarray(case.labels, np.uint8).transpose(2, 1, 0)), np.asarray(case.affine)))
    return out


def scene_cases(scene, synth_cases):
    cases = []
    for index, (image, labels, affine) in enumerate(synth_cases):
        volume = add_volume(scene, image, affine, name=f"flair {index}")
        kept = np.where(np.isin(labels, (2, 3)), labels, 0)  # grey and white matter annotated
        cases.append(SceneCase(volume, add_segmentation(scene, kept, affine, {2: "grey matter", 3: "white matter"},
                                                         volume, name=f"flair {index} segmentation")))
    return cases


def test_real_adapt_of_three_scene_cases_lands_in_the_model_folder(scene, tmp_path, tiny_model, synth_cases,
                                                                    isolated_model_folder):
    logic = adapt_logic(scene, tmp_path)
    request = AdaptRequest(base_model=str(tiny_model), cases=scene_cases(scene, synth_cases), domain="flair",
                           new_modality=True, steps=4, evaluate_every=2, device="cpu", model_name="tiny-flair")
    fractions, metrics = [], []
    result = logic.adapt_sync(request, timeout=240, on_progress=lambda s, d, t, f: fractions.append(f),
                              on_metric=lambda h: metrics.append(len(h)))
    assert result.succeeded, result.message
    assert result.model_name == "tiny-flair" and result.model_path == str(isolated_model_folder / "tiny-flair")
    # the registry lists it as trusted (its hash recorded, as `uharmony models add` does)
    listed = {m["name"]: m for m in logic.commands.list_models()}
    assert listed["tiny-flair"]["trusted"] and not listed["tiny-flair"]["problem"]
    assert listed["tiny-flair"]["sha256"] == result.sha256
    card = logic.commands.model_info("tiny-flair")
    assert [d["name"] for d in card["domains"]] == ["dom-a", "dom-b", "flair"]
    assert card["domains"][2]["annotated_classes"] == ["grey matter", "white matter"]
    # before/after from the metric events with phase before/after; a live point in between
    assert metrics == [1, 2, 3]
    history = result.history
    assert history.before["step"] == 0 and history.after["step"] == 4
    assert [p[0] for p in history.loss_series()] == [2.0, 4.0]
    rows = {(r.domain, r.name): r for r in history.comparison()}
    assert {("flair", "grey matter"), ("flair", "white matter"), ("flair", "gate accuracy")} <= set(rows)
    assert rows[("flair", "grey matter")].after == card["evaluation"]["after"]["dice"]["flair"]["grey matter"]
    assert "Mean Dice flair:" in result.message
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert os.listdir(private_root(tmp_path)) == []  # exported cases, model and checkpoints: all deleted


def test_real_adapt_cancel_after_first_progress_event(scene, tmp_path, tiny_model, synth_cases, isolated_model_folder):
    logic = adapt_logic(scene, tmp_path)
    request = AdaptRequest(base_model=str(tiny_model), cases=scene_cases(scene, synth_cases), domain="flair",
                           new_modality=True, steps=200, device="cpu", model_name="never")
    seen = {}

    def on_progress(stage, done, total, fraction):
        if not seen:
            seen["temp"] = task.temp_dir
            seen["files"] = sorted(os.listdir(os.path.join(task.temp_dir, "data", "imagesTr")))
            task.cancel()

    task = logic.adapt(request, on_progress=on_progress)
    result = task.wait(120)
    assert result is not None and result.cancelled, result and result.message
    assert seen["files"] == ["case_000.nrrd", "case_001.nrrd", "case_002.nrrd"]  # the data was there
    deadline = time.monotonic() + 10
    while pid_alive(task.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(task.pid)
    assert not os.path.exists(seen["temp"]) and os.listdir(private_root(tmp_path)) == []
    assert not (isolated_model_folder / "never").exists()
    assert "never" not in {m["name"] for m in logic.commands.list_models()}


# -- federated site logic -------------------------------------------------------------------

# A stand-in for `uharmony fed`: the real one (issue 5) starts a Flower SuperNode that needs a
# SuperLink, certificates and registered keys; what this module's logic needs from it is its command
# line and its protocol lines, which this script speaks exactly (round events, SIGTERM = exit 8).
FAKE_FED = textwrap.dedent('''
    import argparse, json, os, signal, sys, time
    p = argparse.ArgumentParser(prog="fakefed")
    sub = p.add_subparsers(dest="cmd", required=True)
    fed = sub.add_parser("fed").add_subparsers(dest="fedcmd", required=True)
    j = fed.add_parser("join")
    for o in ("--server", "--data", "--ca", "--key", "--progress"):
        j.add_argument(o, required=True)
    k = fed.add_parser("keys").add_subparsers(dest="what", required=True).add_parser("site")
    k.add_argument("--name", required=True)
    k.add_argument("--out", required=True)
    a = p.parse_args()
    if a.fedcmd == "keys":
        open(os.path.join(a.out, a.name), "w").write("-----BEGIN OPENSSH PRIVATE KEY-----\\nsecret\\n")
        open(os.path.join(a.out, a.name + ".pub"), "w").write("ecdsa-sha2-nistp384 AAAAE2Vj site\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: (print(json.dumps({"v": 1, "event": "error", "code": 8,
                  "message": "left"}), flush=True), sys.exit(8)))
    record = dict(vars(a), data_exists=os.path.isfile(a.data), data_text=open(a.data).read())
    open(os.environ["FAKE_FED_RECORD"], "w").write(json.dumps(record))
    total = int(os.environ.get("FAKE_FED_ROUNDS", "3"))
    for r in range(1, total + 1):
        print(json.dumps({"v": 1, "event": "round", "round": r, "total": total, "sites": 3,
                          "metrics": {"loss": 1.0 / r, "dice": {"grey matter": 0.2 * r}, "gate_accuracy": 0.9}}), flush=True)
        time.sleep(float(os.environ.get("FAKE_FED_PAUSE", "0")))
    if os.environ.get("FAKE_FED_FAIL"):
        print(json.dumps({"v": 1, "event": "error", "code": 9, "message": "the server refused this site's key"}), flush=True)
        sys.exit(9)
''')


@pytest.fixture
def fake_fed(tmp_path):
    package = tmp_path / "fakefed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_FED)
    ca, key = tmp_path / "ca.crt", tmp_path / "site_key"
    ca.write_text("cert")
    key.write_text("key")
    record = tmp_path / "record.json"
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "FAKE_FED_RECORD": str(record)}
    return {"env": env, "ca": str(ca), "key": str(key), "record": record}


def fed_logic(scene, tmp_path, fake_fed, **env):
    return FederatedLogic(scene, SubprocessRunner(grace_period_s=3.0), require_flower=False,
                          temp_root=str(private_root(tmp_path)), environment={**fake_fed["env"], **env},
                          library_module="fakefed")


def test_federated_tab_says_whether_the_library_can_join(scene, tmp_path, fake_fed):
    real = FederatedLogic(scene, SubprocessRunner(), environment=ENV)
    availability = real.availability()
    if importlib.util.find_spec("uharmony.fed.cli") is None:  # issue 5 has not landed in this tree
        assert not availability.available and "issue 5" in availability.reason
    assert fed_logic(scene, tmp_path, fake_fed).availability().available
    # the decision itself
    from UHarmonySegmentLib.Library import CommandError

    assert "issue 5" in interpret_availability(CommandError(2, "argument COMMAND: invalid choice: 'fed'"), "", True).reason
    assert "--ca" in interpret_availability(None, "--server --data --key --progress", True).reason
    assert "flwr" in interpret_availability(None, "--server --data --ca --key --progress", False).reason


def test_join_runs_the_command_and_collects_rounds(scene, tmp_path, fake_fed):
    datalist = tmp_path / "site" / "dataset.json"
    datalist.parent.mkdir()
    datalist.write_text("{}")
    logic = fed_logic(scene, tmp_path, fake_fed)
    request = JoinRequest(server="fl.example.org:9092", ca=fake_fed["ca"], key=fake_fed["key"], datalist=str(datalist.parent))
    assert logic.command(request, str(datalist))[1:] == [
        "-m", "fakefed", "fed", "join", "--server", "fl.example.org:9092", "--data", str(datalist), "--ca", fake_fed["ca"],
        "--key", fake_fed["key"], "--progress", "jsonl"]
    rounds, progress = [], []
    task = logic.join(request, on_round=lambda row, history: rounds.append(row.texts()),
                      on_progress=lambda *a: progress.append(a[3]))
    result = task.wait(60)
    assert result.succeeded, result.message
    record = json.loads(fake_fed["record"].read_text())
    assert (record["server"], record["data"], record["ca"], record["key"], record["progress"]) == (
        "fl.example.org:9092", str(datalist), fake_fed["ca"], fake_fed["key"], "jsonl")
    assert rounds == [("1/3", "3", "1.000", "0.200", "0.900"), ("2/3", "3", "0.500", "0.400", "0.900"),
                      ("3/3", "3", "0.333", "0.600", "0.900")]
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert result.message == "The federated run ended after round 3 of 3."

    # the coordinator refuses: the error event's message and the federation exit code
    result = fed_logic(scene, tmp_path, fake_fed, FAKE_FED_FAIL="1").join(request).wait(60)
    assert result.status == "failed" and result.exit_code == 9
    assert "refused this site's key" in result.message and "federation error" in result.message


def test_leave_with_scene_cases_ends_the_process_and_deletes_the_export(scene, tmp_path, fake_fed):
    array = phantom(shape=(20, 22, 24))
    matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    volume = add_volume(scene, array, matrix, "v")
    seg = add_segmentation(scene, (array > 500).astype(np.uint8), matrix, {1: "grey matter"}, volume)
    logic = fed_logic(scene, tmp_path, fake_fed, FAKE_FED_ROUNDS="50", FAKE_FED_PAUSE="0.2")
    request = JoinRequest(server="127.0.0.1:9092", ca=fake_fed["ca"], key=fake_fed["key"], cases=[SceneCase(volume, seg)],
                          domain="mri-t1", base_classes=TINY_CLASSES)
    seen = {}

    def on_round(row, history):
        if row.round == 2:
            seen["temp"] = task.temp_dir
            logic.leave()

    task = logic.join(request, on_round=on_round)
    result = task.wait(60)
    assert result.cancelled and result.message == "Left the federation."
    assert [r.round for r in result.rounds.rows][:2] == [1, 2] and len(result.rounds.rows) < 50
    record = json.loads(fake_fed["record"].read_text())
    assert record["data_exists"] and json.loads(record["data_text"])["domain"] == "mri-t1"
    assert record["data"].startswith(seen["temp"])
    assert not os.path.exists(seen["temp"]) and os.listdir(private_root(tmp_path)) == []
    assert not pid_alive(task.pid)

    # refused before starting: a bad address, missing files, no domain
    bad = JoinRequest(server="no-port", ca=str(tmp_path / "nope.crt"), key=fake_fed["key"] + ".pub",
                      cases=[SceneCase(volume, seg)])
    message = logic.join(bad).wait(10).message
    assert "not a server address" in message and "nope.crt: the CA certificate file does not exist" in message
    assert "give the domain" in message


def test_site_key_create_and_show_public_key_only(scene, tmp_path, fake_fed):
    logic = fed_logic(scene, tmp_path, fake_fed)
    keys = tmp_path / "keys"
    keys.mkdir()
    got = []
    logic.create_site_key("hospital-a", str(keys), lambda path, error: got.append((path, error)))
    for r in list(logic.commands._runners):
        r.wait(30)
    assert got == [(str(keys / "hospital-a"), None)]
    assert read_public_key(got[0][0]).startswith("ecdsa-sha2-nistp384 ")
    (keys / "leaky.pub").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="PRIVATE"):
        read_public_key(str(keys / "leaky"))
    logic.create_site_key("bad name", str(keys), lambda path, error: got.append((path, error)))
    assert got[-1][0] is None and "name" in got[-1][1]


def test_real_fed_keys_and_availability_when_the_library_has_fed(scene, tmp_path):
    """With issue 5's `uharmony fed` in the library: Join is offered, and Create key makes a real key pair
    whose public half is shown (a real federated run needs a Flower server: issue 5's tests do that)."""
    if importlib.util.find_spec("uharmony.fed.cli") is None:
        pytest.skip("this tree has no `uharmony fed` yet")
    logic = FederatedLogic(scene, SubprocessRunner(), environment=ENV)
    availability = logic.availability()
    assert availability.available == (importlib.util.find_spec("flwr") is not None), availability.reason
    got = []
    logic.create_site_key("hospital-a", str(tmp_path), lambda path, error: got.append((path, error)))
    for runner in list(logic.commands._runners):
        runner.wait(60)
    assert got == [(str(tmp_path / "hospital-a"), None)]
    assert read_public_key(got[0][0]).startswith("ecdsa-sha2-nistp384 ")
    assert "PRIVATE KEY" in (tmp_path / "hospital-a").read_text()  # the private half stays in its file
