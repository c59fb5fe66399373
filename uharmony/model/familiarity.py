"""Is this input like the model's training domains? A contrast fingerprint against per-domain Gaussians.

The gate's own features are trained to tell the known domains apart, not to notice a new one (on the
starter model a FLAIR-like style scored like T2). The segmentation carries more: once the network has
labelled the image, each tissue's mean and spread of normalised intensity and its volume form a small
"contrast fingerprint" (T1: CSF dark, WM bright; T2: the reverse; FLAIR: CSF dark and GM > WM). Each
domain's fingerprints are modelled by a diagonal Gaussian fitted on its training cases; the score is
the mean squared z-distance to the nearest domain, and the threshold comes from held-back cases of the
known domains. No negatives are needed, so it also suits federation. Models whose card has no such
calibration fall back to the gate-feature score (`DomainGate.unfamiliar_score`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCORE_NAME = "contrast-fingerprint"
MIN_VOXELS = 20
STD_FLOOR = 0.05  # a feature that barely varies in training must not make every input "unfamiliar"


def fingerprint(image: torch.Tensor, labels: torch.Tensor, classes: list[int], voxel_ml: float) -> list[float]:
    """Per channel and class: mean and std of the normalised intensity, and log(1 + volume in mL).

    `image` is (C, ...) normalised on the model grid, `labels` the argmax on the same grid. A class
    with fewer than MIN_VOXELS voxels gives NaN for its intensity features (scored as far away).
    """
    feats: list[float] = []
    for c in classes:
        mask = labels == c
        n = int(mask.sum())
        for ch in range(image.shape[0]):
            if n >= MIN_VOXELS:
                std, mean = torch.std_mean(image[ch][mask].float())
                feats += [float(mean), float(std)]
            else:
                feats += [math.nan, math.nan]
        feats.append(math.log1p(n * voxel_ml))
    return feats


def fit(by_domain: dict[str, list[list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Per-domain mean and std (floored) of fingerprints; NaN features are left out of the fit."""
    out = {}
    for domain, rows in by_domain.items():
        x = np.asarray(rows, dtype=np.float64)
        mean = np.nanmean(x, axis=0)
        std = np.maximum(np.nan_to_num(np.nanstd(x, axis=0, ddof=1), nan=STD_FLOOR), STD_FLOOR)
        out[domain] = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
    return out


def score(features: list[float], calibration: dict[str, dict[str, list[float]]]) -> float:
    """Mean squared z-distance to the nearest domain's Gaussian (NaN features count as z = 10)."""
    x = np.asarray(features, dtype=np.float64)
    best = math.inf
    for stats in calibration.values():
        z = (x - np.asarray(stats["mean"])) / np.asarray(stats["std"])
        z = np.where(np.isfinite(z), z, 10.0)
        best = min(best, float(np.mean(z**2)))
    return best
