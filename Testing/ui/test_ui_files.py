"""The modules' .ui files: names the code uses exist, custom widgets are declared, the files load
with PySide6 (offscreen, stand-ins for Slicer's widgets), the widget helpers fill them, and plain-Qt
screenshots go to Resources/Screenshots/."""

from __future__ import annotations

import ast
import os
import re
import sys
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6 import QtCore, QtGui  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [p for p in (HERE, REPO, os.path.join(REPO, "UHarmonySegment"), os.path.join(REPO, "UHarmonyTrain"))
                if p not in sys.path]

from placeholders import PLACEHOLDER_NAMES, PLACEHOLDER_NOTE, application, load_ui  # noqa: E402
from UHarmonySegmentLib import WidgetHelpers  # noqa: E402
from UHarmonySegmentLib.Presentation import (  # noqa: E402
    channel_names,
    device_choices,
    domain_choices,
    model_choices,
    summarize_report,
)
from UHarmonyTrainLib import MetricHistory, RoundHistory, TrainWidgetHelpers, chart_geometry  # noqa: E402

MODULES = {
    "UHarmonySegment": os.path.join(REPO, "UHarmonySegment"),
    "UHarmonyTrain": os.path.join(REPO, "UHarmonyTrain"),
}
SCREENSHOTS = os.path.join(REPO, "Resources", "Screenshots")

# what the screenshot shows: a representative finished run (made-up numbers)
DEMO_REPORT = {
    "model": {"name": "starter", "version": "1.0", "sha256": "3f9a1c0e5b7d2a4c" * 4, "path": "/models/starter"},
    "device": "cuda",
    "domain": {"mode": "auto", "chosen": "synth-t1", "probabilities": {"synth-t1": 0.97, "synth-t2": 0.03},
               "unfamiliar": False, "unfamiliar_score": 2.1, "unfamiliar_threshold": 6.0},
    "classes": [
        {"value": 1, "name": "cerebrospinal fluid", "voxels": 26210, "volume_ml": 209.7, "color": [0.333333, 0.737255, 1.0]},
        {"value": 2, "name": "grey matter", "voxels": 83950, "volume_ml": 671.6, "color": [0.784314, 0.784314, 0.921569]},
        {"value": 3, "name": "white matter", "voxels": 61230, "volume_ml": 489.8, "color": [0.980392, 0.980392, 0.823529]},
        {"value": 4, "name": "lesion", "voxels": 310, "volume_ml": 2.5, "color": [0.564706, 0.933333, 0.564706]},
    ],
    "intended_use": "Research: brain tissue segmentation of adult T1- or T2-weighted MRI.",
    "limitations": ["Trained on synthetic data only.", "Not validated for clinical use."],
}


def qt_namespace():
    """PySide6's classes under the names the helpers use from PythonQt's flat `qt` module."""
    return SimpleNamespace(Qt=QtCore.Qt, QTableWidgetItem=QtWidgets.QTableWidgetItem, QPixmap=QtGui.QPixmap,
                           QColor=QtGui.QColor, QIcon=QtGui.QIcon, QHeaderView=QtWidgets.QHeaderView,
                           QPainter=QtGui.QPainter, QPen=QtGui.QPen)


def ui_path(module):
    return os.path.join(MODULES[module], "Resources", "UI", f"{module}.ui")


def ui_tree(module):
    return ET.parse(ui_path(module)).getroot()


def ui_widget_names(module) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui_tree(module).iter("widget")}


def child_variables(root) -> SimpleNamespace:
    """What slicer.util.childWidgetVariables gives: every named child as an attribute."""
    found = {w.objectName(): w for w in root.findChildren(QtCore.QObject) if w.objectName()}
    found[root.objectName()] = root
    return SimpleNamespace(**found)


def used_ui_names(path) -> set[str]:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    return set(re.findall(r"\b(?:self|widget)\.ui\.(\w+)", source))


@pytest.fixture(scope="module")
def app():
    return application()


# -- static checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_ui_name_used_by_the_code_exists(module):
    names = ui_widget_names(module)
    used = used_ui_names(os.path.join(MODULES[module], f"{module}.py"))
    assert used, "the module uses no self.ui.X at all?"
    assert sorted(used - set(names)) == []


def test_train_widget_helpers_only_use_names_of_the_train_ui():
    names = set(ui_widget_names("UHarmonyTrain"))
    with open(TrainWidgetHelpers.__file__, encoding="utf-8") as f:
        source = f.read()
    used = set(re.findall(r"\bui\.(\w+)", source)) | set(TrainWidgetHelpers.ADAPT_CONTROLS) | set(TrainWidgetHelpers.JOIN_CONTROLS)
    with open(os.path.join(MODULES["UHarmonyTrain"], "UHarmonyTrain.py"), encoding="utf-8") as f:
        used |= set(re.findall(r'"(\w+ProgressBar)"', f.read()))
    assert "adaptProgressBar" in used and sorted(used - names) == []


def test_widget_helpers_only_use_names_of_the_segment_ui():
    names = set(ui_widget_names("UHarmonySegment"))
    with open(WidgetHelpers.__file__, encoding="utf-8") as f:
        source = f.read()
    used = set(re.findall(r"\bui\.(\w+)", source))
    used |= set(re.findall(r'"((?:input|)[A-Za-z]+(?:Selector|Button|CheckBox|Label)\d?)"', source))
    for i in range(1, WidgetHelpers.EXTRA_INPUTS + 1):
        used |= {f"inputSelector{i}", f"inputLabel{i}"}
    assert used and sorted(used - names) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_custom_widget_is_declared_and_has_a_stand_in(module):
    root = ui_tree(module)
    declared = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    for cls in {w.get("class") for w in root.iter("widget")}:
        assert cls in declared or hasattr(QtWidgets, cls), f"{cls} is neither a Qt class nor declared"
    for cls, extends in declared.items():
        assert cls in PLACEHOLDER_NAMES, f"no stand-in for {cls}: the load test would not be meaningful"
        # the chain of 'extends' ends in a real Qt class
        seen = set()
        while extends in declared and extends not in seen:
            seen.add(extends)
            extends = declared[extends]
        assert hasattr(QtWidgets, extends), f"{cls} extends unknown {extends}"
    assert {c.findtext("class") for c in root.iter("customwidget")} >= {
        w.get("class") for w in root.iter("widget") if not hasattr(QtWidgets, w.get("class"))}


def test_parameter_names_in_the_ui_are_fields_of_the_parameter_node():
    tree = ast.parse(open(os.path.join(MODULES["UHarmonySegment"], "UHarmonySegment.py"), encoding="utf-8").read())
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "UHarmonySegmentParameterNode":
            fields = {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    assert fields
    used = set()
    for prop in ui_tree("UHarmonySegment").iter("property"):
        if prop.get("name") == "SlicerParameterName":
            used.add(prop.findtext("string"))
    assert used and used <= fields


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(MODULES))
def test_ui_loads_with_stand_ins_and_keeps_classes_and_properties(app, module):
    widget = load_ui(ui_path(module))
    names = ui_widget_names(module)
    ui = child_variables(widget)
    for name, cls in names.items():
        child = getattr(ui, name, None)
        assert child is not None, f"{name} was not created"
        if cls in PLACEHOLDER_NAMES:
            assert type(child).__name__ == cls, f"{name} became {type(child).__name__}, not the {cls} stand-in"
    if module == "UHarmonySegment":
        assert ui.inputSelector.nodeTypes == ["vtkMRMLScalarVolumeNode"]
        assert not ui.inputSelector.addEnabled and not ui.inputSelector.showChildNodeTypes
        assert ui.inputSelector.property("SlicerParameterName") == "inputVolume"
        assert ui.logCollapsibleButton.collapsed and ui.inputsCollapsibleButton.text == "Inputs"
        assert ui.segmentsTable.columnCount() == 2
    widget.deleteLater()


def test_helpers_fill_the_segment_ui(app):
    qt = qt_namespace()
    widget = load_ui(ui_path("UHarmonySegment"))
    ui = child_variables(widget)
    WidgetHelpers.fill_choices(qt, ui.modelSelector, model_choices([
        {"name": "broken", "bundled": False, "trusted": True, "problem": "hash changed"},
        {"name": "starter", "bundled": True, "trusted": True}]), current_value="broken")
    assert WidgetHelpers.combo_value(ui.modelSelector) == "starter"  # the unusable one cannot be selected
    assert not ui.modelSelector.model().item(1).isEnabled()
    WidgetHelpers.fill_choices(qt, ui.deviceSelector, device_choices(
        {"cuda": True, "cuda_name": "NVIDIA H100", "mps": False, "auto": "cuda"}), current_value="cpu")
    assert WidgetHelpers.combo_value(ui.deviceSelector) == "cpu"
    assert ui.deviceSelector.itemText(0) == "Auto (GPU: NVIDIA H100)"
    WidgetHelpers.fill_choices(qt, ui.modelSelector, [], None)
    assert WidgetHelpers.combo_value(ui.modelSelector) is None

    card = {"input": {"channels": [{"name": "T1"}, {"name": "FLAIR"}]}, "domains": [{"name": "mri-t1", "modality": "MR"}]}
    widget.show()
    WidgetHelpers.show_channel_inputs(ui, channel_names(card))
    assert ui.inputSelector1.isVisible() and not ui.inputSelector2.isVisible()
    assert ui.inputLabel0.text() == "T1:" and ui.inputLabel1.text() == "FLAIR:"
    WidgetHelpers.show_channel_inputs(ui, channel_names(None))
    assert not ui.inputSelector1.isVisible() and ui.inputLabel0.text() == "Input volume:"
    WidgetHelpers.fill_choices(qt, ui.domainSelector, domain_choices(card), "mri-t1")
    assert WidgetHelpers.combo_value(ui.domainSelector) == "mri-t1" and ui.domainSelector.count() == 2

    WidgetHelpers.set_running(ui, True)
    assert ui.segmentButton.text() == "Cancel" and not ui.inputSelector.isEnabled()
    WidgetHelpers.show_progress(ui, "infer", 0.5)
    assert ui.progressBar.value() == ui.progressBar.maximum() // 2 and ui.progressBar.format().startswith("infer")
    WidgetHelpers.set_running(ui, False)
    assert ui.segmentButton.text() == "Segment" and ui.inputSelector.isEnabled()

    unfamiliar = dict(DEMO_REPORT, domain=dict(DEMO_REPORT["domain"], unfamiliar=True, unfamiliar_score=8.0))
    WidgetHelpers.show_result(qt, ui, summarize_report(unfamiliar))
    assert ui.unfamiliarWarningLabel.isVisible() and "Unfamiliar input" in ui.unfamiliarWarningLabel.text()
    assert ui.segmentsTable.rowCount() == 4
    assert ui.segmentsTable.item(1, 0).text() == "grey matter" and ui.segmentsTable.item(1, 1).text() == "671.6"
    assert not ui.segmentsTable.item(0, 0).icon().isNull()
    assert "Not validated for clinical use." in ui.limitationsLabel.text()
    assert ui.domainLabel.text() == "synth-t1 (97%)"
    WidgetHelpers.clear_result(ui)
    assert ui.segmentsTable.rowCount() == 0 and not ui.unfamiliarWarningLabel.isVisible()
    unsure = dict(DEMO_REPORT, domain=dict(DEMO_REPORT["domain"], unsure=True, probabilities={"synth-t1": 0.55,
                                                                                              "synth-t2": 0.45}))
    WidgetHelpers.show_result(qt, ui, summarize_report(unsure))
    assert ui.unfamiliarWarningLabel.isVisible() and "gate is unsure (synth-t1 55%, synth-t2 45%)" in ui.unfamiliarWarningLabel.text()
    WidgetHelpers.show_result(qt, ui, summarize_report(DEMO_REPORT))
    assert not ui.unfamiliarWarningLabel.isVisible() and ui.cleanupLabel.text() == "none"
    cleaned = dict(DEMO_REPORT, postprocess={"min_component_ml": {"lesion": 0.5}, "removed_ml": {"lesion": 0.0}})
    WidgetHelpers.show_result(qt, ui, summarize_report(cleaned))
    assert ui.cleanupLabel.text() == "lesion pieces under 0.5 mL relabelled (0.0 mL)"
    WidgetHelpers.clear_result(ui)
    assert ui.cleanupLabel.text() == "-"
    widget.deleteLater()


# -- screenshots --------------------------------------------------------------------------------


def _save_if_changed(image: QtGui.QImage, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and QtGui.QImage(path).convertToFormat(image.format()) == image:
        return  # identical rendering: leave the file (and git) alone
    assert image.save(path)


def _framed(widget, width, note=PLACEHOLDER_NOTE):
    frame = QtWidgets.QWidget()
    frame.setObjectName("screenshotFrame")
    layout = QtWidgets.QVBoxLayout(frame)
    layout.setContentsMargins(6, 6, 6, 4)
    layout.addWidget(widget)
    caption = QtWidgets.QLabel(note)
    caption.setStyleSheet("color: #777; font-size: 9px;")
    layout.addWidget(caption)
    frame.resize(width, frame.sizeHint().height())
    frame.show()
    application().processEvents()
    frame.resize(width, max(frame.sizeHint().height(), frame.minimumSizeHint().height()))
    application().processEvents()
    return frame


def _not_blank(image: QtGui.QImage) -> bool:
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    return len(colours) > 20


def test_screenshot_segment(app):
    qt = qt_namespace()
    widget = load_ui(ui_path("UHarmonySegment"))
    ui = child_variables(widget)
    ui.dependencyFrame.setVisible(False)
    ui.inputSelector.addItem("MRHead")
    WidgetHelpers.show_channel_inputs(ui, ["image"])
    WidgetHelpers.fill_choices(qt, ui.modelSelector, model_choices([{"name": "starter", "bundled": True, "trusted": True}]))
    WidgetHelpers.fill_choices(qt, ui.deviceSelector, device_choices({"cuda": True, "cuda_name": "NVIDIA RTX 4090",
                                                                     "mps": False, "auto": "cuda"}))
    WidgetHelpers.fill_choices(qt, ui.domainSelector, domain_choices({"domains": [{"name": "synth-t1"}]}))
    ui.segmentButton.setEnabled(True)
    WidgetHelpers.show_progress(ui, "done", 1.0)
    ui.statusLabel.setText("Done in 4.2 s.")
    WidgetHelpers.show_result(qt, ui, summarize_report(DEMO_REPORT))
    frame = _framed(widget, 430)
    image = frame.grab().toImage()
    assert image.width() >= 400 and image.height() >= 500 and _not_blank(image)
    _save_if_changed(image, os.path.join(SCREENSHOTS, "UHarmonySegment.png"))


# what the Train screenshot shows: three cases adapted in 300 steps (made-up numbers)
DEMO_METRICS = [
    {"step": 0, "loss": None, "phase": "before", "dice": {"mri-flair": {"grey matter": 0.41, "white matter": 0.62}},
     "gate_accuracy": {"mri-flair": None}},
    {"step": 50, "loss": 1.21, "dice": {"mri-flair": {"grey matter": 0.55, "white matter": 0.70}}},
    {"step": 100, "loss": 0.84, "dice": {"mri-flair": {"grey matter": 0.66, "white matter": 0.77}}},
    {"step": 150, "loss": 0.67, "dice": {"mri-flair": {"grey matter": 0.71, "white matter": 0.81}}},
    {"step": 200, "loss": 0.58, "dice": {"mri-flair": {"grey matter": 0.74, "white matter": 0.83}}},
]


class _Node:
    def __init__(self, name, segments=()):
        self._name, self._segments = name, list(segments)

    def GetName(self):
        return self._name

    def GetSegmentation(self):
        segments = self._segments

        class _Segmentation:
            def GetNumberOfSegments(self):
                return len(segments)

            def GetNthSegment(self, i):
                return _Node(segments[i])

        return _Segmentation()


def demo_cases():
    from UHarmonyTrainLib.Cases import SceneCase

    return [SceneCase(_Node(f"FLAIR case {i}"), _Node(f"FLAIR case {i} labels", ["grey matter", "white matter"]))
            for i in (1, 2, 3)]


def test_helpers_fill_the_train_ui(app):
    qt = qt_namespace()
    widget = load_ui(ui_path("UHarmonyTrain"))
    ui = child_variables(widget)
    assert ui.tabWidget.count() == 2 and ui.casesTable.columnCount() == 3 and ui.comparisonTable.columnCount() == 5
    assert ui.caseSegmentationSelector.nodeTypes == ["vtkMRMLSegmentationNode"]
    TrainWidgetHelpers.fill_cases(qt, ui.casesTable, demo_cases())
    assert ui.casesTable.rowCount() == 3 and ui.casesTable.item(0, 2).text() == "grey matter, white matter"
    history = MetricHistory()
    for event in DEMO_METRICS + [dict(DEMO_METRICS[-1], step=300, phase="after", gate_accuracy={"mri-flair": 1.0})]:
        history.add(event)
    TrainWidgetHelpers.fill_comparison(qt, ui.comparisonTable, history.comparison())
    assert ui.comparisonTable.rowCount() == 3
    assert [ui.comparisonTable.item(0, c).text() for c in range(5)] == ["mri-flair", "grey matter", "0.410", "0.740", "+0.330"]
    chart = chart_geometry(history.loss_series(), history.dice_series(), 400, 160, x_max=300)
    TrainWidgetHelpers.draw_chart(qt, ui.chartLabel, chart)
    image = ui.chartLabel.pixmap().toImage()
    assert image.width() == 400
    # the Dice line is drawn where the geometry says (its colour at the last point)
    x, y = (int(round(v)) for v in chart.lines[1].points[-1])
    colour = QtGui.QColor(image.pixel(x, y))
    assert (colour.red(), colour.green(), colour.blue()) != (255, 255, 255)
    TrainWidgetHelpers.set_adapt_running(ui, True)
    assert ui.adaptButton.text() == "Cancel" and not ui.caseVolumeSelector.isEnabled()
    TrainWidgetHelpers.set_adapt_running(ui, False)
    assert ui.adaptButton.text() == "Adapt" and ui.stepsSpinBox.isEnabled()
    TrainWidgetHelpers.show_availability(ui, False, "no 'uharmony fed' yet (issue 5)")
    assert not ui.joinButton.isEnabled() and not ui.createKeyButton.isEnabled()
    assert ui.federatedNoticeLabel.text() == "no 'uharmony fed' yet (issue 5)"
    TrainWidgetHelpers.show_availability(ui, True, "")
    assert ui.joinButton.isEnabled()
    rounds = RoundHistory()
    rounds.add({"round": 1, "total": 10, "sites": 3, "metrics": {"loss": 0.8, "dice": {"grey matter": 0.6}, "gate_accuracy": 0.9}})
    TrainWidgetHelpers.fill_rounds(qt, ui.roundsTable, rounds.rows)
    assert ui.roundsTable.item(0, 0).text() == "1/10" and ui.roundsTable.item(0, 3).text() == "0.600"
    TrainWidgetHelpers.set_join_running(ui, True)
    assert ui.joinButton.text() == "Leave" and not ui.serverLineEdit.isEnabled()
    widget.deleteLater()


def test_screenshot_train(app):
    """The Adapt tab after a run (made-up numbers; plain-Qt rendering, not a Slicer screenshot)."""
    qt = qt_namespace()
    widget = load_ui(ui_path("UHarmonyTrain"))
    ui = child_variables(widget)
    ui.modelFolderLabel.setText("~/.local/share/uharmony/models")
    for combo, text in ((ui.caseVolumeSelector, "FLAIR case 3"), (ui.caseSegmentationSelector, "FLAIR case 3 labels")):
        combo.addItem(text)
    TrainWidgetHelpers.fill_cases(qt, ui.casesTable, demo_cases())
    WidgetHelpers.fill_choices(qt, ui.baseModelSelector, model_choices([{"name": "starter", "bundled": True, "trusted": True}]))
    WidgetHelpers.fill_choices(qt, ui.adaptDeviceSelector, device_choices({"cuda": True, "cuda_name": "NVIDIA RTX 4090",
                                                                         "mps": False, "auto": "cuda"}))
    ui.newModalityCheckBox.setChecked(True)
    ui.domainNameLineEdit.setText("mri-flair")
    ui.existingDomainSelector.setEnabled(False)
    ui.classesLabel.setText("Classes: grey matter, white matter")
    ui.modelNameLineEdit.setText("starter-mri-flair")
    history = MetricHistory()
    for event in DEMO_METRICS + [dict(DEMO_METRICS[-1], step=300, loss=0.52, phase="after",
                                      dice={"mri-flair": {"grey matter": 0.76, "white matter": 0.84}},
                                      gate_accuracy={"mri-flair": 1.0})]:
        history.add(event)
    TrainWidgetHelpers.draw_chart(qt, ui.chartLabel, chart_geometry(history.loss_series(), history.dice_series(),
                                                                    400, 160, x_max=300))
    TrainWidgetHelpers.fill_comparison(qt, ui.comparisonTable, history.comparison())
    TrainWidgetHelpers.show_progress(ui, "adaptProgressBar", "done", 1.0)
    ui.adaptStatusLabel.setText("Saved as 'starter-mri-flair' in your model folder. Mean Dice mri-flair: 0.515 -> 0.800. (94 s)")
    ui.casesTable.setMinimumHeight(100)
    ui.comparisonTable.setMinimumHeight(110)
    frame = _framed(widget, 450)
    image = frame.grab().toImage()
    assert image.width() >= 440 and image.height() >= 700 and _not_blank(image)
    _save_if_changed(image, os.path.join(SCREENSHOTS, "UHarmonyTrain.png"))
