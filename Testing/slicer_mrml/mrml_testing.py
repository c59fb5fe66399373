"""Helpers of the Slicer-side tests (volumes with chosen geometry, phantoms, library readiness).

A module with its own name, not conftest.py: several conftest.py files exist under Testing/ and only
one of them can be the importable `conftest`. (This folder is not named `slicer` either: slicer-core's
`slicer` package adds every `slicer` folder found on sys.path to itself and imports its files.)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # Qt-based tests need no display

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (REPO, os.path.join(REPO, "UHarmonySegment")):
    if path not in sys.path:
        sys.path.insert(0, path)


def oblique_flipped_matrix(spacing=(2.0, 2.2, 2.5), origin=(12.0, -30.0, 8.0)):
    """IJK->RAS with a rotation about two axes and a flipped (negative) axis: a det < 0 frame."""
    a, b = math.radians(20), math.radians(-15)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    flip = np.diag([-1.0, 1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ flip @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def phantom(shape=(36, 40, 44), seed=3):
    """A (k, j, i) int16 volume: a bright off-centre ball in a dimmer ellipsoid, noise, zero outside."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    c = np.array(shape) / 2.0
    body = ((k - c[0]) / (shape[0] * 0.42)) ** 2 + ((j - c[1]) / (shape[1] * 0.42)) ** 2 + ((i - c[2]) / (shape[2] * 0.42)) ** 2 < 1
    ball = (k - 12) ** 2 + (j - 25) ** 2 + (i - 14) ** 2 < 6 ** 2
    arr = np.where(body, 300.0, 0.0) + np.where(ball, 600.0, 0.0)
    arr += np.where(body, rng.normal(0, 20, shape), 0.0)
    return arr.astype(np.int16)


def add_volume(scene, array, matrix, name="scan"):
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for col in range(4):
            m.SetElement(r, col, float(matrix[r, col]))
    node.SetIJKToRASMatrix(m)
    return node


def ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def library_ready() -> tuple[bool, str]:
    """Whether the real `python -m uharmony segment` can run (CLI + a usable bundled model)."""
    try:
        done = subprocess.run([sys.executable, "-m", "uharmony", "models", "list", "--json"], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": REPO})
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"the uharmony CLI cannot run: {exc}"
    if done.returncode != 0:
        return False, f"'uharmony models list' failed: {done.stderr.strip().splitlines()[-1:]}"
    import json

    try:
        models = json.loads(done.stdout)
    except ValueError:
        return False, "'uharmony models list --json' printed no JSON"
    if not any(m.get("bundled") and not m.get("problem") for m in models):
        return False, "the bundled model (uharmony/models/starter) is not there yet"
    return True, ""
