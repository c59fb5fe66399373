"""UHarmony Segment: one click segmentation with the U-Harmony model, on CPU or GPU.

Module + thin widget + self-test, following Slicer's scripted-module template. All logic lives in
UHarmonySegmentLib (Qt-free, tested under pytest on slicer-core); the heavy work runs in a separate
process, ``PythonSlicer -m uharmony segment ... --progress jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import ctk  # noqa: F401  (CTK widgets used by the .ui)
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # Slicer >= 5.2
    from slicer.parameterNodeWrapper import parameterNodeWrapper
except ImportError:  # pragma: no cover - older Slicer: the widget reads its controls directly
    parameterNodeWrapper = None

from UHarmonySegmentLib import Dependencies, WidgetHelpers
from UHarmonySegmentLib.Library import LibraryCommands, ensure_library_importable, exit_code_text
from UHarmonySegmentLib.Logic import INPUT_ATTRIBUTE, SegmentLogic
from UHarmonySegmentLib.Presentation import (
    channel_names,
    device_choices,
    domain_choices,
    model_choices,
    summarize_report,
)
from UHarmonySegmentLib.ProcessRunner import QtProcessRunner

ensure_library_importable()


#
# UHarmonySegment
#


class UHarmonySegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UHarmony Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["UHarmony contributors"]
        self.parent.helpText = """
Segment a loaded volume with a U-Harmony model: one model for many scanners and contrasts, which
recognises the kind of scan by itself (domain gate) and warns when the scan is unlike its training data.
Pick the volume, click <b>Segment</b>. The result is a segmentation with standard names, colours and
SNOMED CT terminology; the detected domain and the volume of each segment are shown below.
The computation runs in a separate process (GPU when available) and can be cancelled at any time.
Documentation: docs/slicer.md in the extension's source repository.
"""
        self.parent.acknowledgementText = """
U-Harmony normalization and the domain gate follow the U-Harmony paper; GIN augmentation follows
Ouyang et al.; segmentation networks come from MONAI. Not for clinical use unless the model card says so.
"""


#
# Parameter node
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class UHarmonySegmentParameterNode:
        """Choices of the module, saved with the scene."""

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        inputVolume1: slicer.vtkMRMLScalarVolumeNode
        inputVolume2: slicer.vtkMRMLScalarVolumeNode
        inputVolume3: slicer.vtkMRMLScalarVolumeNode
        model: str = ""
        device: str = "auto"
        domain: str = "auto"
        replacePrevious: bool = True

else:  # pragma: no cover
    UHarmonySegmentParameterNode = None


#
# UHarmonySegmentWidget
#


class UHarmonySegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin widget: fills controls, starts/cancels the logic, shows its results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._card = None
        self._devices = None
        self._models = None
        self._startTime = 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UHarmonySegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        for selector in (self.ui.inputSelector, self.ui.inputSelector1, self.ui.inputSelector2, self.ui.inputSelector3):
            selector.setMRMLScene(slicer.mrmlScene)
        self.ui.show3DButton.setEnabled(False)

        self.logic = UHarmonySegmentLogic()
        self.logic.progress.connect(self.onProgress)
        self.logic.log.connect(self.onLog)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.domainSelector.connect("currentIndexChanged(int)", self.onDomainChanged)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)

        WidgetHelpers.clear_result(self.ui)
        WidgetHelpers.show_channel_inputs(self.ui, ["image"])
        WidgetHelpers.fill_choices(qt, self.ui.deviceSelector, device_choices(None), "auto")
        WidgetHelpers.fill_choices(qt, self.ui.domainSelector, domain_choices(None), "auto")
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()
        self.updateDependencyBanner()
        self.refreshModels()
        self.detectDevices()
        self.updateSegmentButton()

    def cleanup(self) -> None:
        if self.logic is not None:
            if self.logic.is_running:
                self.logic.cancel()
                self.logic.runner.wait(10)
            self.logic.commands.close_all()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateSegmentButton)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        WidgetHelpers.clear_result(self.ui)
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        if UHarmonySegmentParameterNode is None:
            return
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateSegmentButton)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateSegmentButton)
            self.updateSegmentButton()

    def _setParameter(self, name, value) -> None:
        if self._parameterNode is not None and value is not None:
            setattr(self._parameterNode, name, value)

    def _getParameter(self, name, default=None):
        return getattr(self._parameterNode, name, default) if self._parameterNode is not None else default

    # -- state ----------------------------------------------------------------------------------
    def selectedInputs(self) -> list:
        selectors = [self.ui.inputSelector, self.ui.inputSelector1, self.ui.inputSelector2, self.ui.inputSelector3]
        count = len(channel_names(self._card))
        return [selectors[i].currentNode() for i in range(min(count, len(selectors)))]

    def updateSegmentButton(self, caller=None, event=None) -> None:
        if self.logic is not None and self.logic.is_running:
            self.ui.segmentButton.enabled = True
            return
        inputs = self.selectedInputs()
        model = WidgetHelpers.combo_value(self.ui.modelSelector)
        missing = [i for i, node in enumerate(inputs) if node is None]
        if missing:
            tip = "Select the input volume" if missing == [0] else "Select a volume for every input of this model"
        elif not model:
            tip = "No usable model: add one with 'Add model...'"
        else:
            tip = "Segment the input volume"
        self.ui.segmentButton.enabled = not missing and bool(model)
        self.ui.segmentButton.toolTip = tip

    def updateDependencyBanner(self) -> None:
        status = Dependencies.dependency_status()
        self.ui.dependencyFrame.setVisible(not status["ok"])
        if not status["ok"]:
            parts = ([] if status["torch"] else ["PyTorch"]) + [Dependencies.requirement_name(r) for r in status["missing"]]
            self.ui.dependencyLabel.setText("UHarmony needs Python packages that are not installed: " + ", ".join(parts))

    # -- models, devices ------------------------------------------------------------------------
    def refreshModels(self, select: str | None = None) -> None:
        self.ui.modelSelector.setEnabled(False)
        self.ui.modelSelector.toolTip = "Looking for models..."

        def done(data, error):
            self.ui.modelSelector.setEnabled(not self.logic.is_running)
            if error is not None:
                self._models = []
                self.onLog(f"Listing models failed: {error}")
                self.ui.statusLabel.setText(f"Cannot list models: {error}")
            else:
                self._models = data
            current = select or self._getParameter("model") or None
            WidgetHelpers.fill_choices(qt, self.ui.modelSelector, model_choices(self._models), current)
            self.onModelChanged()

        self.logic.commands.call_async(["models", "list", "--json"], done)

    def detectDevices(self) -> None:
        def done(data, error):
            if error is not None:
                self.onLog(f"Device detection failed: {error}")
                return
            self._devices = data
            WidgetHelpers.fill_choices(qt, self.ui.deviceSelector, device_choices(data), self._getParameter("device", "auto"))

        self.logic.commands.call_async(["devices", "--json"], done)

    def onModelChanged(self, index=None) -> None:
        model = WidgetHelpers.combo_value(self.ui.modelSelector)
        self._setParameter("model", model)
        self._card = None
        WidgetHelpers.show_channel_inputs(self.ui, ["image"])
        self.updateSegmentButton()
        if not model:
            return

        def done(card, error):
            if WidgetHelpers.combo_value(self.ui.modelSelector) != model:
                return  # the user picked another model meanwhile
            if error is not None:
                self.onLog(f"Reading the model card failed: {error}")
                return
            self._card = card
            WidgetHelpers.show_channel_inputs(self.ui, channel_names(card))
            WidgetHelpers.fill_choices(qt, self.ui.domainSelector, domain_choices(card), self._getParameter("domain", "auto"))
            WidgetHelpers.show_model_card(self.ui, card.get("intended_use", ""), card.get("limitations") or [])
            self.updateSegmentButton()

        self.logic.commands.call_async(["info", "--model", model, "--json"], done)

    def onDeviceChanged(self, index=None) -> None:
        self._setParameter("device", WidgetHelpers.combo_value(self.ui.deviceSelector))

    def onDomainChanged(self, index=None) -> None:
        self._setParameter("domain", WidgetHelpers.combo_value(self.ui.domainSelector))

    def onAddModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Select a UHarmony model folder (with card.json)")
        if not folder:
            return
        self.ui.statusLabel.setText(f"Checking the model in {folder}...")

        def done(output, error):
            if error is not None:
                self.ui.statusLabel.setText("The model was not added.")
                slicer.util.errorDisplay(f"The model was not added:\n{error.message or error}",
                                         detailedText=exit_code_text(error.code))
                return
            self.ui.statusLabel.setText("Model added to your model folder.")
            self.refreshModels()

        self.logic.commands.call_async(["models", "add", folder], done, parse_json=False)

    # -- dependencies ---------------------------------------------------------------------------
    def onInstallDependencies(self) -> None:
        status = Dependencies.dependency_status()
        if status["ok"]:
            self.updateDependencyBanner()
            return
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("UHarmony - install Python packages")
        names = ([] if status["torch"] else ["torch (through the PyTorch extension)"]) + status["missing"]
        box.setText("UHarmony will install:\n  " + "\n  ".join(names)
                    + "\n\nSlicer's own numpy and SimpleITK are kept as they are.")
        online = box.addButton("Install", qt.QMessageBox.AcceptRole)
        offline = box.addButton("From a wheel folder...", qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        if clicked not in (online, offline):
            return
        wheelDir = None
        if clicked == offline:
            wheelDir = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder of wheels (.whl)")
            if not wheelDir:
                return
        with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
            self.logic.installDependencies(wheelDir)
        self.updateDependencyBanner()

    # -- running --------------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self.logic.is_running:
            self.ui.statusLabel.setText("Cancelling...")
            self.logic.cancel()
            return
        inputs = self.selectedInputs()
        if any(node is None for node in inputs):
            return
        self.ui.logText.clear()
        WidgetHelpers.clear_result(self.ui)
        WidgetHelpers.set_running(self.ui, True)
        WidgetHelpers.show_progress(self.ui, "starting", 0.0)
        self.ui.statusLabel.setText("Starting...")
        self._startTime = time.time()
        self.logic.segment(
            inputs,
            model=WidgetHelpers.combo_value(self.ui.modelSelector),
            device=WidgetHelpers.combo_value(self.ui.deviceSelector) or "auto",
            domain=WidgetHelpers.combo_value(self.ui.domainSelector) or "auto",
            replace=self.ui.replaceCheckBox.checked,
            on_finished=self.onFinished,
        )

    def onProgress(self, stage, done, total, fraction) -> None:
        WidgetHelpers.show_progress(self.ui, stage, fraction)
        self.ui.statusLabel.setText(f"{stage.capitalize()}: {done}/{total}" if total else stage.capitalize())

    def onLog(self, message) -> None:
        self.ui.logText.appendPlainText(str(message))

    def onFinished(self, result) -> None:
        WidgetHelpers.set_running(self.ui, False)
        elapsed = time.time() - self._startTime
        if result.succeeded:
            WidgetHelpers.show_progress(self.ui, "done", 1.0)
            WidgetHelpers.show_result(qt, self.ui, summarize_report(result.report))
            self.ui.show3DButton.setSegmentationNode(result.segmentation_node)
            self.ui.show3DButton.setEnabled(True)
            inputs = self.selectedInputs()
            if inputs and inputs[0] is not None:
                slicer.util.setSliceViewerLayers(background=inputs[0], fit=False)
            notes = "; ".join(result.warnings)
            self.ui.statusLabel.setText(f"Done in {elapsed:.1f} s." + (f" Note: {notes}" if notes else ""))
        elif result.cancelled:
            WidgetHelpers.show_progress(self.ui, "cancelled", 0.0)
            self.ui.statusLabel.setText("Cancelled. Its temporary files were deleted.")
        else:
            WidgetHelpers.show_progress(self.ui, "failed", 0.0)
            self.ui.statusLabel.setText(f"Failed: {result.message}")
            slicer.util.errorDisplay(f"Segmentation failed:\n{result.message}",
                                     detailedText="\n".join(self.ui.logText.toPlainText().splitlines()[-40:]))
        self.updateSegmentButton()

    def onInputChanged(self, node=None) -> None:
        """Show the stored result of the selected volume, if it was segmented before."""
        self.updateSegmentButton()
        if node is None or self.logic.is_running:
            return
        previous = self.logic._find_previous(node)
        if previous is None or not previous.GetAttribute("UHarmony.Report"):
            WidgetHelpers.clear_result(self.ui)
            self.ui.show3DButton.setEnabled(False)
            return
        try:
            report = json.loads(previous.GetAttribute("UHarmony.Report"))
        except ValueError:
            return
        WidgetHelpers.show_result(qt, self.ui, summarize_report(report))
        self.ui.show3DButton.setSegmentationNode(previous)
        self.ui.show3DButton.setEnabled(True)


#
# UHarmonySegmentLogic
#


class UHarmonySegmentLogic(ScriptedLoadableModuleLogic, SegmentLogic):
    """The module logic: `SegmentLogic` on Slicer's scene with a QProcess runner.

    Scripting::

        logic = slicer.util.getModuleLogic("UHarmonySegment")
        result = logic.segment_sync([volumeNode], device="auto")   # blocks; raises SegmentError on failure
        task = logic.segment([volumeNode], on_finished=print)       # returns at once
    """

    def __init__(self, runner=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentLogic.__init__(self, slicer.mrmlScene, runner or QtProcessRunner(qt))
        self.commands = LibraryCommands(python_executable=self.python_executable, library_root=self.library_root,
                                        runner_factory=lambda: QtProcessRunner(qt))

    def getParameterNode(self):
        node = super().getParameterNode()
        return UHarmonySegmentParameterNode(node) if UHarmonySegmentParameterNode is not None else node

    def installDependencies(self, wheelDir: str | None = None) -> None:
        """Install what is missing: torch via the PyTorch extension (or the wheel folder), then the rest."""
        status = Dependencies.dependency_status()
        constraints = os.path.join(slicer.app.temporaryPath, "uharmony-constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            f.write(Dependencies.constraints_text())
        if not status["torch"]:
            if wheelDir:
                slicer.util.pip_install(Dependencies.pip_arguments([Dependencies.TORCH_REQUIREMENT], constraints, wheelDir))
            else:
                try:
                    import PyTorchUtils
                except ImportError as exc:
                    raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                                       "restart Slicer, then click Install again.") from exc
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                 torchVersionRequirement=Dependencies.TORCH_REQUIREMENT[5:]) is None:
                    raise RuntimeError("The PyTorch extension could not install torch.")
        if status["missing"]:
            slicer.util.pip_install(Dependencies.pip_arguments(status["missing"], constraints, wheelDir))


#
# UHarmonySegmentTest
#


class UHarmonySegmentTest(ScriptedLoadableModuleTest):
    """Self-tests inside Slicer (run them with Testing/SlicerSelfTests/run_selftests.py).

    They exercise what pytest cannot: the real Slicer application, its PythonSlicer, QProcess,
    loadVolume and the module widget.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)
        self.tempDir = tempfile.mkdtemp(prefix="uharmony-selftest-")

    def tearDown(self):
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def runTest(self):
        for name in ("test_SegmentSyntheticScan", "test_ObliqueFlippedMatchesLibrary", "test_CancelRemovesTempFiles",
                     "test_ConstantVolumeIsRefused", "test_WidgetSegments"):
            self.setUp()
            try:
                getattr(self, name)()
            finally:
                self.tearDown()

    # helpers
    def _logic(self):
        logic = UHarmonySegmentLogic()
        logic.temp_root = self.tempDir
        return logic

    def _syntheticVolume(self, name="synthetic"):
        path = os.path.join(self.tempDir, f"{name}.nii.gz")
        logic = self._logic()
        logic.commands.module = "uharmony.data.synth"
        logic.commands.call_sync(["--seed", "90001", "--style", "synth-t1", "--spacing", "2", "--shape", "64", "72", "64",
                                  "--out", path], parse_json=False)
        node = slicer.util.loadVolume(path)
        node.SetName(name)
        return node

    def _privateFolders(self):
        return [p for p in os.listdir(self.tempDir) if p.startswith("uharmony-")]

    # tests
    def test_SegmentSyntheticScan(self):
        self.delayDisplay("Segmenting a synthetic scan")
        volume = self._syntheticVolume()
        logic = self._logic()
        card = logic.commands.call_sync(["info", "--json"])  # the default (bundled) model, as segment uses
        result = logic.segment_sync([volume])
        node = result.segmentation_node
        self.assertTrue(result.succeeded, result.message)
        self.assertEqual(node.GetName(), "synthetic segmentation")
        names = {node.GetSegmentation().GetNthSegment(i).GetName() for i in range(node.GetSegmentation().GetNumberOfSegments())}
        self.assertEqual(names, {c["name"] for c in card["classes"] if c["value"] != 0})
        self.assertTrue(node.GetSegmentation().ContainsRepresentation("Closed surface"))
        self.assertEqual(node.GetAttribute(INPUT_ATTRIBUTE), volume.GetID())
        self.assertTrue(json.loads(node.GetAttribute("UHarmony.DomainProbabilities")))
        self.assertEqual(self._privateFolders(), [])
        self.delayDisplay("Segmented")

    def test_ObliqueFlippedMatchesLibrary(self):
        """A flipped, oblique volume: the segmentation matches the library run directly on the same file."""
        import numpy as np

        volume = self._syntheticVolume("oblique")
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        rotate = vtk.vtkTransform()
        rotate.RotateZ(20)
        rotate.RotateX(-10)
        rotate.Scale(-1, 1, 1)
        combined = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(rotate.GetMatrix(), matrix, combined)
        volume.SetIJKToRASMatrix(combined)
        file = os.path.join(self.tempDir, "oblique.nrrd")
        self.assertTrue(slicer.util.saveNode(volume, file))
        direct = os.path.join(self.tempDir, "direct.nrrd")
        logic = self._logic()
        logic.commands.call_sync(["segment", file, "-o", direct, "--device", "cpu"], parse_json=False)
        reference = slicer.util.loadLabelVolume(direct)
        result = logic.segment_sync([volume], device="cpu")
        self.assertTrue(result.succeeded, result.message)
        exported = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(result.segmentation_node, exported, reference)
        segmentation = result.segmentation_node.GetSegmentation()
        ours = slicer.util.arrayFromVolume(exported)
        theirs = slicer.util.arrayFromVolume(reference)
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            # exported label values follow segment order; compare masks by voxel count and overlap
            mine = ours == (i + 1)
            library = theirs == segment.GetLabelValue()
            self.assertEqual(int(mine.sum()), int(library.sum()), segment.GetName())
            self.assertTrue(np.array_equal(mine, library), segment.GetName())

    def test_CancelRemovesTempFiles(self):
        volume = self._syntheticVolume()
        logic = self._logic()
        seen = []

        def onProgress(stage, done, total, fraction):
            if not seen:
                seen.append(logic._task.temp_dir)
                task.cancel()

        task = logic.segment([volume], on_progress=onProgress)
        result = task.wait(120)
        self.assertTrue(result is not None and result.cancelled, result and result.message)
        self.assertFalse(os.path.exists(seen[0]))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
        self.assertEqual(self._privateFolders(), [])

    def test_ConstantVolumeIsRefused(self):
        import numpy as np

        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "constant")
        slicer.util.updateVolumeFromArray(volume, np.full((40, 48, 40), 7, np.int16))
        result = self._logic().segment_sync([volume], raise_on_error=False)
        self.assertEqual(result.status, "failed")
        self.assertEqual(result.exit_code, 3, result.message)
        self.assertIn("constant", result.message.lower())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)

    def test_WidgetSegments(self):
        volume = self._syntheticVolume("widget")
        widget = slicer.util.getModuleWidget("UHarmonySegment")
        deadline = time.time() + 120
        while WidgetHelpers.combo_value(widget.ui.modelSelector) is None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        widget.ui.inputSelector.setCurrentNode(volume)
        slicer.app.processEvents()
        self.assertTrue(widget.ui.segmentButton.enabled)
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        while widget.logic.is_running and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertGreater(widget.ui.segmentsTable.rowCount, 0)
        self.assertNotEqual(widget.ui.domainLabel.text, "-")
