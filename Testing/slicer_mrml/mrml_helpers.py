"""Independent geometry checks on MRML segmentations (numpy only; no code shared with the logic)."""

from __future__ import annotations

import numpy as np


def tertile_labels(array: np.ndarray) -> np.ndarray:
    """What fake_uharmony computes, recomputed here from the input array."""
    a = array.astype(np.float32)
    fg = a > 0
    t1, t2 = np.quantile(a[fg], [1 / 3, 2 / 3])
    out = np.zeros(a.shape, np.uint8)
    out[fg & (a <= t1)] = 1
    out[fg & (a > t1) & (a <= t2)] = 2
    out[fg & (a > t2)] = 3
    return out


def ras_centroid_from_kji(mask: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Centroid in RAS of a (k, j, i) mask under a 4x4 IJK->RAS matrix."""
    k, j, i = np.nonzero(mask)
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (ijk_to_ras @ ijk1)[:3].mean(axis=1)


def segment_ras_centroid(segmentation_node, segment_id: str):
    """Centroid (RAS) and voxel count of a segment, from its own binary labelmap representation."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    assert segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    mask = scalars > 0
    if not mask.any():
        return None, 0
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    matrix = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    k, j, i = np.nonzero(mask)
    ijk1 = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    return (matrix @ ijk1)[:3].mean(axis=1), int(mask.sum())
