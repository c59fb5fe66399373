"""Labelled cases for training: scene pairs (volume + segmentation) or a datalist, as MSD datalists.

Scene cases are written through Slicer's storage nodes into a private folder: the volume as it is
(a hardened copy when it is under a linear transform), the segmentation as a label map on the
volume's own voxel grid (same IJK-to-RAS), its segments' names mapped to label values. Next to them
goes a ``dataset.json`` in the format `uharmony.data.datalist` validates (docs/training.md).

Segment names are matched to the base model's classes case- and spacing-insensitively (as the
library matches them); a known class keeps the model's value. Cases whose segmentations name
different sets of classes go into separate datalists of the same domain, so that a class a case
does not annotate is treated as unknown (the library's partial-label loss), not as background.

Checks that can be made without running anything (no cases, a segmentation without segments, a
segment outside its volume, a class the model lacks when "new classes" is off, ...) come back as
one line each, naming the node.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

DOMAIN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # the library's rule for domain names
MAX_LABEL_VALUE = 255
#: A segment must keep at least this share of its volume inside its volume's grid.
MIN_INSIDE_FRACTION = 0.5


def class_key(name: str) -> str:
    """How the library matches class names across datasets: case- and spacing-insensitive."""
    return " ".join(str(name).split()).casefold()


@dataclass
class SceneCase:
    """One labelled case of the scene."""

    volume: Any  # vtkMRMLScalarVolumeNode
    segmentation: Any  # vtkMRMLSegmentationNode

    @property
    def title(self) -> str:
        return f"{self.volume.GetName() if self.volume else '?'} + {self.segmentation.GetName() if self.segmentation else '?'}"


@dataclass
class ExportedData:
    """What `export_scene_cases` wrote: the datalists and what they hold."""

    datalists: list[str]
    labels: dict[int, str]
    cases: int
    notes: list[str] = field(default_factory=list)


# -- what the scene offers ------------------------------------------------------------------


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def find_case_pairs(scene) -> list[SceneCase]:
    """Each segmentation of the scene with the volume it was drawn on (its reference geometry)."""
    pairs = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        volume = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
            pairs.append(SceneCase(volume, node))
    return pairs


# -- checks ---------------------------------------------------------------------------------


def check_domain(domain: str, new_modality: bool, base_domains: list[str]) -> list[str]:
    if not domain:
        return [("give the name of the new modality (domain), like \"mri-flair\"" if new_modality
                 else "choose which of the model's domains these cases belong to")]
    if not DOMAIN_PATTERN.match(domain):
        return [f"'{domain}' is not a valid domain name: letters, digits, '-' or '_', starting with a letter or digit"]
    known = domain in base_domains
    if new_modality and known:
        return [(f"the model already has a domain '{domain}': untick 'new modality' to train that domain, "
                 "or give the new modality another name")]
    if not new_modality and base_domains and not known:
        return [f"the model has no domain '{domain}' ({', '.join(base_domains)}): tick 'new modality' to add it"]
    return []


def check_classes(names: list[str], new_classes: bool, base_classes: list[str], source: str) -> list[str]:
    """Class names of the cases against the model's: new ones need 'new classes'."""
    base = {class_key(n) for n in base_classes}
    foreground = [n for n in names if class_key(n) != "background"]
    if not foreground:
        return [f"{source}: no class to learn (only background)"]
    if not base_classes:
        return []
    unknown = [n for n in foreground if class_key(n) not in base]
    if unknown and not new_classes:
        known = ", ".join(n for n in base_classes if n and class_key(n) != "background")
        what = "is not a class" if len(unknown) == 1 else "are not classes"
        return [(f"{source}: {', '.join(repr(n) for n in unknown)} {what} of the model ({known}): "
                 "tick 'new classes' to add them, or rename the segments")]
    return []


def check_scene_cases(cases: list[SceneCase], channels: int = 1) -> list[str]:
    """Problems found without writing anything (the geometry is checked when exporting)."""
    from UHarmonySegmentLib.Logic import check_volume_node

    if not cases:
        return ["no labelled case: add at least one volume with its segmentation (three or more are better)"]
    if channels != 1:
        return [f"the model takes {channels} input channels; a scene case gives one volume: use a datalist instead"]
    problems = []
    seen = set()
    for case in cases:
        if case.volume is None or case.segmentation is None:
            problems.append(f"{case.title}: choose both a volume and a segmentation")
            continue
        key = (case.volume.GetID(), case.segmentation.GetID())
        if key in seen:
            problems.append(f"{case.title}: listed twice")
            continue
        seen.add(key)
        try:
            check_volume_node(case.volume, action="used for training")
        except ValueError as exc:
            problems.append(str(exc))
        names = segment_names(case.segmentation)
        if not names:
            problems.append(f"{case.segmentation.GetName()}: the segmentation has no segments")
        keys = [class_key(n) for n in names]
        repeated = sorted({n for n in keys if keys.count(n) > 1})
        if repeated:
            problems.append(f"{case.segmentation.GetName()}: several segments are named {', '.join(repr(n) for n in repeated)}; "
                            "each class needs one segment")
        if any(k == "background" for k in keys):
            problems.append(f"{case.segmentation.GetName()}: a segment is named 'background'; remove it "
                            "(what no segment covers is the background)")
        transform = case.segmentation.GetParentTransformNode()
        if transform is not None and not transform.IsTransformToWorldLinear():
            problems.append(f"{case.segmentation.GetName()}: the segmentation is under a non-linear transform; harden it first")
    return problems


def label_table(cases: list[SceneCase], base_classes: list[str] | None = None) -> dict[int, str]:
    """value -> class name: the model's values for its classes, the next free values for new ones."""
    base = list(base_classes or ["background"])
    values = {class_key(name): value for value, name in enumerate(base) if name and value}
    table = {0: "background"}
    next_value = len(base)
    for case in cases:
        for name in segment_names(case.segmentation):
            key = class_key(name)
            if key not in values:
                values[key] = next_value
                next_value += 1
            value = values[key]
            table.setdefault(value, name if value >= len(base) else base[value])
    if max(table) > MAX_LABEL_VALUE:
        raise ValueError(f"too many classes: label values go up to {MAX_LABEL_VALUE}")
    return dict(sorted(table.items()))


# -- export ---------------------------------------------------------------------------------


def _matrix_array(matrix) -> list[list[float]]:
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def _voxel_volume(matrix) -> float:
    m = _matrix_array(matrix)
    a, b, c = ([m[r][col] for r in range(3)] for col in range(3))
    return abs(a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0]) + a[2] * (b[0] * c[1] - b[1] * c[0]))


def _segment_volume_mm3(segmentation_node, segment_id: str) -> float:
    """The segment's own volume, from its binary labelmap representation (mm^3)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image) or image.GetPointData().GetScalars() is None:
        return 0.0
    count = int((numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()) > 0).sum())
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return count * _voxel_volume(matrix)


def _label_map_on_volume_grid(case: SceneCase, labels: dict[int, str]):
    """(uint8 (k, j, i) array, problems, notes): the segments merged on the volume's voxel grid."""
    import numpy as np
    import slicer
    import vtk
    from vtk.util import numpy_support

    segmentation_node, volume = case.segmentation, case.volume
    segmentation = segmentation_node.GetSegmentation()
    value_of = {class_key(name): value for value, name in labels.items()}
    if not segmentation_node.GetSegmentation().ContainsRepresentation("Binary labelmap"):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    ids, values = vtk.vtkStringArray(), vtk.vtkIntArray()
    order = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        ids.InsertNextValue(segment_id)
        value = value_of[class_key(segmentation.GetNthSegment(i).GetName())]
        values.InsertNextValue(value)
        order.append((segment_id, segmentation.GetNthSegment(i).GetName(), value))
    # the volume's grid, expressed where the segmentation lives (its parent transform, if any)
    geometry = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        volume, segmentation_node.GetParentTransformNode())
    merged = slicer.vtkOrientedImageData()
    if not segmentation_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, ids, values):
        raise OSError(f"{segmentation_node.GetName()}: Slicer could not turn the segments into a label map")
    dims = volume.GetImageData().GetDimensions()
    if merged.GetDimensions() != dims or tuple(merged.GetExtent()[::2]) != (0, 0, 0):
        raise ValueError(f"{case.title}: the label map does not come out on the volume's grid "
                         f"({merged.GetDimensions()} vs {dims})")
    array = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    # mismatched geometry: a segment (mostly) outside the volume was drawn on another image
    voxel = _voxel_volume(_ijk_to_ras(volume))
    own_volumes = {segment_id: _segment_volume_mm3(segmentation_node, segment_id) for segment_id, _, _ in order}
    problems = []
    for segment_id, name, value in order:
        own = own_volumes[segment_id]
        inside = float((array == value).sum()) * voxel
        if own <= 0:
            problems.append(f"{segmentation_node.GetName()}: segment '{name}' is empty")
        elif inside == 0:
            problems.append(f"{case.title}: segment '{name}' lies outside the volume (mismatched geometry: "
                            "was it drawn on another image?)")
        elif inside < MIN_INSIDE_FRACTION * own:
            problems.append(f"{case.title}: only {inside / own:.0%} of segment '{name}' lies inside the volume "
                            "(mismatched geometry: was it drawn on another image?)")
    notes = []
    claimed = sum(float((array == v).sum()) for _, _, v in order)
    own_total = sum(own_volumes.values()) / voxel
    if own_total > claimed * 1.05 + 1:
        notes.append(f"{case.title}: segments overlap; where they do, the later segment's label is kept")
    return np.ascontiguousarray(array.astype(np.uint8)), problems, notes


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def _write_label(array, like_volume, path: str) -> None:
    import slicer

    label = slicer.vtkMRMLLabelMapVolumeNode()
    slicer.util.updateVolumeFromArray(label, array)
    label.SetIJKToRASMatrix(_ijk_to_ras(like_volume))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(False)
    if not storage.WriteData(label) or not os.path.isfile(path):
        raise OSError(f"could not write the label map {os.path.basename(path)}")


def _write_volume(volume, path: str) -> None:
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(False)
    if not storage.WriteData(volume) or not os.path.isfile(path):
        raise OSError(f"{volume.GetName()}: could not write it to a temporary file")


def export_scene_cases(cases: list[SceneCase], folder: str, domain: str, base_classes: list[str] | None = None,
                       channel_name: str = "image", name: str = "scene") -> ExportedData:
    """Write the cases and their datalist(s) into `folder` (which the caller deletes afterwards).

    Files are named ``case_000.nrrd``: nothing of the scene's node names (which may hold patient
    names) goes into a file name. Raises ValueError listing every problem found.
    """
    from UHarmonySegmentLib.Logic import hardened_copy

    problems = check_scene_cases(cases)
    if problems:
        raise ValueError("\n".join(problems))
    labels = label_table(cases, base_classes)
    groups: dict[tuple, list[dict]] = {}
    notes: list[str] = []
    for index, case in enumerate(cases):
        source = hardened_copy(case.volume)  # the scene's node is never modified
        if source is not case.volume:
            notes.append(f"{case.volume.GetName()}: its parent transform was applied (hardened copy)")
        array, case_problems, case_notes = _label_map_on_volume_grid(case, labels)
        problems += case_problems
        notes += case_notes
        if case_problems:
            continue
        image_rel, label_rel = f"imagesTr/case_{index:03d}.nrrd", f"labelsTr/case_{index:03d}.nrrd"
        os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
        os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
        _write_volume(source, os.path.join(folder, image_rel))
        _write_label(array, source, os.path.join(folder, label_rel))
        keys = tuple(sorted(class_key(n) for n in segment_names(case.segmentation)))
        groups.setdefault(keys, []).append({"image": image_rel, "label": label_rel})
    if problems:
        raise ValueError("\n".join(problems))
    value_of = {class_key(n): v for v, n in labels.items()}
    datalists = []
    for number, (keys, entries) in enumerate(groups.items(), start=1):
        suffix = "" if len(groups) == 1 else f"-{number}"
        table = {"0": "background", **{str(value_of[k]): labels[value_of[k]] for k in sorted(keys, key=value_of.get)}}
        doc = {"name": f"{name}-{domain}{suffix}", "domain": domain, "modality": {"0": channel_name},
               "labels": table, "training": entries,
               "description": "labelled cases exported from the 3D Slicer scene by UHarmony Train"}
        path = os.path.join(folder, f"dataset{suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        datalists.append(path)
    if len(groups) > 1:
        notes.append(f"the cases annotate {len(groups)} different sets of classes: one datalist each, so a class "
                     "a case does not have is treated as unknown there, not as background")
    return ExportedData(datalists, labels, sum(len(e) for e in groups.values()), notes)


# -- datalists given by the user ------------------------------------------------------------


def resolve_datalist(path: str) -> str:
    """A dataset.json file, or a folder holding one."""
    if not path:
        raise ValueError("choose a datalist (dataset.json) or a folder holding one")
    if os.path.isdir(path):
        candidate = os.path.join(path, "dataset.json")
        if not os.path.isfile(candidate):
            raise ValueError(f"{path}: the folder has no dataset.json (the MSD-style datalist, see docs/training.md)")
        return candidate
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return path


def read_datalist(path: str) -> dict:
    """The datalist's JSON (not validated beyond being an object: the library does that, exit 5)."""
    path = resolve_datalist(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: must hold a JSON object")  # noqa: TRY004 - a user-facing input error
    return doc


def datalist_classes(doc: dict) -> list[str]:
    labels = doc.get("labels") if isinstance(doc.get("labels"), dict) else {}
    return [str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
            if str(k) != "0"]


def copy_datalist(path: str, folder: str, domain: str | None, name: str = "dataset.json") -> str:
    """A copy of the datalist in `folder` with absolute paths and, when given, another domain."""
    source = resolve_datalist(path)
    doc = read_datalist(source)
    base = os.path.dirname(os.path.abspath(source))

    def absolute(p):
        return os.path.normpath(os.path.join(base, p)) if isinstance(p, str) else p

    for split in ("training", "validation", "test"):
        entries = doc.get(split)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for key in ("image", "label"):
                value = entry.get(key)
                entry[key] = [absolute(p) for p in value] if isinstance(value, list) else absolute(value)
    if domain:
        doc["domain"] = domain
    out = os.path.join(folder, name)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return out
