"""Training data: datalists checked together, cases put on the model grid once and kept in memory,
domain-balanced case choice and foreground-oversampled patches, all drawn from a given RNG.

Caching is a plain Python list of tensors, not MONAI's CacheDataset: the preprocessing must be the
exact function calls of inference (`plan_grid`, `to_model_grid`, `normalize_intensity` of
`uharmony.data.preprocess`), which a MONAI transform chain would re-implement, and sampling must
be a pure function of an RNG seeded from ``(seed, step)`` for exact resumes, which a DataLoader
with workers and its own RNG would not give. Cases at the model spacing are small (a 2 mm head is
~1 M voxels, 4 MB), so memory is not the limit; the 2-core machines gain nothing from workers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.nn import functional as F

from uharmony.data.datalist import Case, Dataset, check_compatible, load_datalist
from uharmony.data.io import read_volume
from uharmony.data.preprocess import DEFAULT_NORMALIZATION, apply_ornt, normalize_intensity, plan_grid, to_model_grid
from uharmony.errors import BadDatalistError, BadInputError


@dataclass
class Prepared:
    """One case on the model grid: normalised image (C, ...), union labels (1, ...), gate view."""

    image: torch.Tensor
    labels: torch.Tensor | None  # uint8 union values
    small: torch.Tensor  # (C, *gate_input_size): the gate's un-augmented low-resolution view
    domain: str
    dataset: str
    annotated: list[int]  # union values this case's dataset annotates (foreground)
    source: str  # the first image file, for messages
    fg: torch.Tensor | None = field(default=None, repr=False)  # (N, 3) foreground voxel indices
    fg_by_class: list[torch.Tensor] | None = field(default=None, repr=False)  # the same, per class (lazily)


def load_datasets(paths: list[str | os.PathLike], *, require_labels: bool = True) -> list[Dataset]:
    """Load every datalist; report all problems of all of them at once (exit 5), then check them together."""
    datasets, problems = [], []
    for p in paths:
        try:
            datasets.append(load_datalist(p, require_labels=require_labels))
        except BadDatalistError as e:
            problems += getattr(e, "problems", None) or [str(e)]
    if problems:
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the datalists"
        raise BadDatalistError.listing(head, problems)
    check_compatible(datasets)
    return datasets


def datalist_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_label_array(path: str | os.PathLike) -> np.ndarray:
    """A label map's voxels in (i, j, k) order (a map of background only is allowed, unlike images)."""
    p = os.fspath(path)
    try:
        if p.lower().endswith((".nii", ".nii.gz")):
            data = np.asanyarray(nib.load(p).dataobj)
        else:
            import SimpleITK as sitk

            data = sitk.GetArrayFromImage(sitk.ReadImage(p)).T
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - nibabel/ITK/gzip raise many kinds for a bad file
        raise BadInputError(f"cannot be read ({' '.join(str(e).split())[:160]})", p) from None
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.rint(data).astype(np.int64)


def prepare_case(case: Case, spacing_mm, label_map: dict[int, int] | None, annotated: list[int],
                 gate_view, normalization: dict | None = None) -> Prepared:
    """Read a case and put it on the model grid exactly as `uharmony segment` does with its input.

    ``gate_view``: the model's ``gate.downsample`` (the gate's whole-image view, computed once here), or
    a size (D, H, W) for the same trilinear resize without a model.
    """
    volumes = [read_volume(p) for p in case.image]
    ref = volumes[0]
    grid = plan_grid(ref.shape, ref.affine, spacing_mm)
    image = torch.from_numpy(np.stack([v.array for v in volumes]).astype(np.float32, copy=False))
    x = normalize_intensity(to_model_grid(image, grid), normalization or DEFAULT_NORMALIZATION)
    labels = fg = None
    if case.label is not None and label_map is not None:
        raw = read_label_array(case.label)
        lut = np.zeros(max(label_map) + 1, np.uint8)
        for local, union in label_map.items():
            lut[local] = union
        t = torch.from_numpy(lut[raw])[None]  # (1, I, J, K) union values
        t = apply_ornt(t, grid.ornt)
        if tuple(t.shape[-3:]) != grid.model_shape:  # nearest, on the same edge-to-edge geometry as the image
            t = F.interpolate(t[None].float(), size=grid.model_shape, mode="nearest-exact")[0]
        labels = t.to(torch.uint8).contiguous()
        fg = torch.nonzero(labels[0] > 0)
    if callable(gate_view):
        small = gate_view(x[None])[0]
    else:
        small = F.interpolate(x[None], size=tuple(gate_view), mode="trilinear", align_corners=False)[0]
    return Prepared(image=x.contiguous(), labels=labels, small=small, domain=case.domain, dataset=case.dataset,
                    annotated=list(annotated), source=str(case.image[0]), fg=fg)


def _class_voxels(item: Prepared) -> list[torch.Tensor]:
    """The foreground voxel indices of each class present in the case (computed once, kept on the item)."""
    if item.fg_by_class is None:
        values = item.labels[0][tuple(item.fg.T)]
        item.fg_by_class = [item.fg[values == v] for v in torch.unique(values)]
    return item.fg_by_class


def random_patch(item: Prepared, rng: np.random.Generator, size, fg_prob: float,
                 class_balance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch centred on a random foreground voxel (with probability fg_prob) or anywhere.

    ``class_balance``: the foreground centre is a voxel of a class drawn uniformly among the classes
    present in the case, so a small class (lesion) is centred as often as a large one (white matter).
    Out-of-volume parts are filled with the image's minimum and label 0 (as sliding-window
    inference pads). Always draws the same number of values from `rng`, whatever the case.
    """
    image, labels = item.image, item.labels
    shape = np.array(image.shape[1:])
    size = np.array(size)
    u_fg, u_pick = rng.random(), rng.random()
    u_anywhere = rng.random(3)
    u_class = rng.random() if class_balance else 0.0
    if u_fg < fg_prob and item.fg is not None and len(item.fg):
        pool = item.fg
        if class_balance:
            by_class = _class_voxels(item)
            pool = by_class[min(int(u_class * len(by_class)), len(by_class) - 1)]
        centre = pool[min(int(u_pick * len(pool)), len(pool) - 1)].numpy()
    else:
        centre = np.minimum((u_anywhere * shape).astype(int), shape - 1)
    start = centre - size // 2
    out_i = torch.full((image.shape[0], *size), float(image.min()))
    out_l = torch.zeros((1, *size), dtype=torch.uint8)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    s = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi))
    d = tuple(slice(int(a), int(b)) for a, b in zip(dst_lo, dst_hi))
    out_i[(slice(None), *d)] = image[(slice(None), *s)]
    if labels is not None:
        out_l[(slice(None), *d)] = labels[(slice(None), *s)]
    return out_i, out_l


class BalancedSampler:
    """Draws (case) indices: a group uniformly, a domain of it uniformly, then a case of that domain.

    `uharmony train` has one group per domain (every domain equally often); `uharmony adapt` has two
    groups, the new data and the replayed (``--keep``) data, so each is half of every batch on average.
    """

    def __init__(self, groups: list[dict[str, list[int]]]):
        self.groups = [{d: list(ix) for d, ix in g.items() if ix} for g in groups]
        self.groups = [g for g in self.groups if g]
        if not self.groups:
            raise BadDatalistError("no training cases")

    def draw(self, rng: np.random.Generator) -> int:
        u = rng.random(3)
        group = self.groups[min(int(u[0] * len(self.groups)), len(self.groups) - 1)]
        domains = sorted(group)
        cases = group[domains[min(int(u[1] * len(domains)), len(domains) - 1)]]
        return cases[min(int(u[2] * len(cases)), len(cases) - 1)]


def domain_sampler(items: list[Prepared]) -> BalancedSampler:
    """A sampler that draws every domain of `items` equally often (one group per domain)."""
    domains = sorted({it.domain for it in items})
    return BalancedSampler([{d: [i for i, it in enumerate(items) if it.domain == d]} for d in domains])


def write_synth_datalist(root: str | os.PathLike, style: str, *, domain: str | None = None, name: str | None = None,
                         training_seeds=(0, 1, 2), validation_seeds=(), classes=None, spacing_mm: float = 4.0
                         ) -> Path:
    """Write a dataset of `uharmony.data.synth` phantoms in one style as NIfTI + ``dataset.json`` (demos, tests).

    ``classes``: the class names it annotates (default: all of ``synth.CLASS_NAMES[1:]``); the others
    are written as background, as a partially labelled dataset would be. Returns the json's path.
    """
    import json

    from uharmony.data import synth

    root = Path(root)
    names = list(classes) if classes is not None else list(synth.CLASS_NAMES[1:])
    values = {synth.CLASS_NAMES.index(n): n for n in names}
    labels = {"0": "background", **{str(v): n for v, n in sorted(values.items())}}
    name = name or style
    lut = np.zeros(len(synth.CLASS_NAMES), np.uint8)
    for v in values:
        lut[v] = v

    def case(seed: int) -> dict:
        c = synth.make_case(int(seed), style, spacing_mm=spacing_mm)
        c.labels = lut[c.labels]
        image, label = f"imagesTr/{name}_{seed:05d}.nii.gz", f"labelsTr/{name}_{seed:05d}.nii.gz"
        synth.write_case(c, root / image, root / label)
        return {"image": image, "label": label}

    doc = {"name": name, "domain": domain or style, "description": f"uharmony.data.synth phantoms, style {style}, "
           f"{spacing_mm:g} mm", "modality": {"0": "image"}, "labels": labels,
           "training": [case(s) for s in training_seeds], "validation": [case(s) for s in validation_seeds]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return root / "dataset.json"
