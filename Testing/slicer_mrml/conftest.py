"""Fixtures for the Slicer-side tests on slicer-core's real MRML (no Slicer application here).

slicer-core gives vtkMRMLScene, storage nodes, segmentations and most of slicer/util.py; it lacks
slicer.app, loadVolume, launchConsoleProcess, ScriptedLoadableModule and parameterNodeWrapper, so
these tests drive the Qt-free logic (UHarmonySegmentLib) directly. Helpers: mrml_testing.py.
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from mrml_testing import HERE as _HERE  # noqa: E402,F401  (puts the repository and the module on sys.path)


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer")
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    yield s
    s.Clear(True)


@pytest.fixture
def fake_environment(tmp_path):
    """Environment that makes `-m fake_uharmony` importable in the child."""
    return {"PYTHONPATH": HERE, "FAKE_UHARMONY_PIDFILE": str(tmp_path / "worker.pid")}
