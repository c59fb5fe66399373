"""Plain-Qt stand-ins for Slicer's widgets, so PySide6's QUiLoader can build the modules' .ui files.

Each placeholder has the class name of the Slicer/CTK widget it stands for (so `findChild` and the
class names seen by the tests match the .ui) and the properties the .ui sets on it. They only
draw something similar; the real widgets exist only inside Slicer.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

PLACEHOLDER_NOTE = "plain-Qt rendering with stand-ins for Slicer widgets (not a Slicer screenshot)"


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """CTK's collapsible section: a titled box; `text` maps to the title."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False
        self.setStyleSheet(
            "ctkCollapsibleButton { font-weight: bold; border: 1px solid #b8b8b8; border-radius: 3px;"
            " margin-top: 14px; padding-top: 6px; }"
            " ctkCollapsibleButton::title { subcontrol-origin: margin; left: 8px; padding: 0 4px; }"
            " ctkCollapsibleButton QWidget { font-weight: normal; }")

    def getText(self):
        return self.title().lstrip("\u25be\u25b8 ")

    def setText(self, text):
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + text)

    def getCollapsed(self):
        return self._collapsed

    def setCollapsed(self, collapsed):
        text = self.getText()
        self._collapsed = bool(collapsed)
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + text)
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)
        self.setFlat(self._collapsed)
        self.setMaximumHeight(22 if self._collapsed else 16777215)

    text = QtCore.Property(str, getText, setText)
    collapsed = QtCore.Property(bool, getCollapsed, setCollapsed)


class qMRMLWidget(QtWidgets.QWidget):
    pass


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Node selector stand-in: keeps the properties the .ui sets so tests can read them back, and
    offers the node API the module uses (setMRMLScene, currentNode, setCurrentNode, currentNodeChanged)."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node_types: list[str] = []
        self._flags = {"showChildNodeTypes": True, "addEnabled": True, "removeEnabled": True,
                       "noneEnabled": False, "renameEnabled": False, "editEnabled": False}
        self._scene = None
        self._current = None

    def setMRMLScene(self, scene):
        self._scene = scene

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        if self._current is not None and self._scene is not None and not self._scene.IsNodePresent(self._current):
            self._current = None
        return self._current

    def setCurrentNode(self, node):
        self._current = node
        self.clear()
        if node is not None:
            self.addItem(node.GetName())
        self.currentNodeChanged.emit(node)

    def getNodeTypes(self):
        return self._node_types

    def setNodeTypes(self, types):
        self._node_types = list(types)

    nodeTypes = QtCore.Property("QStringList", getNodeTypes, setNodeTypes)

    def _flag(name):  # noqa: N805 - property factory
        return QtCore.Property(bool, lambda self: self._flags[name], lambda self, v: self._flags.__setitem__(name, bool(v)))

    showChildNodeTypes = _flag("showChildNodeTypes")
    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    noneEnabled = _flag("noneEnabled")
    renameEnabled = _flag("renameEnabled")
    editEnabled = _flag("editEnabled")
    del _flag


class ctkMenuButton(QtWidgets.QPushButton):
    pass


class qMRMLSegmentationShow3DButton(ctkMenuButton):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._segmentation_node = None

    def setSegmentationNode(self, node):
        self._segmentation_node = node

    def segmentationNode(self):
        return self._segmentation_node


class ctkPathLineEdit(QtWidgets.QLineEdit):
    """CTK's path editor: `currentPath` is the text; `currentPathChanged` follows it."""

    currentPathChanged = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.textChanged.connect(self.currentPathChanged.emit)

    def getCurrentPath(self):
        return self.text()

    def setCurrentPath(self, path):
        self.setText(path)

    currentPath = QtCore.Property(str, getCurrentPath, setCurrentPath)


class qMRMLSubjectHierarchyComboBox(QtWidgets.QComboBox):
    pass


class ctkDoubleSpinBox(QtWidgets.QDoubleSpinBox):
    pass


class ctkSliderWidget(QtWidgets.QDoubleSpinBox):
    pass


class qMRMLSegmentSelectorWidget(QtWidgets.QComboBox):
    pass


class qMRMLPlotView(QtWidgets.QFrame):
    pass


PLACEHOLDERS = [ctkCollapsibleButton, qMRMLWidget, qMRMLNodeComboBox, ctkMenuButton, qMRMLSegmentationShow3DButton,
                ctkPathLineEdit, qMRMLSubjectHierarchyComboBox, ctkDoubleSpinBox, ctkSliderWidget,
                qMRMLSegmentSelectorWidget, qMRMLPlotView]
PLACEHOLDER_NAMES = {cls.__name__ for cls in PLACEHOLDERS}


def application():
    app = QtWidgets.QApplication.instance()
    if app is None:
        app = QtWidgets.QApplication(["uharmony-ui-test"])
        app.setStyle("Fusion")
    return app


def load_ui(path: str) -> QtWidgets.QWidget:
    from PySide6.QtUiTools import QUiLoader

    application()
    loader = QUiLoader()
    for cls in PLACEHOLDERS:
        loader.registerCustomWidget(cls)
    file = QtCore.QFile(path)
    if not file.open(QtCore.QFile.ReadOnly):
        raise OSError(f"cannot open {path}")
    try:
        widget = loader.load(file)
    finally:
        file.close()
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {path}: {loader.errorString()}")
    return widget


def color_icon(rgb) -> QtGui.QIcon:
    pix = QtGui.QPixmap(14, 14)
    pix.fill(QtGui.QColor.fromRgbF(*rgb))
    return QtGui.QIcon(pix)
