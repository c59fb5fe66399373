"""UHarmony Train: adapt the model to a new modality or new classes, or join a federated round.

SKELETON. The "Adapt" and "Federated" tabs only say that these arrive with the training and
federation issues; nothing here pretends to train. The one live element is the model folder's
location (``uharmony models where``), which is real and where adapted models will go.
"""

from __future__ import annotations

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# The Segment module's Qt-free library (process runners, library commands) is shared: Slicer puts
# every scripted module folder on sys.path, and this module depends on UHarmonySegment.
from UHarmonySegmentLib.Library import LibraryCommands
from UHarmonySegmentLib.ProcessRunner import QtProcessRunner

ADAPT_NOT_READY = "Adapting the model to a new modality or to new classes arrives with the training issue."
FEDERATED_NOT_READY = "Joining a federated training round arrives with the federation issue."


class UHarmonyTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UHarmony Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["UHarmonySegment"]
        self.parent.contributors = ["UHarmony contributors"]
        self.parent.helpText = """
Adapt the UHarmony model to your own data (a new modality, new classes) or join a federated
training round with other sites without sharing images. <b>Not available yet</b>: these arrive with
the training and federation work; the tabs describe what they will do.
"""
        self.parent.acknowledgementText = "See the UHarmony Segment module."


class UHarmonyTrainWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UHarmonyTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = UHarmonyTrainLogic()
        self.ui.modelFolderLabel.setText("looking...")
        self.logic.modelFolder(self.onModelFolder)

    def onModelFolder(self, folder, error) -> None:
        self.ui.modelFolderLabel.setText(folder if error is None else f"unknown ({error})")


class UHarmonyTrainLogic(ScriptedLoadableModuleLogic):
    """Only what exists today: where the user's model folder is."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.commands = LibraryCommands(runner_factory=lambda: QtProcessRunner(qt))

    def modelFolder(self, callback) -> None:
        self.commands.call_async(["models", "where"], lambda out, error: callback((out or "").strip(), error),
                                 parse_json=False)


class UHarmonyTrainTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_TabsSayWhatIsMissing()

    def test_TabsSayWhatIsMissing(self):
        widget = slicer.util.getModuleWidget("UHarmonyTrain")
        self.assertEqual(widget.ui.tabWidget.count, 2)
        self.assertIn("training issue", widget.ui.adaptNoticeLabel.text)
        self.assertIn("federation issue", widget.ui.federatedNoticeLabel.text)
        # no control on the tabs can start anything
        for tab in (widget.ui.adaptTab, widget.ui.federatedTab):
            self.assertEqual(len(tab.findChildren(qt.QAbstractButton)), 0)
        folder = widget.logic.commands.call_sync(["models", "where"], parse_json=False).strip()
        self.assertTrue(folder)
