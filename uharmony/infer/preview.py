"""A PNG a person can glance at: three orthogonal slices with the segmentation over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uharmony.data.io import Volume, atomic_output
from uharmony.data.preprocess import orientation_to_ras


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    ornt = orientation_to_ras(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    spacing = np.linalg.norm((affine @ nib.orientations.inv_ornt_aff(ornt, array.shape))[:3, :3], axis=0)
    return out, spacing


def save_preview(image: Volume, labels: np.ndarray, classes: list[dict], path: str | Path, title: str = "") -> None:
    """Axial, coronal and sagittal slices through the centre of the segmented structures."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    img, spacing = _to_ras(image.array, image.affine)
    lab, _ = _to_ras(labels, image.affine)
    fg = np.argwhere(lab > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(lab.shape) // 2
    lo, hi = np.percentile(img[:: max(1, img.shape[0] // 64)], [1, 99.5])
    n = max(c["value"] for c in classes) + 1
    colors = np.zeros((n, 4))
    for c in classes:
        if c["value"] > 0:
            colors[c["value"], :3] = c.get("color") or (1.0, 0.0, 0.0)
            colors[c["value"], 3] = 0.45
    cmap = ListedColormap(colors)
    i, j, k = centre
    views = [  # (image slice, label slice, pixel aspect, name); rows = superior/anterior up
        (img[:, :, k].T, lab[:, :, k].T, spacing[1] / spacing[0], "axial"),
        (img[:, j, :].T, lab[:, j, :].T, spacing[2] / spacing[0], "coronal"),
        (img[i, :, :].T, lab[i, :, :].T, spacing[2] / spacing[1], "sagittal"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    for ax, (im, lb, aspect, name) in zip(axes, views):
        ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
        ax.imshow(lb, cmap=cmap, vmin=0, vmax=n - 1, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    # Neurological convention (patient's right on the right); say so on the picture.
    axes[0].text(0.02, 0.02, "L", color="yellow", transform=axes[0].transAxes, fontsize=9)
    axes[0].text(0.95, 0.02, "R", color="yellow", transform=axes[0].transAxes, fontsize=9)
    handles = [Patch(color=colors[c["value"], :3], label=c["name"]) for c in classes if c["value"] > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    if title:
        fig.suptitle(title, color="white")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, facecolor="black", format="png")
    plt.close(fig)
