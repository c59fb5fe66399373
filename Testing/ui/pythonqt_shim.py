"""Just enough of Slicer's Python environment to run a module's Widget class outside Slicer.

- `PQ` wraps PySide6 objects so they behave like PythonQt's: a Q_PROPERTY is an attribute (read it
  without calling, assign to it), a method of the same name is hidden, and ``obj.connect("sig(args)",
  slot)`` connects by signature, dropping arguments the slot does not take. Code that would break
  under PythonQt (``label.text()``, ``button.enabled()``) breaks here too.
- `qt_module()` is a ``qt`` module made of PySide6's QtCore, QtGui and QtWidgets classes.
- `install()` puts ``qt``, ``ctk`` and ``slicer.ScriptedLoadableModule`` (minimal base classes) into
  sys.modules and patches the few ``slicer.util`` functions that need Slicer's application.

What stays untested this way: the real Slicer widgets, parameterNodeWrapper, and PythonQt itself.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
import unittest

from PySide6 import QtCore, QtGui, QtWidgets

from placeholders import load_ui


def unwrap(value):
    return value._obj if isinstance(value, PQ) else value


def wrap(value):
    if isinstance(value, QtCore.QObject) and not isinstance(value, PQ):
        return PQ(value)
    return value


def _arity(slot) -> int | None:
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


class PQ:
    """A PySide6 QObject seen the PythonQt way."""

    __slots__ = ("_obj", "__weakref__")

    def __init__(self, obj):
        object.__setattr__(self, "_obj", obj)

    def __eq__(self, other):
        return unwrap(other) is self._obj

    def __hash__(self):
        return id(self._obj)

    def _is_property(self, name: str) -> bool:
        return self._obj.metaObject().indexOfProperty(name) >= 0

    def __getattr__(self, name):
        obj = self._obj
        if name == "connect":
            return self._connect
        if self._is_property(name):
            return wrap(obj.property(name))
        attr = getattr(obj, name)
        if isinstance(attr, QtCore.SignalInstance):
            return attr
        if callable(attr):
            def call(*args, **kwargs):
                return wrap(attr(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))

            return call
        return wrap(attr)

    def __setattr__(self, name, value):
        if self._is_property(name):
            if not self._obj.setProperty(name, unwrap(value)):
                raise AttributeError(f"cannot set property {name}")
            return
        raise AttributeError(f"{type(self._obj).__name__} has no property {name!r} (PythonQt would not set it either)")

    def _connect(self, signature: str, slot) -> bool:
        name = signature.split("(", 1)[0].strip()
        signal = getattr(self._obj, name)
        arity = _arity(slot)

        def forward(*args):
            args = [wrap(a) for a in args]
            return slot(*(args if arity is None else args[:arity]))

        signal.connect(forward)
        return True


def child_widget_variables(widget) -> types.SimpleNamespace:
    root = unwrap(widget)
    found = {w.objectName(): PQ(w) for w in root.findChildren(QtCore.QObject) if w.objectName()}
    return types.SimpleNamespace(**found)


def qt_module() -> types.ModuleType:
    module = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if name.startswith("Q") or name == "Qt":
                setattr(module, name, getattr(source, name))
    return module


def scripted_loadable_module(module_dir: str) -> types.ModuleType:
    """Minimal stand-ins for slicer.ScriptedLoadableModule's base classes."""
    import slicer

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Widget")]
            holder = QtWidgets.QWidget()
            QtWidgets.QVBoxLayout(holder)
            self._holder = holder
            self.parent = PQ(holder)
            self.layout = PQ(holder.layout())

        def resourcePath(self, filename):
            return os.path.join(module_dir, "Resources", filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(self.moduleName)
                slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, *args, **kwargs):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def install(monkeypatch, module_dir: str, temporary_path: str) -> dict:
    """Patch sys.modules and slicer.util for one test; returns the recorders of UI side effects."""
    import slicer

    monkeypatch.setitem(sys.modules, "qt", qt_module())
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted_loadable_module(module_dir))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", None)  # as in a Slicer without it
    records = {"errorDisplay": Recorder(), "setSliceViewerLayers": Recorder()}
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: PQ(load_ui(path)), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", child_widget_variables, raising=False)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", records["errorDisplay"], raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", records["setSliceViewerLayers"], raising=False)

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        yield

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=temporary_path), raising=False)
    return records
