"""The contrast fingerprint behind the unfamiliar-input flag."""

import math

import numpy as np
import torch

from uharmony.model import familiarity


def _image_and_labels(csf, grey, white, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(20, 20, 20, dtype=torch.long)
    labels[2:8], labels[8:14], labels[14:18] = 1, 2, 3
    means = torch.tensor([0.0, csf, grey, white])
    image = means[labels] + 0.1 * torch.randn(20, 20, 20, generator=g)
    return image[None], labels


def test_fingerprint_measures_each_tissue():
    image, labels = _image_and_labels(-1.0, 0.0, 1.0)
    f = familiarity.fingerprint(image, labels, [1, 2, 3], voxel_ml=0.008)
    assert len(f) == 9
    assert [round(v, 1) for v in f[0::3]] == [-1.0, 0.0, 1.0]  # means
    assert all(0.05 < s < 0.15 for s in f[1::3])  # stds
    assert f[2] == math.log1p(6 * 400 * 0.008)  # log(1 + mL)
    missing = familiarity.fingerprint(image, torch.zeros_like(labels), [1], voxel_ml=0.008)
    assert math.isnan(missing[0]) and math.isnan(missing[1]) and missing[2] == 0.0


def test_a_reversed_contrast_scores_far_from_every_domain():
    t1 = [familiarity.fingerprint(*_image_and_labels(-1.2, 0.0, 1.1, s), [1, 2, 3], 0.008) for s in range(8)]
    t2 = [familiarity.fingerprint(*_image_and_labels(1.8, 0.5, -0.3, s), [1, 2, 3], 0.008) for s in range(8)]
    cal = familiarity.fit({"t1": t1, "t2": t2})
    assert all(min(cal[d]["std"]) >= familiarity.STD_FLOOR for d in cal)
    near = familiarity.score(familiarity.fingerprint(*_image_and_labels(-1.2, 0.0, 1.1, 99), [1, 2, 3], 0.008), cal)
    flair = familiarity.score(familiarity.fingerprint(*_image_and_labels(-1.0, 0.7, 0.2, 99), [1, 2, 3], 0.008), cal)
    assert near < 2.0 < 20.0 < flair
    nan_row = [math.nan] * 9
    assert familiarity.score(nan_row, cal) == 100.0  # every feature counts as z = 10
    assert np.isfinite(familiarity.score(t1[0], cal))
