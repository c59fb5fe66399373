"""UHarmony Train: adapt a model to a new modality or new classes, or join a federated run.

Module + thin widget + self-test, following Slicer's scripted-module template. The logic lives in
UHarmonyTrainLib (Qt-free, tested under pytest on slicer-core) and reuses UHarmonySegmentLib's
process runners, protocol parser and library commands; the heavy work runs in separate processes,
``PythonSlicer -m uharmony adapt|models add|fed join ... --progress jsonl``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import ctk  # noqa: F401  (CTK widgets used by the .ui)
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# The Segment module's Qt-free library is shared: Slicer puts every scripted module folder on
# sys.path, and this module depends on UHarmonySegment.
from UHarmonySegmentLib import WidgetHelpers
from UHarmonySegmentLib.Library import LibraryCommands, ensure_library_importable
from UHarmonySegmentLib.Presentation import Choice, device_choices, model_choices
from UHarmonySegmentLib.ProcessRunner import QtProcessRunner
from UHarmonyTrainLib import TrainWidgetHelpers
from UHarmonyTrainLib.Adapt import AdaptLogic, AdaptRequest
from UHarmonyTrainLib.Cases import (
    SceneCase,
    class_key,
    datalist_classes,
    find_case_pairs,
    read_datalist,
    segment_names,
)
from UHarmonyTrainLib.Federated import FederatedLogic, JoinRequest, read_public_key
from UHarmonyTrainLib.Metrics import chart_geometry

ensure_library_importable()

CHART_SIZE = (400, 160)


class UHarmonyTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UHarmony Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["UHarmonySegment"]
        self.parent.contributors = ["UHarmony contributors"]
        self.parent.helpText = """
Adapt a UHarmony model to your own labelled cases (a new modality, new classes) with a small training
budget, watching the loss and Dice, and save it in your model folder where UHarmony Segment finds it;
or join a federated training run with other sites without sharing images.
Documentation: docs/slicer.md in the extension's source repository.
"""
        self.parent.acknowledgementText = "See the UHarmony Segment module."


#
# UHarmonyTrainWidget
#


class UHarmonyTrainWidget(ScriptedLoadableModuleWidget):
    """Thin widget: collects the choices, starts/cancels the logic, shows progress and results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.cases: list[SceneCase] = []
        self._models = None
        self._card = None
        self._availability = None
        self._startTime = 0.0
        self._steps = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UHarmonyTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.ui.caseVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.caseSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.logic = UHarmonyTrainLogic()

        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.findCasesButton.connect("clicked(bool)", self.onFindCases)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.baseModelSelector.connect("currentIndexChanged(int)", self.onBaseModelChanged)
        self.ui.newModalityCheckBox.connect("toggled(bool)", self.updateDomainControls)
        self.ui.newClassesCheckBox.connect("toggled(bool)", self.updateClassesLabel)
        self.ui.datalistRadioButton.connect("toggled(bool)", self.updateClassesLabel)
        self.ui.datalistPathLineEdit.connect("currentPathChanged(QString)", self.onDatalistChanged)
        self.ui.addKeepButton.connect("clicked(bool)", self.onAddKeep)
        self.ui.removeKeepButton.connect("clicked(bool)", self.onRemoveKeep)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.createKeyButton.connect("clicked(bool)", self.onCreateKey)
        self.ui.showPublicKeyButton.connect("clicked(bool)", self.onShowPublicKey)
        self.ui.joinButton.connect("clicked(bool)", self.onJoinButton)

        WidgetHelpers.fill_choices(qt, self.ui.adaptDeviceSelector, device_choices(None), "auto")
        TrainWidgetHelpers.fill_cases(qt, self.ui.casesTable, self.cases)
        self.updateDomainControls()
        self.showChart()
        self.showRoundsChart()
        TrainWidgetHelpers.show_availability(self.ui, False, "Checking whether this library can join a federation...")
        self.ui.modelFolderLabel.setText("looking...")
        self.logic.commands.call_async(["models", "where"], self.onModelFolder, parse_json=False)
        self.logic.commands.call_async(["devices", "--json"], self.onDevices)
        self.logic.federated.availability_async(self.onAvailability)
        self.refreshModels()

    def cleanup(self) -> None:
        if self.logic is not None:
            for logic in (self.logic.adapt, self.logic.federated):
                if logic.is_running:
                    logic.cancel()
                    logic.runner.wait(10)
            self.logic.commands.close_all()

    # -- library answers ----------------------------------------------------------------------
    def onModelFolder(self, folder, error) -> None:
        self.ui.modelFolderLabel.setText((folder or "").strip() if error is None else f"unknown ({error})")

    def onDevices(self, devices, error) -> None:
        if error is None:
            WidgetHelpers.fill_choices(qt, self.ui.adaptDeviceSelector, device_choices(devices), "auto")

    def onAvailability(self, availability) -> None:
        self._availability = availability
        TrainWidgetHelpers.show_availability(self.ui, availability.available, availability.reason)

    def refreshModels(self, select=None) -> None:
        def done(models, error):
            self._models = [] if error is not None else models
            if error is not None:
                self.onLog(f"Listing models failed: {error}")
            current = select or WidgetHelpers.combo_value(self.ui.baseModelSelector)
            WidgetHelpers.fill_choices(qt, self.ui.baseModelSelector, model_choices(self._models), current)
            self.onBaseModelChanged()

        self.logic.commands.call_async(["models", "list", "--json"], done)

    def onBaseModelChanged(self, index=None) -> None:
        model = WidgetHelpers.combo_value(self.ui.baseModelSelector)
        self._card = None
        if not model:
            return

        def done(card, error):
            if WidgetHelpers.combo_value(self.ui.baseModelSelector) != model:
                return
            if error is not None:
                self.onLog(f"Reading the model card failed: {error}")
                return
            self._card = card
            domains = [d.get("name") for d in card.get("domains") or []]
            current = WidgetHelpers.combo_value(self.ui.existingDomainSelector)
            choices = [Choice(str(d), str(d)) for d in domains if d]
            WidgetHelpers.fill_choices(qt, self.ui.existingDomainSelector, choices, current)
            self.updateClassesLabel()
            self.suggestModelName()

        self.logic.commands.call_async(["info", "--model", model, "--json"], done)

    # -- cases ----------------------------------------------------------------------------------
    def onAddCase(self) -> None:
        volume, segmentation = self.ui.caseVolumeSelector.currentNode(), self.ui.caseSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            self.ui.adaptStatusLabel.setText("Choose a volume and its segmentation, then 'Add pair'.")
            return
        if any(c.volume == volume and c.segmentation == segmentation for c in self.cases):
            return
        self.cases.append(SceneCase(volume, segmentation))
        self.casesChanged()

    def onFindCases(self) -> None:
        known = {(c.volume.GetID(), c.segmentation.GetID()) for c in self.cases}
        found = [c for c in find_case_pairs(slicer.mrmlScene) if (c.volume.GetID(), c.segmentation.GetID()) not in known]
        self.cases.extend(found)
        self.ui.adaptStatusLabel.setText(f"Found {len(found)} new case(s) in the scene." if found else
                                         "No other segmentation with its reference volume in the scene.")
        self.casesChanged()

    def onRemoveCase(self) -> None:
        row = self.ui.casesTable.currentRow()
        if 0 <= row < len(self.cases):
            del self.cases[row]
            self.casesChanged()

    def casesChanged(self) -> None:
        self.cases = [c for c in self.cases if slicer.mrmlScene.IsNodePresent(c.volume)
                      and slicer.mrmlScene.IsNodePresent(c.segmentation)]
        TrainWidgetHelpers.fill_cases(qt, self.ui.casesTable, self.cases)
        self.ui.sceneCasesRadioButton.setChecked(True)
        self.updateClassesLabel()

    def onDatalistChanged(self, path=None) -> None:
        self.ui.datalistRadioButton.setChecked(True)
        try:
            doc = read_datalist(self.ui.datalistPathLineEdit.currentPath)
        except ValueError:
            return
        domain = str(doc.get("domain") or "")
        domains = [d.get("name") for d in (self._card or {}).get("domains") or []]
        if domain and domain not in domains:
            self.ui.newModalityCheckBox.setChecked(True)
            self.ui.domainNameLineEdit.setText(domain)
        self.updateClassesLabel()

    def onAddKeep(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Datalist of an old domain (replayed)", "",
                                              "Datalist (*.json)")
        if path:
            self.ui.keepListWidget.addItem(path)

    def onRemoveKeep(self) -> None:
        row = self.ui.keepListWidget.currentRow
        if row >= 0:
            self.ui.keepListWidget.takeItem(row)

    def caseClassNames(self) -> list[str]:
        if self.ui.datalistRadioButton.checked:
            try:
                return datalist_classes(read_datalist(self.ui.datalistPathLineEdit.currentPath))
            except ValueError:
                return []
        return list(dict.fromkeys(n for c in self.cases for n in segment_names(c.segmentation)))

    def updateDomainControls(self, checked=None) -> None:
        new = self.ui.newModalityCheckBox.checked
        self.ui.domainNameLineEdit.setEnabled(new)
        self.ui.existingDomainSelector.setEnabled(not new)
        self.suggestModelName()

    def updateClassesLabel(self, checked=None) -> None:
        names = self.caseClassNames()
        base = {class_key(c.get("name", "")) for c in (self._card or {}).get("classes") or []}
        new = [n for n in names if class_key(n) not in base]
        if not names:
            text = "Classes: none yet (add labelled cases)"
        else:
            text = "Classes: " + ", ".join(f"<b>{n}</b> (new)" if n in new else n for n in names)
            if new and not self.ui.newClassesCheckBox.checked:
                text += "<br><span style='color:#b00'>Tick 'New classes' to add the new ones.</span>"
        self.ui.classesLabel.setText(text)

    def suggestModelName(self) -> None:
        if self.ui.modelNameLineEdit.text and self.ui.modelNameLineEdit.modified:
            return  # the user's own name
        base = WidgetHelpers.combo_value(self.ui.baseModelSelector) or "model"
        domain = self.domainChoice() or "adapted"
        taken = {m.get("name") for m in self._models or []}
        name, n = f"{base}-{domain}", 1
        while name in taken:
            n += 1
            name = f"{base}-{domain}-{n}"
        self.ui.modelNameLineEdit.setText(name)

    def domainChoice(self) -> str:
        if self.ui.newModalityCheckBox.checked:
            return self.ui.domainNameLineEdit.text.strip()
        return WidgetHelpers.combo_value(self.ui.existingDomainSelector) or ""

    # -- adapting -------------------------------------------------------------------------------
    def adaptRequest(self) -> AdaptRequest:
        useDatalist = self.ui.datalistRadioButton.checked
        return AdaptRequest(
            base_model=WidgetHelpers.combo_value(self.ui.baseModelSelector) or "brain",
            cases=[] if useDatalist else list(self.cases),
            datalist=self.ui.datalistPathLineEdit.currentPath if useDatalist else None,
            domain=self.domainChoice(), new_modality=self.ui.newModalityCheckBox.checked,
            new_classes=self.ui.newClassesCheckBox.checked,
            keep=[self.ui.keepListWidget.item(i).text() for i in range(self.ui.keepListWidget.count)],
            steps=self.ui.stepsSpinBox.value, evaluate_every=self.ui.evaluateEverySpinBox.value,
            device=WidgetHelpers.combo_value(self.ui.adaptDeviceSelector) or "auto",
            model_name=self.ui.modelNameLineEdit.text.strip(), base_card=self._card)

    def onAdaptButton(self) -> None:
        if self.logic.adapt.is_running:
            self.ui.adaptStatusLabel.setText("Cancelling...")
            self.logic.adapt.cancel()
            return
        self.ui.adaptLogText.clear()
        self.ui.comparisonTable.setRowCount(0)
        self._startTime = time.time()
        request = self.adaptRequest()
        self._steps = request.steps
        TrainWidgetHelpers.set_adapt_running(self.ui, True)
        TrainWidgetHelpers.show_progress(self.ui, "adaptProgressBar", "exporting", 0.0)
        self.ui.adaptStatusLabel.setText("Checking and exporting the cases...")
        self.showChart()
        self.logic.adapt.adapt(request, on_progress=self.onAdaptProgress, on_metric=self.showChart,
                               on_log=self.onLog, on_finished=self.onAdaptFinished)

    def onAdaptProgress(self, stage, done, total, fraction) -> None:
        TrainWidgetHelpers.show_progress(self.ui, "adaptProgressBar", stage, fraction)
        text = {"load": "Loading the cases", "train": "Training", "validate": "Evaluating", "save": "Saving"}.get(stage, stage)
        self.ui.adaptStatusLabel.setText(f"{text}: {done}/{total}" if total > 1 else f"{text}...")

    def showChart(self, history=None) -> None:
        history = history if history is not None else self.logic.adapt.history
        chart = chart_geometry(history.loss_series(), history.dice_series(), *CHART_SIZE,
                               x_max=self._steps or self.ui.stepsSpinBox.value)
        TrainWidgetHelpers.draw_chart(qt, self.ui.chartLabel, chart)

    def onAdaptFinished(self, result) -> None:
        TrainWidgetHelpers.set_adapt_running(self.ui, False)
        self.updateDomainControls()
        elapsed = time.time() - self._startTime
        TrainWidgetHelpers.fill_comparison(qt, self.ui.comparisonTable, result.history.comparison())
        self.showChart(result.history)
        if result.succeeded:
            TrainWidgetHelpers.show_progress(self.ui, "adaptProgressBar", "done", 1.0)
            self.ui.adaptStatusLabel.setText(f"{result.message} ({elapsed:.0f} s)")
            self.refreshModels(select=WidgetHelpers.combo_value(self.ui.baseModelSelector))
            self.refreshSegmentModule()
        elif result.cancelled:
            TrainWidgetHelpers.show_progress(self.ui, "adaptProgressBar", "cancelled", 0.0)
            self.ui.adaptStatusLabel.setText(result.message + " Its temporary files were deleted.")
        else:
            TrainWidgetHelpers.show_progress(self.ui, "adaptProgressBar", "failed", 0.0)
            self.ui.adaptStatusLabel.setText("Not adapted: " + result.message.splitlines()[0])
            slicer.util.errorDisplay("The adaptation did not run or failed:\n" + result.message,
                                     detailedText="\n".join(self.ui.adaptLogText.toPlainText().splitlines()[-40:]))

    def refreshSegmentModule(self) -> None:
        """Let UHarmony Segment list the new model at once (if its panel was opened already)."""
        try:
            segment = slicer.modules.uharmonysegment.widgetRepresentation().self()
        except (AttributeError, RuntimeError):
            return
        if hasattr(segment, "refreshModels"):
            segment.refreshModels()

    def onLog(self, message) -> None:
        self.ui.adaptLogText.appendPlainText(str(message))

    # -- federated --------------------------------------------------------------------------------
    def onCreateKey(self) -> None:
        name = self.ui.siteNameLineEdit.text.strip()
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder for this site's key pair")
        if not folder:
            return

        def done(key, error):
            if error is not None:
                self.ui.fedStatusLabel.setText(f"No key created: {error}")
                return
            self.ui.keyPathLineEdit.currentPath = key
            self.ui.fedStatusLabel.setText(f"Created {key} (private: keep it here) and {key}.pub (send it to the coordinator).")

        self.logic.federated.create_site_key(name, folder, done)

    def onShowPublicKey(self) -> None:
        try:
            text = read_public_key(self.ui.keyPathLineEdit.currentPath)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("Public key of this site")
        box.setText("Send this public key to the coordinator, who registers it (uharmony fed register). "
                    "The private key stays on this computer.")
        box.setDetailedText(text)
        box.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        qt.QApplication.clipboard().setText(text)
        box.setInformativeText("It has been copied to the clipboard.")
        box.exec_()

    def onJoinButton(self) -> None:
        federated = self.logic.federated
        if federated.is_running:
            self.ui.fedStatusLabel.setText("Leaving...")
            federated.leave()
            return
        useDatalist = self.ui.fedDatalistRadioButton.checked
        request = JoinRequest(server=self.ui.serverLineEdit.text, ca=self.ui.caPathLineEdit.currentPath,
                              key=self.ui.keyPathLineEdit.currentPath,
                              datalist=self.ui.fedDatalistPathLineEdit.currentPath if useDatalist else None,
                              cases=[] if useDatalist else list(self.cases), domain=self.ui.fedDomainLineEdit.text.strip(),
                              base_classes=[c.get("name", "") for c in sorted((self._card or {}).get("classes") or [],
                                                                               key=lambda c: c.get("value", 0))])
        self.ui.fedLogText.clear()
        self.ui.roundsTable.setRowCount(0)
        TrainWidgetHelpers.set_join_running(self.ui, True)
        TrainWidgetHelpers.show_progress(self.ui, "fedProgressBar", "joining", 0.0)
        self.ui.fedStatusLabel.setText("Joining...")
        self.showRoundsChart()
        federated.join(request, on_round=self.onRound, on_log=self.ui.fedLogText.appendPlainText,
                       on_finished=self.onJoinFinished)

    def onRound(self, row, history) -> None:
        TrainWidgetHelpers.fill_rounds(qt, self.ui.roundsTable, history.rows)
        TrainWidgetHelpers.show_progress(self.ui, "fedProgressBar", f"round {row.round}/{row.total or '?'}", history.fraction())
        self.ui.fedStatusLabel.setText(f"Round {row.round} done with {row.sites} site(s).")
        self.showRoundsChart(history)

    def showRoundsChart(self, history=None) -> None:
        history = history if history is not None else self.logic.federated.rounds
        total = history.latest.total if history.latest else None
        chart = chart_geometry(history.loss_series(), history.dice_series(), CHART_SIZE[0], 130, x_max=total,
                               x_label="rounds")
        TrainWidgetHelpers.draw_chart(qt, self.ui.fedChartLabel, chart, "Round metrics appear here once joined")

    def onJoinFinished(self, result) -> None:
        TrainWidgetHelpers.set_join_running(self.ui, False)
        available = self._availability is not None and self._availability.available
        TrainWidgetHelpers.show_availability(self.ui, available, self._availability.reason if self._availability else "")
        self.ui.fedStatusLabel.setText(result.message.splitlines()[0] if result.message else result.status)
        if result.status == "failed":
            slicer.util.errorDisplay("Joining the federation failed:\n" + result.message,
                                     detailedText="\n".join(self.ui.fedLogText.toPlainText().splitlines()[-40:]))


#
# UHarmonyTrainLogic
#


class UHarmonyTrainLogic(ScriptedLoadableModuleLogic):
    """The module logic: `AdaptLogic` and `FederatedLogic` on Slicer's scene with QProcess runners.

    Scripting::

        from UHarmonyTrainLib.Adapt import AdaptRequest
        from UHarmonyTrainLib.Cases import SceneCase
        logic = slicer.util.getModuleLogic("UHarmonyTrain")
        request = AdaptRequest(base_model="brain", cases=[SceneCase(volume, segmentation)], domain="mri-swi",
                               new_modality=True, steps=100, model_name="brain-swi")
        result = logic.adapt.adapt_sync(request)   # blocks; result.succeeded, result.message, result.history
    """

    def __init__(self, runner_factory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        factory = runner_factory or (lambda: QtProcessRunner(qt))
        self.adapt = AdaptLogic(slicer.mrmlScene, factory(), runner_factory=factory)
        self.federated = FederatedLogic(slicer.mrmlScene, factory(), runner_factory=factory)
        self.commands = LibraryCommands(runner_factory=factory)


#
# UHarmonyTrainTest
#


class UHarmonyTrainTest(ScriptedLoadableModuleTest):
    """Self-tests inside Slicer (run them with Testing/SlicerSelfTests/run_selftests.py).

    They run the real library on the bundled model: three synthetic FLAIR-like cases made by the
    library, loaded through storage nodes, adapted in a few steps; cancel; the Federated tab's state.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)
        self.tempDir = tempfile.mkdtemp(prefix="uharmony-selftest-")
        self.modelsDir = os.path.join(self.tempDir, "models")
        self._oldModels = os.environ.get("UHARMONY_MODELS")
        os.environ["UHARMONY_MODELS"] = self.modelsDir  # never the user's own model folder

    def tearDown(self):
        if self._oldModels is None:
            os.environ.pop("UHARMONY_MODELS", None)
        else:
            os.environ["UHARMONY_MODELS"] = self._oldModels
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def runTest(self):
        for name in ("test_AdaptThreeSceneCases", "test_CancelAdapt", "test_FederatedTabSaysWhetherItCanJoin"):
            self.setUp()
            try:
                getattr(self, name)()
            finally:
                self.tearDown()

    # helpers
    def _logic(self):
        logic = UHarmonyTrainLogic()  # after setUp: its processes inherit UHARMONY_MODELS
        for part in (logic.adapt, logic.federated):
            part.temp_root = self.tempDir
        return logic

    def _cases(self, logic, count=3):
        """Synthetic FLAIR-like heads (the library writes them), read through storage nodes."""
        cases = []
        for index in range(count):
            image, labels = (os.path.join(self.tempDir, f"{k}{index}.nii.gz") for k in ("image", "labels"))
            logic.commands.module = "uharmony.data.synth"
            try:
                logic.commands.call_sync(["--seed", str(72011 + index), "--style", "synth-flair", "--spacing", "2",
                                          "--out", image, "--labels", labels], parse_json=False)
            finally:
                logic.commands.module = "uharmony"
            volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"flair {index}")
            label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"labels {index}")
            for node, path in ((volume, image), (label, labels)):
                storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
                storage.SetFileName(path)
                self.assertTrue(storage.ReadData(node), path)
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"flair {index} segmentation")
            self.assertTrue(slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentation, ""))
            names = {1: "cerebrospinal fluid", 2: "grey matter", 3: "white matter", 4: "lesion"}
            seg = segmentation.GetSegmentation()
            for i in range(seg.GetNumberOfSegments()):
                seg.GetNthSegment(i).SetName(names.get(seg.GetNthSegment(i).GetLabelValue(), "other"))
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            slicer.mrmlScene.RemoveNode(label)
            cases.append(SceneCase(volume, segmentation))
        return cases

    def _private(self):
        return [p for p in os.listdir(self.tempDir) if p.startswith("uharmony-")]

    # tests
    def test_AdaptThreeSceneCases(self):
        self.delayDisplay("Adapting the bundled model to three synthetic FLAIR-like cases")
        logic = self._logic()
        request = AdaptRequest(base_model="starter", cases=self._cases(logic), domain="synth-flair", new_modality=True,
                               steps=4, evaluate_every=2, device="cpu", model_name="starter-flair-selftest")
        metrics = []
        result = logic.adapt.adapt_sync(request, timeout=900, on_metric=lambda h: metrics.append(len(h)))
        self.assertTrue(result.succeeded, result.message)
        self.assertEqual(metrics, [1, 2, 3])
        listed = {m["name"]: m for m in logic.commands.list_models()}
        self.assertTrue(listed["starter-flair-selftest"]["trusted"])
        self.assertTrue(result.history.comparison())
        self.assertIsNotNone(result.history.before)
        self.assertIsNotNone(result.history.after)
        self.assertEqual(self._private(), [])
        self.delayDisplay(result.message)

    def test_CancelAdapt(self):
        logic = self._logic()
        request = AdaptRequest(base_model="starter", cases=self._cases(logic, 1), domain="synth-flair", new_modality=True,
                               steps=500, device="cpu", model_name="never")
        seen = []

        def onProgress(stage, done, total, fraction):
            if not seen:
                seen.append(task.temp_dir)
                task.cancel()

        task = logic.adapt.adapt(request, on_progress=onProgress)
        result = task.wait(300)
        self.assertTrue(result is not None and result.cancelled, result and result.message)
        self.assertFalse(os.path.exists(seen[0]))
        self.assertEqual(self._private(), [])
        self.assertNotIn("never", {m["name"] for m in logic.commands.list_models()})

    def test_FederatedTabSaysWhetherItCanJoin(self):
        widget = slicer.util.getModuleWidget("UHarmonyTrain")
        availability = widget.logic.federated.availability()
        deadline = time.time() + 120
        while widget._availability is None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(widget.ui.joinButton.enabled, availability.available)
        if not availability.available:
            self.assertEqual(widget.ui.federatedNoticeLabel.text, availability.reason)
