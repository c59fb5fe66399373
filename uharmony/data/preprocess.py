"""From an input grid to the model's grid and back, and the one input normalisation.

The model grid keeps the input's own (possibly oblique) direction: the axes are only permuted and
flipped to the nearest RAS order (exact, no interpolation), then resampled once to the model
spacing. Going back is the exact inverse: one resampling of the logits onto the RAS-ordered input
grid, then the inverse permutation. Both resamplings are `torch.nn.functional.interpolate` with
``align_corners=False``, which maps voxel edges onto voxel edges; the affines below follow the same
convention, so world coordinates are preserved to floating-point precision, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from torch.nn import functional as F

DEFAULT_NORMALIZATION = {"rule": "foreground-zscore", "lower_percentile": 0.5, "upper_percentile": 99.5,
                         "foreground_fraction": 0.1}
_QUANTILE_SAMPLES = 1 << 20  # torch.quantile is limited to 16M elements; a fixed stride sample suffices


@dataclass
class GridMapping:
    """How an input grid maps onto the model grid, for the exact way back."""

    input_shape: tuple[int, int, int]
    ornt: np.ndarray  # nibabel orientation: input axis -> RAS axis and flip
    ras_shape: tuple[int, int, int]
    ras_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray


def orientation_to_ras(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.io_orientation(affine)


def apply_ornt(t: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """Permute/flip the last three axes of `t` as nibabel's apply_orientation would."""
    lead = t.ndim - 3
    t = t.permute(*range(lead), *(lead + int(i) for i in np.argsort(ornt[:, 0])))
    # After the permutation, output axis a comes from input axis with ornt[:,0] == a.
    flips = [lead + a for a in range(3) if ornt[np.argsort(ornt[:, 0])[a], 1] < 0]
    return t.flip(flips) if flips else t


def invert_ornt(t: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """The inverse of `apply_ornt`: from RAS order back to the input's axis order."""
    lead = t.ndim - 3
    order = np.argsort(ornt[:, 0])
    flips = [lead + a for a in range(3) if ornt[order[a], 1] < 0]
    t = t.flip(flips) if flips else t
    # output axis a holds input axis order[a]; invert that permutation
    return t.permute(*range(lead), *(lead + int(a) for a in np.argsort(order)))


def resampled_affine(affine: np.ndarray, old_shape, new_shape) -> np.ndarray:
    """Affine of a grid resampled edge-to-edge from `old_shape` to `new_shape` (align_corners=False)."""
    scale = np.asarray(old_shape, float) / np.asarray(new_shape, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = 0.5 * scale - 0.5
    return affine @ m


def plan_grid(input_shape, affine: np.ndarray, spacing_mm) -> GridMapping:
    ornt = orientation_to_ras(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, input_shape)
    ras_shape = tuple(int(input_shape[int(i)]) for i in np.argsort(ornt[:, 0]))
    ras_spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    model_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(ras_shape, ras_spacing, spacing_mm))
    model_affine = resampled_affine(ras_affine, ras_shape, model_shape)
    return GridMapping(tuple(int(s) for s in input_shape), ornt, ras_shape, ras_affine, model_shape, model_affine)


def to_model_grid(image: torch.Tensor, grid: GridMapping) -> torch.Tensor:
    """(C, I, J, K) input-grid tensor -> (C, *model_shape) in RAS order at the model spacing."""
    t = apply_ornt(image, grid.ornt)
    if tuple(t.shape[-3:]) != grid.model_shape:
        t = F.interpolate(t[None].float(), size=grid.model_shape, mode="trilinear", align_corners=False)[0]
    return t


def from_model_grid(values: torch.Tensor, grid: GridMapping) -> torch.Tensor:
    """(C, *model_shape) -> (C, I, J, K) on the input grid (logits or probabilities, linear)."""
    t = values
    if tuple(t.shape[-3:]) != grid.ras_shape:
        t = F.interpolate(t[None], size=grid.ras_shape, mode="trilinear", align_corners=False)[0]
    return invert_ornt(t, grid.ornt)


def normalize_intensity(image: torch.Tensor, rule: dict | None = None) -> torch.Tensor:
    """The one domain-agnostic rule, per channel: clip to the foreground's percentiles, z-score it.

    Foreground = voxels above lo + fraction*(hi - lo) of the whole image's robust range, which
    separates air from tissue both for MRI (background ~0) and CT (air ~-1000 HU). It is computed
    from the image alone, so it is known before the gate has chosen a domain.
    """
    rule = {**DEFAULT_NORMALIZATION, **(rule or {})}
    if rule["rule"] != "foreground-zscore":
        raise ValueError(f"unknown normalisation rule {rule['rule']!r}")
    lo_q, hi_q = rule["lower_percentile"] / 100.0, rule["upper_percentile"] / 100.0
    out = torch.empty_like(image, dtype=torch.float32)
    for c in range(image.shape[0]):
        x = image[c].float()
        sample = _sample(x)
        lo, hi = torch.quantile(sample, torch.tensor([lo_q, hi_q], device=x.device)).tolist()
        fg_sample = sample[sample > lo + rule["foreground_fraction"] * (hi - lo)]
        if fg_sample.numel() < 16:
            fg_sample = sample
        flo, fhi = torch.quantile(fg_sample, torch.tensor([lo_q, hi_q], device=x.device)).tolist()
        xc = x.clamp(flo, fhi)
        fg = xc[x > lo + rule["foreground_fraction"] * (hi - lo)]
        if fg.numel() < 16:
            fg = xc.reshape(-1)
        std, mean = torch.std_mean(fg)
        out[c] = (xc - mean) / std.clamp_min(1e-6)
    return out


def _sample(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    step = max(1, flat.numel() // _QUANTILE_SAMPLES)
    return flat[::step]
