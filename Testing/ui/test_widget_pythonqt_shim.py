"""The UHarmonySegment *widget* code, run outside Slicer: PySide6 behind a PythonQt-like shim, the
.ui with stand-ins, slicer-core's real scene, QProcess for the real `python -m uharmony` process.

It drives the widget the way a user does (select a volume, click Segment, click Cancel) and checks
what the panel shows. It cannot cover the real Slicer widgets, PythonQt or parameterNodeWrapper:
the self-tests inside Slicer do (Testing/SlicerSelfTests/run_selftests.py).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6.QtWidgets")
slicer = pytest.importorskip("slicer")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULE_DIR = os.path.join(REPO, "UHarmonySegment")
for path in (HERE, REPO, MODULE_DIR, os.path.join(REPO, "Testing", "slicer_mrml")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pythonqt_shim  # noqa: E402
from placeholders import application  # noqa: E402


def _library_ready():
    from mrml_testing import library_ready  # Testing/slicer_mrml/mrml_testing.py

    return library_ready()


@pytest.fixture(scope="module")
def ready():
    ok, reason = _library_ready()
    if not ok:
        pytest.skip(f"the real library cannot segment yet: {reason}")


@pytest.fixture
def env(monkeypatch, tmp_path, ready):
    application()
    monkeypatch.setenv("UHARMONY_MODELS", str(tmp_path / "user-models"))  # never the developer's own folder
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    records = pythonqt_shim.install(monkeypatch, MODULE_DIR, str(tmp_path))
    monkeypatch.delitem(sys.modules, "UHarmonySegment", raising=False)
    module = importlib.import_module("UHarmonySegment")
    private = tmp_path / "private"
    private.mkdir()
    yield {"scene": scene, "module": module, "records": records, "private": private}
    scene.Clear(True)


def pump(condition, timeout=120.0):
    app = application()
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the widget")
        app.processEvents()
        time.sleep(0.01)


def head_volume(scene, name="head", value=None):
    shape = (36, 40, 44)
    k, j, i = np.indices(shape)
    inside = ((k - 18) / 15.0) ** 2 + ((j - 20) / 17.0) ** 2 + ((i - 22) / 19.0) ** 2 < 1
    if value is None:
        rng = np.random.default_rng(7)
        data = np.where(inside, 400.0 + 150 * np.sin(i / 3.0) + rng.normal(0, 20, shape), 0.0).astype(np.int16)
    else:
        data = np.full(shape, value, np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, data)
    node.SetSpacing(2.0, 2.0, 2.0)
    return node


def make_widget(env):
    widget = env["module"].UHarmonySegmentWidget()
    widget.setup()
    widget.logic.temp_root = str(env["private"])
    ui = widget.ui
    # the three library calls (models list, info, devices) answer through the Qt event loop
    pump(lambda: widget._models is not None and widget._card is not None and widget._devices is not None)
    return widget, ui


def test_widget_setup_fills_controls_from_the_library(env):
    widget, ui = make_widget(env)
    assert ui.modelSelector.currentText == "brain (bundled)"  # the default model comes first
    assert ui.deviceSelector.itemText(0).startswith("Auto (")
    assert ui.domainSelector.count == 1 + len(widget._card["domains"])
    assert widget._card["intended_use"][:20] in ui.intendedUseLabel.text
    assert not ui.inputSelector1.visible and not ui.inputLabel1.visible  # a one-channel model
    assert ui.dependencyFrame._obj.isHidden()  # everything is installed in this environment
    assert not ui.segmentButton.enabled and "Select the input volume" in ui.segmentButton.toolTip
    widget.cleanup()


def test_widget_segment_click_shows_the_result_and_adds_or_replaces(env):
    scene, records = env["scene"], env["records"]
    widget, ui = make_widget(env)
    volume = head_volume(scene)
    ui.inputSelector.setCurrentNode(volume)
    assert ui.segmentButton.enabled
    ui.segmentButton._obj.click()
    assert ui.segmentButton.text == "Cancel" and not ui.inputSelector.enabled
    pump(lambda: not widget.logic.is_running)
    assert ui.segmentButton.text == "Segment" and ui.inputSelector.enabled
    assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
    assert ui.progressBar.value == ui.progressBar.maximum
    assert ui.segmentsTable.rowCount == 4
    names = {ui.segmentsTable.item(r, 0).text() for r in range(4)}
    assert names == {c["name"] for c in widget._card["classes"] if c["value"]}
    assert ui.domainLabel.text != "-" and "%" in ui.probabilitiesLabel.text
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    node = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert ui.show3DButton._obj.segmentationNode() is node and ui.show3DButton.enabled
    unfamiliar = node.GetAttribute("UHarmony.Unfamiliar") == "true"
    assert ui.unfamiliarWarningLabel._obj.isHidden() == (not unfamiliar)
    assert records["setSliceViewerLayers"].calls[-1][1]["background"] is volume
    assert "segment" in ui.logText.plainText  # the process's log reached the Log section
    assert os.listdir(env["private"]) == []

    # unchecking "Replace previous result" makes the next run add a node (replacing itself is
    # covered by the logic tests)
    ui.replaceCheckBox.checked = False
    ui.segmentButton._obj.click()
    pump(lambda: not widget.logic.is_running)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2

    # choosing another volume clears the panel; coming back shows the stored result
    other = head_volume(scene, "other")
    ui.inputSelector.setCurrentNode(other)
    assert ui.segmentsTable.rowCount == 0 and ui.domainLabel.text == "-"
    ui.inputSelector.setCurrentNode(volume)
    assert ui.segmentsTable.rowCount == 4 and ui.domainLabel.text != "-"
    assert not records["errorDisplay"].calls
    widget.cleanup()


def test_widget_cancel_button_stops_the_run(env):
    scene = env["scene"]
    widget, ui = make_widget(env)
    ui.inputSelector.setCurrentNode(head_volume(scene))
    ui.segmentButton._obj.click()
    pump(lambda: widget.logic._task is not None and widget.logic._task.pid is not None
         and ui.progressBar.format != "starting %p%")
    ui.segmentButton._obj.click()  # the button now says Cancel
    pump(lambda: not widget.logic.is_running)
    assert ui.statusLabel.text.startswith("Cancelled"), ui.statusLabel.text
    assert ui.segmentButton.text == "Segment"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert os.listdir(env["private"]) == []
    assert not env["records"]["errorDisplay"].calls
    widget.cleanup()


def test_widget_reports_a_bad_input_with_its_exit_code(env):
    scene, records = env["scene"], env["records"]
    widget, ui = make_widget(env)
    ui.inputSelector.setCurrentNode(head_volume(scene, "flat", value=5))
    ui.segmentButton._obj.click()
    pump(lambda: not widget.logic.is_running)
    assert ui.statusLabel.text.startswith("Failed: 'flat'"), ui.statusLabel.text
    (message,), _ = records["errorDisplay"].calls[-1]
    assert "bad input image" in message and "exit code 3" in message
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    widget.cleanup()


def test_widget_add_model_validates_and_lists_it(env, monkeypatch, tmp_path):
    import shutil

    widget, ui = make_widget(env)
    qt = sys.modules["qt"]
    assert ui.modelSelector.count == 2  # the two bundled models
    # a folder that is not a model package: refused, with the library's message
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: str(empty)))
    ui.addModelButton._obj.click()
    pump(lambda: env["records"]["errorDisplay"].calls)
    (message,), kwargs = env["records"]["errorDisplay"].calls[-1]
    assert message.startswith("The model was not added:") and "card.json" in message
    assert ui.statusLabel.text == "The model was not added."
    # a copy of the bundled model: validated, recorded, listed
    copy = tmp_path / "my-model"
    shutil.copytree(widget._models[0]["path"], copy)
    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: str(copy)))
    widget._models = None
    ui.addModelButton._obj.click()
    pump(lambda: widget._models is not None and len(widget._models) == 3)
    assert ui.modelSelector.count == 3
    assert ui.statusLabel.text == "Model added to your model folder."
    assert os.listdir(tmp_path / "user-models")  # it went into the (isolated) user model folder
    widget.cleanup()
