"""The extension's CMake: configures (against a stand-in Slicer package), lists every file the
modules need, and bundles a `uharmony` library that works from the installed layout."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from mrml_testing import REPO

STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cmake_stub")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("build")
    done = subprocess.run(["cmake", f"-DSlicer_DIR={STUB}", REPO], cwd=build, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(build / "bundle.txt") as f:
        return [line.strip() for line in f if line.strip()]


def test_every_module_file_is_listed(bundle):
    prefix = "lib/Slicer-5.10/qt-scripted-modules/"
    listed = {entry[len(prefix):] for entry in bundle}
    for module in ("UHarmonySegment", "UHarmonyTrain"):
        root = os.path.join(REPO, module)
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
            rel = os.path.relpath(path, root)
            if os.path.isdir(path) or "__pycache__" in rel or rel == "CMakeLists.txt":
                continue
            assert rel in listed, f"{module}/{rel} is not in {module}/CMakeLists.txt"
    for needed in ("uharmony/__init__.py", "uharmony/__main__.py", "uharmony/cli.py", "uharmony/errors.py",
                   "uharmony/progress.py", "uharmony/model/terminology.py"):
        assert needed in listed
    for card in glob.glob(os.path.join(REPO, "uharmony", "models", "*", "card.json")):
        assert os.path.relpath(card, REPO) in listed
    for weights in glob.glob(os.path.join(REPO, "uharmony", "models", "*", "*.safetensors")):
        assert os.path.relpath(weights, REPO) in listed


def test_installed_layout_finds_its_bundled_library(bundle, tmp_path):
    prefix = "lib/Slicer-5.10/qt-scripted-modules/"
    install = tmp_path / "qt-scripted-modules"
    for entry in bundle:
        rel = entry[len(prefix):]
        src = os.path.join(REPO, rel) if rel.startswith("uharmony") else None
        if src is None:
            for module in ("UHarmonySegment", "UHarmonyTrain"):
                candidate = os.path.join(REPO, module, rel)
                if os.path.exists(candidate):
                    src = candidate
        target = install / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UHARMONY_LIBRARY_PATH")}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from UHarmonySegmentLib.Library import find_library_root; print(find_library_root())")
    done = subprocess.run([sys.executable, "-c", code, str(install)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(install)
    # the bundled package runs from there: its CLI answers
    done = subprocess.run([sys.executable, "-m", "uharmony", "--version"], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(install)}, cwd=tmp_path)
    assert done.returncode == 0 and "uharmony" in done.stdout, done.stderr
