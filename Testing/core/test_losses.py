"""The marginal partial-label loss (DESIGN.md, "Partial labels")."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from uharmony.train.losses import MarginalDiceCELoss, merge_unannotated

C = 4  # background + 3 classes
SHAPE = (8, 8, 8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(b=2, seed=0, scale=2.0, dtype=torch.float32):
    return (torch.randn((b, C, *SHAPE), generator=_gen(seed)) * scale).to(dtype)


def _target(b=2, values=(0, 1, 2, 3), seed=1):
    pick = torch.randint(len(values), (b, 1, *SHAPE), generator=_gen(seed))
    return torch.tensor(values)[pick]


def test_merge_unannotated():
    probs = torch.softmax(_logits(), dim=1)
    merged = merge_unannotated(probs, [3, 1])
    assert merged.shape == (2, 3, *SHAPE)
    torch.testing.assert_close(merged[:, 0], probs[:, 0] + probs[:, 2])
    torch.testing.assert_close(merged[:, 1], probs[:, 1])  # ascending order of value
    torch.testing.assert_close(merged[:, 2], probs[:, 3])
    torch.testing.assert_close(merged.sum(1), torch.ones(2, *SHAPE))
    torch.testing.assert_close(merge_unannotated(probs, [0, 1, 2, 3]), probs)  # 0 is implicit
    with pytest.raises(ValueError):
        merge_unannotated(probs, [4])


@pytest.mark.parametrize("target_shape", ["B1", "B"])
def test_fully_annotated_equals_monai_dice_ce(target_shape):
    logits, target = _logits(), _target()
    expected = DiceCELoss(softmax=True, to_onehot_y=True)(logits, target)
    t = target if target_shape == "B1" else target[:, 0]
    got = MarginalDiceCELoss(C)(logits, t, [1, 2, 3])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    per_sample = MarginalDiceCELoss(C)(logits, t, [[1, 2, 3], [3, 2, 1]])
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-6)


def test_absent_class_leaves_dice_to_ce():
    """A class missing from a sample's target is judged by CE alone (absent_dice=False, the default).

    With MONAI's rule (absent_dice=True) its Dice is ~1 until its summed probability falls below the
    1e-5 smoothing, so driving it far down everywhere pays 1/C of the Dice: the reward that kept the
    brain model from ever predicting lesion.
    """
    target = _target(values=(0, 1, 2))  # class 3 absent from both samples
    base = _logits()
    low, very_low = base.clone(), base.clone()
    low[:, 3], very_low[:, 3] = -8.0, -40.0  # probability of class 3 ~1e-4 per voxel, then ~0

    def dice(absent_dice, logits):
        return MarginalDiceCELoss(C, ce_weight=0.0, absent_dice=absent_dice)(logits, target, [1, 2, 3])

    reward = dice(True, low) - dice(True, very_low)
    assert reward > 0.2  # ~1/C: the pathology
    assert abs(float(dice(False, low) - dice(False, very_low))) < 1e-3
    # the default is MONAI's Dice over the present channels only
    from monai.losses import DiceLoss
    probs = torch.softmax(base, 1)
    onehot = torch.nn.functional.one_hot(target[:, 0], C).permute(0, 4, 1, 2, 3).float()
    per = DiceLoss(reduction="none")(probs, onehot).reshape(2, C)
    torch.testing.assert_close(dice(False, base), per[:, :3].mean(), rtol=1e-5, atol=1e-6)
    # with every class present, both rules agree
    full = _target()
    torch.testing.assert_close(MarginalDiceCELoss(C)(base, full, [1, 2, 3]),
                               MarginalDiceCELoss(C, absent_dice=True)(base, full, [1, 2, 3]))


def test_weights():
    logits, target = _logits(), _target()
    dice = MarginalDiceCELoss(C, dice_weight=1.0, ce_weight=0.0)(logits, target, [1, 2, 3])
    ce = MarginalDiceCELoss(C, dice_weight=0.0, ce_weight=1.0)(logits, target, [1, 2, 3])
    both = MarginalDiceCELoss(C, dice_weight=0.5, ce_weight=2.0)(logits, target, [1, 2, 3])
    torch.testing.assert_close(both, 0.5 * dice + 2.0 * ce)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, target[:, 0]))


def _moved(logits, frm, to, seed=5):
    """Logits whose softmax moves a random share of class `frm`'s probability onto class `to`."""
    p = torch.softmax(logits.double(), dim=1)
    share = torch.rand(p[:, frm].shape, generator=_gen(seed), dtype=torch.float64)
    q = p.clone()
    q[:, frm] = p[:, frm] * (1 - share)
    q[:, to] = p[:, to] + p[:, frm] * share
    return q.log().to(logits.dtype), q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moving_mass_between_background_and_unannotated_class_leaves_loss_unchanged(dtype):
    logits = _logits(dtype=dtype)
    target = _target(values=(0, 1, 3))  # this dataset annotates 1 and 3, not 2
    loss = MarginalDiceCELoss(C)
    base = loss(logits, target, [1, 3])
    for frm, to in ((0, 2), (2, 0)):
        moved, q = _moved(logits, frm, to)
        p = torch.softmax(logits.double(), 1)
        torch.testing.assert_close(q[:, 0] + q[:, 2], p[:, 0] + p[:, 2])  # the premise of the test
        torch.testing.assert_close(q[:, [1, 3]], p[:, [1, 3]])
        assert abs(float(loss(moved, target, [1, 3]) - base)) < 1e-5
    # ... while moving mass between background and an annotated class changes it.
    for frm, to in ((0, 1), (0, 3), (3, 0)):
        moved, _ = _moved(logits, frm, to)
        assert abs(float(loss(moved, target, [1, 3]) - base)) > 1e-3
    # And a fully-annotated loss does see the move to class 2 (the property is the merge, not luck).
    full_target = _target(values=(0, 1, 2, 3))
    moved, _ = _moved(logits, 0, 2)
    assert abs(float(loss(moved, full_target, [1, 2, 3]) - loss(logits, full_target, [1, 2, 3]))) > 1e-3


def test_mixed_batch_matches_per_sample_marginal_losses():
    logits = _logits(b=2, seed=3)
    target = torch.cat([_target(b=1, values=(0, 1, 2, 3), seed=4), _target(b=1, values=(0, 2), seed=6)])
    annotated = [[1, 2, 3], [2]]
    got = MarginalDiceCELoss(C)(logits, target, annotated)
    # Independent reference: MONAI's DiceCELoss on the log of each sample's merged probabilities.
    ref = []
    for i, keep in enumerate(annotated):
        merged = merge_unannotated(torch.softmax(logits[i:i + 1], 1), keep)
        local = torch.zeros_like(target[i:i + 1])
        for j, value in enumerate(keep, start=1):
            local[target[i:i + 1] == value] = j
        ref.append(DiceCELoss(softmax=True, to_onehot_y=True)(merged.log(), local))
    torch.testing.assert_close(got, torch.stack(ref).mean(), rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_even_for_extreme_logits():
    logits = (_logits(scale=80.0)).requires_grad_(True)
    target = _target(values=(0, 2))
    loss = MarginalDiceCELoss(C)(logits, target, [[2], [1, 2]])
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # The unannotated classes still receive gradient through the merged background.
    assert logits.grad[0, 3].abs().sum() > 0


def test_bf16_logits_under_autocast_give_fp32_loss():
    logits = _logits().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MarginalDiceCELoss(C)(logits, _target(), [1, 2, 3])
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_refuses_inconsistent_inputs():
    loss = MarginalDiceCELoss(C)
    logits = _logits()
    with pytest.raises(ValueError, match="does not annotate"):
        loss(logits, _target(values=(0, 2)), [1, 3])
    with pytest.raises(ValueError, match="0..3"):
        loss(logits, _target(values=(0, 4)), [1, 2, 3])
    with pytest.raises(ValueError, match="per-sample"):
        loss(logits, _target(), [[1, 2, 3]])
    with pytest.raises(ValueError, match="outside"):
        loss(logits, _target(), [1, 5])
    with pytest.raises(ValueError, match="channels"):
        MarginalDiceCELoss(3)(logits, _target(), [1, 2])
    with pytest.raises(ValueError, match="shape"):
        loss(logits, _target()[:, :, :4], [1, 2, 3])
