"""The UHarmonyTrain *widget* code, run outside Slicer: PySide6 behind the PythonQt-like shim
(pythonqt_shim.py: stands in for the Slicer application and PythonQt, which cannot exist here), the
.ui with stand-ins, slicer-core's real scene, QProcess for the real `python -m uharmony` processes.

A user's path through the Adapt tab: the base model list filled by the library, scene cases found,
"new modality" with a name, a small budget, Adapt, the live plot and the before/after table, the
model saved where UHarmony Segment finds it; and the Federated tab's state without `uharmony fed`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6.QtWidgets")
slicer = pytest.importorskip("slicer")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULE_DIR = os.path.join(REPO, "UHarmonyTrain")
for path in (HERE, REPO, os.path.join(REPO, "UHarmonySegment"), MODULE_DIR, os.path.join(REPO, "Testing", "slicer_mrml")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pythonqt_shim  # noqa: E402
from placeholders import application  # noqa: E402
from test_widget_pythonqt_shim import pump  # noqa: E402  (the Segment widget test's event pump)


@pytest.fixture
def env(monkeypatch, tmp_path, tiny_model):
    application()
    models = tmp_path / "user-models"
    monkeypatch.setenv("UHARMONY_MODELS", str(models))  # never the developer's own folder
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the tiny test model, added to the (isolated) model folder as a user would
    done = subprocess.run([sys.executable, "-m", "uharmony", "models", "add", str(tiny_model), "--name", "tiny"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    records = pythonqt_shim.install(monkeypatch, MODULE_DIR, str(tmp_path))
    monkeypatch.delitem(sys.modules, "UHarmonyTrain", raising=False)
    module = importlib.import_module("UHarmonyTrain")
    private = tmp_path / "private"
    private.mkdir()
    yield {"scene": scene, "module": module, "records": records, "private": private, "models": models}
    scene.Clear(True)


def add_cases(scene):
    from mrml_testing import add_volume
    from test_train_logic import (
        add_segmentation,  # Testing/slicer_mrml/test_train_logic.py
    )

    from uharmony.data import synth

    for index, seed in enumerate((72011, 72012, 72013)):
        case = synth.make_case(seed, "synth-flair", spacing_mm=4.0)
        image = np.ascontiguousarray(np.asarray(case.image, np.float32).transpose(2, 1, 0))
        labels = np.asarray(case.labels, np.uint8).transpose(2, 1, 0)
        volume = add_volume(scene, image, np.asarray(case.affine), name=f"flair {index}")
        add_segmentation(scene, np.where(np.isin(labels, (2, 3)), labels, 0), np.asarray(case.affine),
                         {2: "grey matter", 3: "white matter"}, volume, name=f"flair {index} labels")


def test_train_widget_adapts_scene_cases_and_saves_the_model(env):
    scene, records = env["scene"], env["records"]
    widget = env["module"].UHarmonyTrainWidget()
    widget.setup()
    ui = widget.ui
    widget.logic.adapt.temp_root = str(env["private"])
    pump(lambda: widget._models is not None and widget._availability is not None)
    # the Federated tab: Join only when the library can join (issue 5's `uharmony fed`)
    if importlib.util.find_spec("uharmony.fed.cli") is None:
        assert not ui.joinButton.enabled and not ui.createKeyButton.enabled
        assert "issue 5" in ui.federatedNoticeLabel.text and "issue 5" in ui.joinButton.toolTip
    else:
        assert ui.joinButton.enabled == widget._availability.available, widget._availability.reason
    pump(lambda: ui.modelFolderLabel.text != "looking...")  # its own library call: answered separately
    assert ui.modelFolderLabel.text == str(env["models"])

    ui.baseModelSelector.setCurrentIndex(ui.baseModelSelector.findData("tiny"))
    pump(lambda: widget._card is not None and widget._card["name"] == "tiny-test")
    assert ui.existingDomainSelector.count == 2  # dom-a, dom-b

    add_cases(scene)
    ui.findCasesButton._obj.click()
    assert ui.casesTable.rowCount == 3 and "Found 3 new case(s)" in ui.adaptStatusLabel.text
    assert "grey matter" in ui.classesLabel.text and "(new)" not in ui.classesLabel.text

    # a refusal first: a new modality without a name; the message box says why, nothing ran
    ui.newModalityCheckBox.checked = True
    ui.adaptButton._obj.click()
    pump(lambda: not widget.logic.adapt.is_running)
    (message,), _ = records["errorDisplay"].calls[-1]
    assert "give the name of the new modality" in message
    assert ui.adaptButton.text == "Adapt" and os.listdir(env["private"]) == []

    ui.domainNameLineEdit.text = "flair"
    widget.suggestModelName()
    assert ui.modelNameLineEdit.text == "tiny-flair"
    ui.stepsSpinBox.value = 4
    ui.evaluateEverySpinBox.value = 2
    ui.adaptButton._obj.click()
    assert ui.adaptButton.text == "Cancel" and not ui.findCasesButton.enabled
    pump(lambda: not widget.logic.adapt.is_running)
    assert ui.adaptButton.text == "Adapt" and ui.findCasesButton.enabled
    assert ui.adaptStatusLabel.text.startswith("Saved as 'tiny-flair' in your model folder."), ui.adaptStatusLabel.text
    assert ui.adaptProgressBar.value == ui.adaptProgressBar.maximum
    rows = {(ui.comparisonTable.item(r, 0).text(), ui.comparisonTable.item(r, 1).text())
            for r in range(ui.comparisonTable.rowCount)}
    assert rows == {("flair", "grey matter"), ("flair", "white matter"), ("flair", "gate accuracy")}
    assert not ui.chartLabel._obj.pixmap().isNull()
    assert (env["models"] / "tiny-flair" / "card.json").is_file()
    pump(lambda: any(m["name"] == "tiny-flair" for m in widget._models or []))  # listed again after the run
    assert "adapt" in ui.adaptLogText.plainText
    assert os.listdir(env["private"]) == []
    assert len(records["errorDisplay"].calls) == 1
    widget.cleanup()
