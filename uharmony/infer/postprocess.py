"""Clean-up of the label map on the input grid, as the model card asks for it.

`min_component_ml`: connected components (26-connected) of a class smaller than a volume are given
to each voxel's next most likely class. The default brain model uses it for its lesion class, whose
false positives on lesion-free real brains are scattered specks (docs/model.md).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def drop_small_components(scores: torch.Tensor, labels: torch.Tensor, min_voxels: dict[int, int]) -> dict[int, int]:
    """Relabel, in place, the components of each class in ``min_voxels`` with fewer voxels than its floor.

    ``scores`` (C, ...) are the per-class scores whose argmax gave ``labels`` (...); a dropped voxel takes
    the argmax over the classes other than its own. One pass: every class's pieces are measured on the
    labels as given, so a voxel given to another cleaned class is not measured again. Returns the voxels
    relabelled per class. scipy labels the components (MONAI's RemoveSmallObjects needs scikit-image
    and gives no next-best class).
    """
    drops: dict[int, torch.Tensor] = {}  # measured first, relabelled after: one pass
    for value, floor in min_voxels.items():
        mask = (labels == value).cpu().numpy()
        if floor > 1 and mask.any():
            components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
            small = np.bincount(components.ravel()) < floor
            small[0] = False
            drops[value] = torch.from_numpy(small[components]).to(labels.device)
    removed = dict.fromkeys(min_voxels, 0)
    for value, drop in drops.items():
        removed[value] = int(drop.sum())
        if removed[value]:
            others = scores[:, drop].clone()
            others[value] = -torch.inf
            labels[drop] = others.argmax(0).to(labels.dtype)
    return removed
