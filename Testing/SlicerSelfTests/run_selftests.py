"""Runs the UHarmony modules' self-tests inside 3D Slicer and exits with their verdict.

    Slicer --no-main-window --python-script Testing/SlicerSelfTests/run_selftests.py
    Slicer --no-main-window --python-script Testing/SlicerSelfTests/run_selftests.py UHarmonySegmentTest.test_CancelRemovesTempFiles

Exit code 0 when every test passed, 1 when one failed, 2 when the run could not start (not inside
Slicer, modules not loadable). The modules are loaded from this source tree when they are not
already loaded (no need to add module paths first). The segment tests run the real library, so
Slicer's Python needs torch and the library's packages (the module's "Install..." button); so do the
train tests (UHarmonyTrainTest: adapting the bundled model to three synthetic cases in a few steps, on a
temporary model folder, cancel, and the Federated tab's state).
CI cannot run this file: Slicer cannot be downloaded there (see docs/slicer.md).
"""

import os
import sys
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0]))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULES = ["UHarmonySegment", "UHarmonyTrain"]  # dependency order


def _exit(code):
    """Leave Slicer with `code` (slicer.util.exit), or the plain interpreter."""
    try:
        import slicer
    except ImportError:
        slicer = None
    if slicer is not None and hasattr(slicer, "app"):
        slicer.util.exit(code)
    else:
        sys.exit(code)


def ensure_modules_loaded():
    import qt
    import slicer

    factory = slicer.app.moduleManager().factoryManager()
    loaded = set(factory.instantiatedModuleNames())
    for name in MODULES:
        folder = os.path.join(REPO, name)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        if name in loaded:
            continue
        factory.registerModule(qt.QFileInfo(os.path.join(folder, f"{name}.py")))
        if not factory.isRegistered(name):
            raise RuntimeError(f"{name} could not be registered from {folder}")
        if not factory.loadModules([name]):
            raise RuntimeError(f"{name} could not be loaded")


def build_suite(selection):
    import importlib

    suite = unittest.TestSuite()
    for name in MODULES:
        cls = getattr(importlib.import_module(name), f"{name}Test")
        for method in sorted(m for m in dir(cls) if m.startswith("test_")):
            wanted = not selection or any(s in (cls.__name__, f"{cls.__name__}.{method}", method) for s in selection)
            if wanted:
                suite.addTest(cls(method))
    return suite


def main():
    try:
        import slicer

        if not hasattr(slicer, "app"):
            print("run_selftests.py must run inside 3D Slicer: Slicer --no-main-window --python-script ...",
                  file=sys.stderr)
            return 2
        ensure_modules_loaded()
        suite = build_suite([a for a in sys.argv[1:] if not a.startswith("-")])
    except Exception:
        traceback.print_exc()
        return 2
    if suite.countTestCases() == 0:
        print("no test matched", file=sys.stderr)
        return 2
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    print(f"UHarmony self-tests: {result.testsRun} run, {len(result.failures)} failed, {len(result.errors)} errors")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    _exit(main())
