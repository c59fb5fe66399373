"""Qt-free logic of the UHarmonySegment module (tested under pytest on slicer-core's real MRML).

`SegmentLogic` needs `slicer` (MRML) and `vtk`; everything else here is plain Python.
"""

from .JsonLines import ProgressParser, overall_fraction
from .Library import CommandError, LibraryCommands, exit_code_text, find_library_root
from .Presentation import device_choices, model_choices, summarize_report
from .ProcessRunner import ProcessRunner, QtProcessRunner, SubprocessRunner
from .Signal import Signal

__all__ = [
    "CommandError", "LibraryCommands", "ProcessRunner", "ProgressParser", "QtProcessRunner", "SegmentError",
    "SegmentLogic", "SegmentResult", "SegmentTask", "Signal", "SubprocessRunner", "device_choices",
    "exit_code_text", "find_library_root", "model_choices", "overall_fraction", "summarize_report",
]


def __getattr__(name):  # SegmentLogic imports slicer/vtk: load it on first use only
    if name in ("SegmentLogic", "SegmentResult", "SegmentTask", "SegmentError"):
        from . import Logic as _module

        return getattr(_module, name)
    raise AttributeError(name)
