"""Qt-free logic of the UHarmonyTrain module (tested under pytest on slicer-core's real MRML).

`AdaptLogic` and `FederatedLogic` export scene cases (slicer/vtk); `Metrics` is plain Python.
Shares UHarmonySegmentLib's runners, protocol parser, library commands and temporary folders.
"""

from .Metrics import (
    ComparisonRow,
    MetricHistory,
    RoundHistory,
    RoundRow,
    chart_geometry,
)

__all__ = [
    "AdaptLogic", "AdaptRequest", "AdaptResult", "Availability", "ComparisonRow", "FederatedLogic", "JoinRequest",
    "JoinResult", "MetricHistory", "RoundHistory", "RoundRow", "SceneCase", "chart_geometry",
]


def __getattr__(name):  # the logics import slicer/vtk (via UHarmonySegmentLib.Logic): load them on first use
    if name in ("AdaptLogic", "AdaptRequest", "AdaptResult"):
        from . import Adapt as _module
    elif name in ("FederatedLogic", "JoinRequest", "JoinResult", "Availability"):
        from . import Federated as _module
    elif name == "SceneCase":
        from . import Cases as _module
    else:
        raise AttributeError(name)
    return getattr(_module, name)
