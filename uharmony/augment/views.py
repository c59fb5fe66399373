"""Contrast-keeping augmentation of the domain gate's whole-image view.

The gate must learn *contrast* (which tissue is bright), so it never sees GIN. Without any
augmentation, though, it sees each training case's one fixed 32^3 view on every step and learns
the cases by heart: it then routes a skull-stripped or differently framed scan by anatomy and
framing instead of contrast. These MONAI transforms change what a gate should ignore (position,
size, orientation, field of view, small monotone intensity changes, noise) and keep what it must
use (the order and rough ratios of tissue intensities).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from monai.transforms import (
    Compose,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)


def geometry_jitter() -> Compose:
    """Position, size, orientation and field of view."""
    return Compose([
        RandFlip(prob=0.5, spatial_axis=0),  # left-right
        RandAffine(prob=0.9, rotate_range=(0.35, 0.35, 0.35), scale_range=(0.2, 0.2, 0.2),
                   translate_range=(3, 3, 3), padding_mode="border", mode="bilinear"),
    ])


def intensity_jitter() -> Compose:
    """Small monotone intensity changes: tissue order (what tells T1 from T2 from FLAIR) is kept.

    Only a little: with strong monotone warps too (gamma 0.6-1.7 plus a random histogram shift) the
    brain model's refit gate told T1 from FLAIR in 50 % of held-out heads instead of 88 %, since
    both have dark CSF and differ only in which of grey and white matter is brighter.
    """
    return Compose([
        RandScaleIntensity(factors=0.1, prob=0.5),
        RandShiftIntensity(offsets=0.1, prob=0.5),
    ])


def view_jitter() -> Compose:
    """One sample (C, D, H, W) -> a randomly moved, scaled and re-lit copy of the same size."""
    return Compose([geometry_jitter(), intensity_jitter(), RandGaussianNoise(prob=0.5, std=0.05)])


def jitter_views(views: torch.Tensor, rng: np.random.Generator, jitter: Compose | None = None) -> torch.Tensor:
    """(B, C, D, H, W) gate views -> augmented copies; all randomness from ``rng`` (resumable runs)."""
    jitter = jitter or view_jitter()
    jitter.set_random_state(seed=int(rng.integers(2**31)))
    device = views.device
    out = []
    for v in views:
        t = jitter(v.detach().cpu().float())
        out.append((t.as_tensor() if hasattr(t, "as_tensor") else t).float())  # MetaTensor -> plain tensor
    return torch.stack(out).to(device)


def reframe(image: torch.Tensor, rng: np.random.Generator, max_fraction: float) -> torch.Tensor:
    """(C, D, H, W) full-resolution image -> the same scan framed differently.

    Each of the six sides independently loses (crop) or gains (pad with the image's minimum, i.e.
    air) up to ``max_fraction`` of its axis. Real scans of one contrast come with tight and loose
    fields of view; the gate's 32^3 view stretches the whole image to a cube, so framing changes
    what it sees far more than `geometry_jitter`'s border-padded zoom of the small view does.
    Always draws six values from ``rng``.
    """
    shape = image.shape[1:]
    sides = rng.uniform(-max_fraction, max_fraction, size=(3, 2))
    crop, pad = [], []
    for n, (lo, hi) in zip(shape, sides):
        a, b = int(round(lo * n)), int(round(hi * n))
        crop.append(slice(max(-a, 0), n - max(-b, 0)))
        pad.append((max(a, 0), max(b, 0)))
    out = image[(slice(None), *crop)]
    flat = [v for lo_hi in reversed(pad) for v in lo_hi]  # F.pad wants the last axis first
    return F.pad(out, flat, value=float(image.min())) if any(flat) else out


def framed_views(images: list[torch.Tensor], rng: np.random.Generator, max_fraction: float,
                 downsample) -> torch.Tensor:
    """Full images -> (B, C, *gate size) views, each of a randomly reframed copy (`reframe`)."""
    return torch.cat([downsample(reframe(im, rng, max_fraction)[None]) for im in images])


# The fields of view a reframing-trained gate is asked about at inference (`fov_view`), its answers
# averaged: one scan's framing then moves the routing far less than with a single view.
FOV_VIEWS = (0.8, 0.9, 1.0, 1.15, 1.3)


def fov_view(image: torch.Tensor, scale: float) -> torch.Tensor:
    """(C, D, H, W) -> the centred field of view ``scale`` times as large: a crop (< 1) or air padding (> 1)."""
    if scale == 1:
        return image
    shape = image.shape[1:]
    if scale < 1:
        cut = [int(round(n * (1 - scale) / 2)) for n in shape]
        return image[(slice(None), *(slice(c, n - c) for c, n in zip(cut, shape)))]
    flat = [p for n in reversed(shape) for p in (int(round(n * (scale - 1) / 2)),) * 2]
    return F.pad(image, flat, value=float(image.min()))
