"""MSD-style datalists (``dataset.json``), validated before any training starts.

A datalist describes one dataset::

    {"name": "oasis-t1", "domain": "mri-t1",
     "modality": {"0": "T1"},                                  # channels, in order
     "labels": {"0": "background", "1": "grey matter"},        # label value -> class name
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...]}                                      # optional

``image`` is a path or a list of paths (one per channel); paths are relative to the json's folder.
The descriptive keys of the Medical Segmentation Decathlon (``description``, ``reference``,
``licence``, ``release``, ``tensorImageSize``, ``numTraining``, ``numTest``, ``test``) are accepted
and ignored, so MSD files load as they are once ``domain`` is added; any other key is refused.

``load_datalist`` collects every problem it finds (structure, missing files, headers, grids, label
values, duplicates) and raises one ``BadDatalistError`` listing them all, one line each, so a user
fixes a datalist in one pass rather than one error per run. Image voxels are never read (headers
only); label voxels are, to check their values against the label table.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from uharmony.data.io import read_header
from uharmony.errors import BadDatalistError, BadInputError

__all__ = ["Case", "Dataset", "check_against_model", "check_compatible", "load_datalist", "union_label_space"]

REQUIRED_KEYS = ("name", "domain", "modality", "labels", "training")
OPTIONAL_KEYS = ("validation",)
# Descriptive MSD keys: accepted so Decathlon files need only a "domain"; their content is unused.
MSD_KEYS = ("description", "reference", "licence", "license", "release", "tensorImageSize",
            "numTraining", "numTest", "test")
KNOWN_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS + MSD_KEYS
CASE_KEYS = ("image", "label")
DOMAIN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # the model card's rule for domain names
MAX_LABEL_VALUE = 255  # the card's class values are 0..255
AFFINE_ATOL_MM = 1e-3


@dataclass
class Case:
    """One training or validation case: image file(s) in channel order, its label map, its origin."""

    image: list[Path]
    label: Path | None
    dataset: str
    domain: str


@dataclass
class Dataset:
    """A validated datalist. ``labels`` maps label values (ints) to class names; ``path`` is the json."""

    name: str
    domain: str
    channels: list[str]
    labels: dict[int, str]
    training: list[Case]
    validation: list[Case] = field(default_factory=list)
    path: Path = Path("dataset.json")

    @property
    def annotated(self) -> list[str]:
        """Names of the foreground classes this dataset annotates (in value order)."""
        return [self.labels[v] for v in sorted(self.labels) if v != 0]


def class_key(name: str) -> str:
    """How class (and channel) names are matched across datasets: case- and spacing-insensitive."""
    return " ".join(str(name).split()).casefold()


def _raise(problems: list[str], path, what: str | None = None) -> None:
    n = len(problems)
    head = f"{n} problem{'s' if n != 1 else ''}"
    raise BadDatalistError.listing(f"{what}: {head}" if what else head, problems, path)


def _quote(keys) -> str:
    return ", ".join(repr(k) for k in keys)


# ------------------------------------------------------------------------------------------ loading


def load_datalist(path: str | os.PathLike, *, require_labels: bool = True, check_files: bool = True) -> Dataset:
    """Read and validate a ``dataset.json``; raise ``BadDatalistError`` listing every problem found.

    ``str(error)``: first line ``<json>: N problems``, then one ``<file>: <problem>`` line each.
    ``require_labels=False`` admits cases without ``label`` (for adaptation without labels);
    ``check_files=False`` checks only the json (no file is opened), for a fast re-load.
    """
    json_path = Path(path)
    shown = str(json_path)
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadDatalistError("does not exist", shown) from None
    except IsADirectoryError:
        raise BadDatalistError("is a folder; give the dataset.json file", shown) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadDatalistError(f"cannot be read ({getattr(exc, 'strerror', None) or exc})", shown) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadDatalistError(f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", shown) from None
    if not isinstance(doc, dict):
        raise BadDatalistError(f"must hold a JSON object, not a {type(doc).__name__}", shown)

    problems: list[str] = []

    def bad(msg: str, where: str = shown) -> None:
        problems.append(f"{where}: {msg}")

    unknown = [k for k in doc if k not in KNOWN_KEYS]
    if unknown:
        bad(f"unknown key{'s' if len(unknown) > 1 else ''} {_quote(unknown)} (allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
            " and the MSD descriptive keys)")
    for key in REQUIRED_KEYS:
        if key not in doc:
            bad(f"missing key {key!r}")

    name = doc.get("name")
    if "name" in doc and not (isinstance(name, str) and name.strip()):
        bad("'name' must be a non-empty string")
    domain = doc.get("domain")
    if "domain" in doc and not (isinstance(domain, str) and DOMAIN_PATTERN.match(domain)):
        bad(f"'domain' must be a name of letters, digits, '-' or '_' (like \"mri-t1\"), got {domain!r}")
    channels = _parse_modality(doc.get("modality"), bad) if "modality" in doc else None
    labels = _parse_labels(doc.get("labels"), bad) if "labels" in doc else None

    folder = json_path.parent
    splits: dict[str, list[dict]] = {}
    for split in ("training", "validation"):
        if split not in doc:
            continue
        entries = doc[split]
        if not isinstance(entries, list):
            bad(f"'{split}' must be a list of cases")
            continue
        if split == "training" and not entries:
            bad("the training split is empty")
        splits[split] = [c for i, entry in enumerate(entries)
                         if (c := _parse_case(entry, f"{split}[{i}]", folder, require_labels, bad)) is not None]

    # Channel count: against "modality" when it parsed, else against the cases' most common count.
    all_cases = [c for cs in splits.values() for c in cs]
    if channels is not None:
        expected, source = len(channels), f"'modality' declares {len(channels)}"
    elif all_cases:
        expected = Counter(len(c["image"]) for c in all_cases).most_common(1)[0][0]
        source = f"most cases have {expected}"
    else:
        expected, source = None, ""
    for c in all_cases:
        if expected is not None and len(c["image"]) != expected:
            n = len(c["image"])
            bad(f"{c['where']}: has {n} image{'s' if n != 1 else ''} (channels) but {source}")

    # Duplicates: the same image(s) twice, within a split or across training and validation.
    seen: dict[tuple, str] = {}
    unique_cases = []
    for c in all_cases:
        key = tuple(os.path.normcase(os.path.abspath(p)) for p in c["image"])
        if key in seen:
            bad(f"{c['where']}: repeats {seen[key]} (same image{'s' if len(key) > 1 else ''})")
        else:
            seen[key] = c["where"]
            unique_cases.append(c)  # a repeat's files are checked once, under its first mention

    if check_files:
        for c in unique_cases:
            _check_case_files(c, labels, bad)

    if problems:
        _raise(problems, shown)

    def to_case(c: dict) -> Case:
        return Case(image=[Path(os.path.abspath(p)) for p in c["image"]],
                    label=None if c["label"] is None else Path(os.path.abspath(c["label"])),
                    dataset=name, domain=domain)

    return Dataset(name=name, domain=domain, channels=channels, labels=labels,
                   training=[to_case(c) for c in splits.get("training", [])],
                   validation=[to_case(c) for c in splits.get("validation", [])],
                   path=Path(os.path.abspath(json_path)))


def _parse_modality(value, bad) -> list[str] | None:
    if not isinstance(value, dict) or not value:
        bad('\'modality\' must be an object of channel index -> name, like {"0": "T1"}')
        return None
    ok = True
    indices = {}
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit()):
            bad(f"'modality' key {k!r} is not a channel index (0, 1, ...)")
            ok = False
            continue
        if not (isinstance(v, str) and v.strip()):
            bad(f"'modality' channel {k} must have a non-empty name")
            ok = False
        indices[int(k)] = v
    if ok and sorted(indices) != list(range(len(indices))):
        bad(f"'modality' channel indices {sorted(indices)} must be 0..{len(indices) - 1}")
        ok = False
    names = [class_key(indices[i]) for i in sorted(indices)] if ok else []
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        bad(f"'modality' names channels {_quote(dup)} more than once")
        ok = False
    return [indices[i] for i in range(len(indices))] if ok else None


def _parse_labels(value, bad) -> dict[int, str] | None:
    if not isinstance(value, dict) or not value:
        bad('\'labels\' must be an object of label value -> class name, like {"0": "background", "1": "tumour"}')
        return None
    ok = True
    table: dict[int, str] = {}
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) <= MAX_LABEL_VALUE):
            bad(f"'labels' key {k!r} is not a label value (0..{MAX_LABEL_VALUE})")
            ok = False
            continue
        if not (isinstance(v, str) and v.strip()):
            bad(f"'labels' value {k} must have a non-empty class name")
            ok = False
            continue
        if int(k) in table:
            bad(f"'labels' lists value {int(k)} twice ({k!r})")
            ok = False
        table[int(k)] = v
    if 0 not in table:
        bad("'labels' must name value 0 (the background)")
        ok = False
    names = Counter(class_key(v) for v in table.values())
    dup = sorted(n for n, count in names.items() if count > 1)
    if dup:
        bad(f"'labels' names {_quote(dup)} more than once (names are matched case-insensitively)")
        ok = False
    stray = [v for v, n in table.items() if v != 0 and class_key(n) == "background"]
    if stray:
        bad(f"'labels' value {stray[0]} is named 'background'; only value 0 is the background")
        ok = False
    return dict(sorted(table.items())) if ok else None


def _parse_case(entry, where: str, folder: Path, require_labels: bool, bad) -> dict | None:
    if not isinstance(entry, dict):
        bad(f'{where}: must be an object like {{"image": ..., "label": ...}}')
        return None
    ok = True
    unknown = [k for k in entry if k not in CASE_KEYS]
    if unknown:
        bad(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {_quote(unknown)} (allowed: 'image', 'label')")
        ok = False
    image = entry.get("image")
    if "image" not in entry:
        bad(f"{where}: missing key 'image'")
        ok = False
    elif isinstance(image, str) and image.strip():
        image = [image]
    elif isinstance(image, list) and image and all(isinstance(p, str) and p.strip() for p in image):
        pass
    else:
        bad(f"{where}: 'image' must be a file path or a non-empty list of file paths (one per channel)")
        ok = False
    label = entry.get("label")
    if "label" not in entry or label is None:
        if require_labels:
            bad(f"{where}: missing key 'label'" if "label" not in entry else f"{where}: 'label' is null")
            ok = False
        label = None
    elif not (isinstance(label, str) and label.strip()):
        bad(f"{where}: 'label' must be a file path")
        ok = False
    if not ok:
        return None
    # Paths as the user will find them (relative to the current folder when the json's path was).
    return {"where": where, "image": [str(folder / p) for p in image],
            "label": None if label is None else str(folder / label)}


def _check_case_files(case: dict, labels: dict[int, str] | None, bad) -> None:
    """Headers of every channel and the label: readable 3D, all on the first channel's grid; label values."""
    where = case["where"]
    grid = None  # (shape, affine, path) of the first readable channel
    files = [(p, f"{where} image" + (f" {i}" if len(case["image"]) > 1 else "")) for i, p in enumerate(case["image"])]
    if case["label"] is not None:
        files.append((case["label"], f"{where} label"))
    for path, role in files:
        try:
            shape, affine, _ = read_header(path)
        except BadInputError as exc:
            bad(f"{exc.message} ({role})", exc.path or path)
            continue
        if grid is None:
            grid = (shape, affine, path)
        elif tuple(shape) != tuple(grid[0]):
            bad(f"has shape {_fmt_shape(shape)} but {os.path.basename(grid[2])} has {_fmt_shape(grid[0])} ({role})", path)
            continue
        elif not np.allclose(affine, grid[1], rtol=0, atol=AFFINE_ATOL_MM):
            diff = float(np.max(np.abs(affine - grid[1])))
            bad(f"has a voxel-to-world matrix that differs from {os.path.basename(grid[2])}'s by up to {diff:.3g} mm "
                f"(more than {AFFINE_ATOL_MM:g} mm) ({role})", path)
            continue
        if role.endswith("label"):
            _check_label_values(path, labels, role, bad)


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _check_label_values(path: str, labels: dict[int, str] | None, role: str, bad) -> None:
    try:
        values = label_values(path)
    except BadInputError as exc:
        bad(f"{exc.message} ({role})", path)
        return
    if not np.all(np.isfinite(values)):
        bad(f"contains NaN/Inf values; a label map holds integer label values ({role})", path)
        return
    fractional = values[values != np.round(values)]
    if fractional.size:
        bad(f"contains non-integer values (e.g. {float(fractional[0]):g}); a label map holds integer label values ({role})", path)
        return
    if labels is None:  # the label table itself is broken; already reported
        return
    unknown = [int(v) for v in values if int(v) not in labels]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        bad(f"has label value{'s' if len(unknown) > 1 else ''} {shown} not in the label table "
            f"({', '.join(str(v) for v in labels)}) ({role})", path)


def label_values(path: str | os.PathLike) -> np.ndarray:
    """The distinct voxel values of a label map (NIfTI via nibabel, NRRD/MetaImage via SimpleITK).

    Unlike ``io.read_volume`` this accepts a constant map: a case may contain only background.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise BadInputError("is a folder; a label map must be one file (.nii.gz, .nrrd, .mha)", p)
    try:
        if p.lower().endswith((".nii", ".nii.gz")):
            data = np.asanyarray(nib.load(p).dataobj)
        else:
            import SimpleITK as sitk

            data = sitk.GetArrayFromImage(sitk.ReadImage(p))  # a copy: a view dies with its image
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data: nibabel, gzip, zlib and ITK raise many kinds
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise BadInputError(f"cannot be read ({text[:160]})", p) from None
    flat = np.asarray(data).ravel(order="K")
    if not flat.size:
        return flat
    small_ints = flat.dtype.kind in "bu" or (flat.dtype.kind == "i" and flat.min() >= 0)
    if small_ints and int(flat.max()) < 65536:  # counting beats sorting for small label values
        return np.flatnonzero(np.bincount(flat.astype(np.int64, copy=False)))
    return np.unique(flat)


# ----------------------------------------------------------------------------------- label spaces


def union_label_space(
    datasets: list[Dataset], base: list[str] | None = None
) -> tuple[list[str], dict[str, dict[int, int]]]:
    """The union of the datasets' classes and each dataset's local -> union value map.

    Class names are matched case- and spacing-insensitively. ``base`` (for example a model card's
    class names, index = value) keeps its names, order and values; classes it lacks get the next
    values, in the order the datasets list them. Value 0 is the background in every dataset,
    whatever it is called. Maps are keyed by dataset name.
    """
    union = list(base) if base else ["background"]
    index = {}
    for value, name in enumerate(union):
        key = class_key(name)
        if key in index:
            raise ValueError(f"base class names repeat {name!r} (names are matched case-insensitively)")
        index[key] = value
    maps: dict[str, dict[int, int]] = {}
    origin: dict[str, Dataset] = {}
    for ds in datasets:
        local = {}
        for value, name in sorted(ds.labels.items()):
            if value == 0:
                local[0] = 0
                continue
            key = class_key(name)
            if key not in index:
                index[key] = len(union)
                union.append(name)
            local[value] = index[key]
        if ds.name in maps and maps[ds.name] != local:
            raise BadDatalistError(
                f"dataset name {ds.name!r} is also used by {origin[ds.name].path} with a different label table; "
                "give each dataset its own name", ds.path)
        maps[ds.name] = local
        origin.setdefault(ds.name, ds)
    return union, maps


def check_compatible(datasets: list[Dataset]) -> None:
    """Datasets trained together need the same channels, in the same order; refuse otherwise."""
    if not datasets:
        raise BadDatalistError("no datalist given")
    first = datasets[0]
    problems = []
    for ds in datasets[1:]:
        if [class_key(c) for c in ds.channels] != [class_key(c) for c in first.channels]:
            problems.append(f"{ds.path}: has channels {_quote(ds.channels)} but {first.path} has {_quote(first.channels)}")
    names: dict[str, Dataset] = {}
    for ds in datasets:
        other = names.setdefault(ds.name, ds)
        if other is not ds and other.path == ds.path:
            problems.append(f"{ds.path}: is given twice")
        elif other is not ds and other.labels != ds.labels:
            problems.append(f"{ds.path}: dataset name {ds.name!r} is also used by {other.path} with a different label table")
    if problems:
        _raise(problems, None, "datalists")


def check_against_model(datasets: list[Dataset], card: dict) -> None:
    """Refuse datasets whose channels do not fit the model: count, and order where names match.

    Channel names are free text ("image", "T1"), so a name the card does not use is no problem; a
    name the card uses at another position is (the channels are swapped).
    """
    expected = [c["name"] for c in card["input"]["channels"]]
    keys = [class_key(c) for c in expected]
    model = card.get("name", "the model")
    problems = []
    for ds in datasets:
        if len(ds.channels) != len(expected):
            problems.append(f"{ds.path}: has {len(ds.channels)} channel{'s' if len(ds.channels) != 1 else ''} "
                            f"({_quote(ds.channels)}) but model {model!r} takes {len(expected)} ({_quote(expected)})")
            continue
        for i, name in enumerate(ds.channels):
            key = class_key(name)
            if key in keys and keys.index(key) != i:
                problems.append(f"{ds.path}: channel {i} is {name!r}, which model {model!r} takes as channel "
                                f"{keys.index(key)}; list the channels in the model's order ({_quote(expected)})")
    if problems:
        _raise(problems, None, f"datalists do not fit model {model!r}")
