"""Segmentation losses for datasets that annotate only part of the union label space.

The marginal loss (Shi et al., 2021, "Marginal loss and exclusion loss for partially supervised
multi-organ segmentation"): a dataset that does not annotate class c labels c's voxels as
background, so the network's probability for c is added to background before the loss. Then CE and
Dice see only what the dataset can judge: the merged background and the classes it annotates.
Moving probability between background and an unannotated class therefore never changes the loss,
which is the property DESIGN.md asks a test for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["MarginalDiceCELoss", "merge_unannotated", "normalize_annotated"]


def _check_classes(annotated: Sequence[int], num_classes: int) -> list[int]:
    """Sorted, unique annotated foreground values (0 dropped: background is always implicit)."""
    values = sorted({int(c) for c in annotated} - {0})
    bad = [c for c in values if not 0 < c < num_classes]
    if bad:
        raise ValueError(f"annotated class values {bad} are outside 1..{num_classes - 1}")
    return values


def normalize_annotated(annotated, batch: int, num_classes: int) -> list[list[int]]:
    """One list of annotated class values per sample from ``[1, 2]`` (all samples) or ``[[1, 2], [3]]``."""
    items = list(annotated)
    per_sample = bool(items) and all(isinstance(a, (list, tuple, set, frozenset)) for a in items)
    if items and not per_sample and any(isinstance(a, (list, tuple, set, frozenset)) for a in items):
        raise ValueError("annotated must be a list of class values or one such list per sample, not a mixture")
    if not per_sample:
        return [_check_classes(items, num_classes)] * batch
    if len(items) != batch:
        raise ValueError(f"annotated has {len(items)} per-sample lists for a batch of {batch}")
    return [_check_classes(a, num_classes) for a in items]


def merge_unannotated(probs: torch.Tensor, annotated: Sequence[int]) -> torch.Tensor:
    """Union-space probabilities (B, C, ...) -> (B, 1 + len(annotated), ...).

    Channel 0 is background plus every class not in ``annotated``; then the annotated classes in
    ascending order of value (0 in ``annotated`` is ignored).
    """
    num_classes = probs.shape[1]
    keep = _check_classes(annotated, num_classes)
    merged = [c for c in range(num_classes) if c not in keep]  # includes 0
    bg = probs[:, merged].sum(dim=1, keepdim=True)
    return torch.cat([bg, probs[:, keep]], dim=1)


class MarginalDiceCELoss(nn.Module):
    """Dice + CE on marginal (merged-background) probabilities, per sample's annotated classes.

    ``forward(logits, target, annotated)``: ``logits`` (B, C, ...) over the union label space;
    ``target`` (B, 1, ...) or (B, ...) of union label values; ``annotated`` the class values the
    sample's dataset annotates (one list for the batch, or one per sample). A target value that the
    sample does not annotate is a bug upstream (the datalist maps local to union values) and raises.

    ``absent_dice=False`` (the default) leaves out of a sample's Dice every class absent from its
    target: CE alone judges those. With a tiny smoothing term, the Dice of an absent class is ~1 for
    any non-negligible probability and drops to 0 only when the class's summed probability over the
    patch falls below the smoothing, so patches without a small class (lesion) reward driving its
    logits far down everywhere, and the class is never learned. ``absent_dice=True`` keeps them (then,
    with every class annotated, the loss equals MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True)``).

    CE is averaged over voxels, Dice over (sample, channel) pairs. In a mixed batch each sample's Dice
    is averaged over its own channels first, then over samples, so a sample with few annotated
    classes weighs as much as one with many. Computed in fp32 (AMP-safe).
    """

    def __init__(self, num_classes: int, dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1e-5,
                 absent_dice: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2 (background and at least one class)")
        self.num_classes = int(num_classes)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.absent_dice = bool(absent_dice)
        # MONAI's DiceLoss on the merged probabilities, unreduced so that channels a sample does not
        # annotate (kept at zero in the union layout) can be left out of its mean.
        self.dice = DiceLoss(include_background=True, softmax=False, to_onehot_y=False, reduction="none",
                             smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated) -> torch.Tensor:
        b, c = logits.shape[:2]
        if c != self.num_classes:
            raise ValueError(f"logits have {c} channels, the loss was built for {self.num_classes} classes")
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape[0] != b or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        per_sample = normalize_annotated(annotated, b, c)
        device = logits.device
        # kept[b, c]: class c is its own channel for sample b (background always is).
        kept = torch.zeros(b, c, dtype=torch.bool)
        kept[:, 0] = True
        for i, values in enumerate(per_sample):
            kept[i, values] = True
        kept = kept.to(device)
        merge = ~kept
        merge[:, 0] = True  # the merged background: 0 and every unannotated class
        view = (b, c) + (1,) * (logits.ndim - 2)

        target = target.long()
        in_range = (target >= 0) & (target < c)
        labelled = kept.gather(1, target.clamp(0, c - 1).flatten(1)).view_as(target) & in_range
        if not bool(labelled.all()):  # one device sync per call
            if not bool(in_range.all()):
                raise ValueError(f"target values must lie in 0..{c - 1}")
            raise ValueError("target holds a class value that its sample does not annotate")

        with _no_autocast(device):
            x = logits.float()
            log_p = F.log_softmax(x, dim=1)
            # log P(merged background) = logsumexp over its logits - logsumexp over all: stable even
            # when every merged probability underflows in fp32.
            log_bg = torch.logsumexp(x.masked_fill(~merge.view(view), float("-inf")), dim=1, keepdim=True) \
                - torch.logsumexp(x, dim=1, keepdim=True)
            log_merged = torch.cat([log_bg, log_p[:, 1:]], dim=1)
            ce = F.nll_loss(log_merged, target[:, 0], reduction="mean")

            probs = log_merged.exp() * kept.view(view)  # unannotated channels -> 0 (they are in background)
            onehot = torch.zeros_like(probs).scatter_(1, target, 1.0)  # no int64 (B, ..., C) temporary
            dice = self.dice(probs, onehot).reshape(b, c)
            judged = kept if self.absent_dice else kept & (onehot.flatten(2).amax(2) > 0)
            dice = ((dice * judged).sum(1) / judged.sum(1).clamp_min(1)).mean()
        return self.dice_weight * dice + self.ce_weight * ce


def _no_autocast(device: torch.device):
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
