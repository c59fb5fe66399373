"""Segment logic on MRML, without Qt: export the input, run `uharmony segment`, import the result.

Usage from Slicer's Python console (or any script)::

    from UHarmonySegmentLib import SegmentLogic, SubprocessRunner
    logic = SegmentLogic(slicer.mrmlScene, SubprocessRunner())
    result = logic.segment_sync([volumeNode], device="auto")
    print(result.segmentation_node.GetName(), result.report["domain"]["chosen"])

The work happens in a separate process (``<python> -m uharmony segment ... --progress jsonl``):
the UI stays live, cancel really ends it, GPU memory is freed when it exits. The input volume(s)
go through a storage node into a private temporary folder (mkdtemp: mode 0700) that this logic
ALWAYS deletes afterwards — success, failure or cancel — because it holds patient data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import slicer
import vtk

from .JsonLines import ProgressParser, overall_fraction
from .Library import (
    EXIT_CANCELLED,
    default_python_executable,
    ensure_library_importable,
    exit_code_text,
    find_library_root,
    process_environment,
)
from .Presentation import normalise_color
from .ProcessRunner import ProcessRunner
from .Signal import Signal
from .TempFolders import make_private_dir, remove_tree

ATTRIBUTE_PREFIX = "UHarmony."
INPUT_ATTRIBUTE = ATTRIBUTE_PREFIX + "InputVolumeID"
LOG = logging.getLogger("UHarmony")

class SegmentError(RuntimeError):
    """A segmentation that did not succeed (raised by `segment_sync`)."""

    def __init__(self, result: "SegmentResult"):
        self.result = result
        super().__init__(result.message)


@dataclass
class TaskResult:
    """How a library process ended; the Train module's jobs extend it too."""

    status: str  # "success" | "failed" | "cancelled"
    message: str = ""
    exit_code: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == "success"

    @property
    def cancelled(self) -> bool:
        return self.status == "cancelled"


@dataclass
class SegmentResult(TaskResult):
    segmentation_node: Any = None
    report: dict | None = None


def finish_task(task, result: TaskResult, finished, callback=None) -> None:
    """End a library process's run (Segment's and Train's): delete its private temporary folder (a
    failure is a warning on the result: the folder may hold patient data), store the result on the task,
    log it, emit the logic's ``finished`` signal, then call the run's own ``finished`` callback."""
    if task is not None and task.temp_dir and not remove_tree(task.temp_dir):
        result.warnings.append(f"could not delete the temporary folder {task.temp_dir}")
        LOG.error("UHarmony: could not delete the temporary folder %s (it may hold patient data)", task.temp_dir)
    if task is not None:
        task.result = result
    (LOG.info if result.succeeded else LOG.warning)("UHarmony: %s", result.message)
    finished.emit(result)
    if callback:
        callback(result)


class SegmentTask:
    """One run: `cancel()` it, `wait()` for it; `result` is set once it has finished."""

    def __init__(self, logic: "SegmentLogic"):
        self._logic = logic
        self.result: SegmentResult | None = None
        self.pid: int | None = None
        self.temp_dir: str | None = None
        self.cancel_requested = False

    @property
    def running(self) -> bool:
        return self.result is None

    def cancel(self) -> None:
        if self.result is None:
            self.cancel_requested = True
            self._logic._stop_process()

    def wait(self, timeout: float | None = None) -> SegmentResult | None:
        """Block until finished (callbacks are delivered on this thread); None on timeout."""
        if self.result is None:
            self._logic.runner.wait(timeout)
        return self.result


class SegmentLogic:
    """Segment volume nodes with the uharmony library; results become segmentation nodes.

    :param scene: the vtkMRMLScene results go into.
    :param process_runner: a `ProcessRunner` (QtProcessRunner in Slicer, SubprocessRunner in tests).
    :param python_executable: interpreter that runs ``-m uharmony`` (PythonSlicer in Slicer).
    :param temp_root: where private temporary folders are made (default: the system's).
    :param environment: extra environment variables for the process (on top of this process's own).
    """

    def __init__(self, scene, process_runner: ProcessRunner, python_executable: str | None = None,
                 temp_root: str | None = None, library_root: str | None = None,
                 environment: dict | None = None, library_module: str = "uharmony"):
        self.scene = scene
        self.runner = process_runner
        self.python_executable = python_executable or default_python_executable()
        self.temp_root = temp_root
        self.library_root = library_root or find_library_root()
        self.environment = process_environment(self.library_root, extra=environment)
        self.library_module = library_module
        self.create_closed_surface = True
        self.parser = ProgressParser()
        # Signals for whoever watches (the widget): progress(stage, done, total, fraction),
        # log(message), finished(SegmentResult)
        self.progress = Signal("stage", "done", "total", "fraction")
        self.log = Signal("message")
        self.finished = Signal("result")
        self._task: SegmentTask | None = None
        self._stderr_tail: list[str] = []
        self._callbacks: dict[str, Callable | None] = {}
        self._pending: dict[str, Any] = {}
        self.parser.progress.connect(self._on_progress)
        self.parser.log.connect(lambda message: self._emit_log(message))
        self.parser.unparsed.connect(lambda line: self._emit_log(line))

    # -- public API ---------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._task is not None and self._task.running

    def command(self, inputs: Sequence[str], output: str, report: str, model: str | None = None,
                device: str = "auto", domain: str = "auto") -> list[str]:
        """The command line of one run (for logs and tests)."""
        args = [self.python_executable, "-m", self.library_module, "segment", *inputs, "-o", output,
                "--report", report, "--progress", "jsonl", "--device", device or "auto", "--domain", domain or "auto"]
        if model:
            args += ["--model", str(model)]
        return args

    def segment(self, volume_nodes, model: str | None = None, device: str = "auto", domain: str = "auto",
                replace: bool = True, on_progress: Callable | None = None, on_log: Callable | None = None,
                on_finished: Callable[[SegmentResult], None] | None = None) -> SegmentTask:
        """Start segmenting; returns at once. `on_finished(SegmentResult)` is called exactly once.

        `volume_nodes`: one scalar volume node, or a list (one per input channel of the model, the
        first one gives the output grid). `replace`: reuse the previous UHarmony result of the same
        input instead of adding a new segmentation node.
        """
        if self.is_running:
            raise RuntimeError("a segmentation is already running; cancel it or wait for it")
        nodes = list(volume_nodes) if isinstance(volume_nodes, (list, tuple)) else [volume_nodes]
        task = SegmentTask(self)
        self._task = task
        self._callbacks = {"progress": on_progress, "log": on_log, "finished": on_finished}
        self._stderr_tail = []
        self.parser.reset()
        self._pending = {"nodes": nodes, "replace": replace, "model": model, "device": device, "domain": domain}
        try:
            self._check_inputs(nodes)
            task.temp_dir = make_private_dir(self.temp_root)
            in_dir, out_dir = os.path.join(task.temp_dir, "in"), os.path.join(task.temp_dir, "out")
            os.mkdir(in_dir, 0o700)
            os.mkdir(out_dir, 0o700)
            inputs, export_notes = self._export_inputs(nodes, in_dir)
            self._pending["inputs"] = inputs
            self._pending["export_notes"] = export_notes
            self._pending["output"] = os.path.join(out_dir, "segmentation.nrrd")
            self._pending["report"] = os.path.join(out_dir, "report.json")
            args = self.command(inputs, self._pending["output"], self._pending["report"], model, device, domain)
            self.runner.on_line = self.parser.feed
            self.runner.on_stderr = self._on_stderr
            self.runner.on_finished = self._on_process_finished
            self._emit_log("Running: " + " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(args)))
            self.runner.start(args, self.environment)
            task.pid = self.runner.pid
        except Exception as exc:  # nothing started: clean up and report, do not raise into the UI
            message = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            self._finish(SegmentResult("failed", message))
        return task

    def segment_sync(self, volume_nodes, raise_on_error: bool = True, timeout: float | None = None,
                     **kwargs) -> SegmentResult:
        """Segment and wait (scripts, self-tests). Raises `SegmentError` unless it succeeded."""
        task = self.segment(volume_nodes, **kwargs)
        result = task.wait(timeout)
        if result is None:
            task.cancel()
            result = task.wait(30) or SegmentResult("failed", "timed out")
        if raise_on_error and not result.succeeded:
            raise SegmentError(result)
        return result

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- inputs ---------------------------------------------------------------------------------
    def _check_inputs(self, nodes) -> None:
        if not nodes:
            raise ValueError("no input volume selected")
        for node in nodes:
            if node is None:
                raise ValueError("an input volume is not selected")
            check_volume_node(node)

    def _export_inputs(self, nodes, in_dir: str) -> tuple[list[str], list[str]]:
        """Write each input through a storage node; a transformed one as a hardened copy."""
        paths, notes = [], []
        for index, node in enumerate(nodes):
            path = os.path.join(in_dir, f"input_{index}.nrrd")
            source = hardened_copy(node)
            transform = node.GetParentTransformNode()
            if transform is not None:
                notes.append(f"{node.GetName()}: its parent transform '{transform.GetName()}' was applied "
                             "(hardened copy); the result is in world coordinates")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(path)
            storage.SetUseCompression(False)
            if not storage.WriteData(source) or not os.path.isfile(path):
                raise OSError(f"{node.GetName()}: could not write it to a temporary file")
            paths.append(path)
        return paths, notes

    # -- process events -------------------------------------------------------------------------
    def _emit_log(self, message: str) -> None:
        LOG.info(message)
        self.log.emit(message)
        callback = self._callbacks.get("log")
        if callback:
            callback(message)

    def _on_stderr(self, line: str) -> None:
        self._stderr_tail = (self._stderr_tail + [line])[-40:]
        self._emit_log(line)

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        fraction = overall_fraction(stage, done, total)
        self.progress.emit(stage, done, total, fraction)
        callback = self._callbacks.get("progress")
        if callback:
            callback(stage, done, total, fraction)

    def _stop_process(self) -> None:
        if self.runner.running:
            self._emit_log("Cancelling...")
            self.runner.stop()

    def _on_process_finished(self, exit_code: int) -> None:
        task = self._task
        if task is None or task.result is not None:
            return
        try:
            result = self._make_result(exit_code, task)
        except Exception as exc:  # importing failed: report it, still clean up
            LOG.exception("UHarmony: importing the result failed")
            result = SegmentResult("failed", f"Could not import the result: {exc}", exit_code)
        self._finish(result)

    def _make_result(self, exit_code: int, task: SegmentTask) -> SegmentResult:
        if task.cancel_requested:
            return SegmentResult("cancelled", "Cancelled.", exit_code)
        if exit_code == EXIT_CANCELLED:
            return SegmentResult("cancelled", "The segmentation process was stopped.", exit_code)
        if exit_code != 0:
            if self.parser.last_error is not None:
                message = self.parser.last_error[1]
            else:
                tail = [ln for ln in self._stderr_tail if ln.strip()]
                message = tail[-1].strip() if tail else ""
            message = self._with_volume_names(message)
            text = exit_code_text(exit_code)
            message = f"{message} ({text}, exit code {exit_code})" if message else f"Segmentation failed: {text} (exit code {exit_code})"
            return SegmentResult("failed", message, exit_code)
        output, report_path = self._pending["output"], self._pending["report"]
        if not os.path.isfile(output):
            return SegmentResult("failed", "The library finished but wrote no label map.", exit_code)
        report = None
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f)
        elif self.parser.last_result is not None:
            report = self.parser.last_result.get("report")
        report = report or {}
        node, warnings = self._import(output, report)
        return SegmentResult("success", "Segmentation finished.", exit_code,
                             list(self._pending.get("export_notes", [])) + warnings,
                             segmentation_node=node, report=report)

    def _with_volume_names(self, message: str) -> str:
        """The library names the temporary files; the user knows the volumes: say those."""
        for index, node in enumerate(self._pending.get("nodes") or []):
            name = f"'{node.GetName()}'"
            for path in self._pending.get("inputs", [])[index:index + 1]:
                message = message.replace(path, name)
            message = message.replace(f"input_{index}.nrrd", name)
        return message

    def _finish(self, result: SegmentResult) -> None:
        self._pending = {}
        callbacks, self._callbacks = self._callbacks, {}
        finish_task(self._task, result, self.finished, callbacks.get("finished"))

    # -- import ---------------------------------------------------------------------------------
    def _class_table(self, report: dict) -> dict[int, dict]:
        """value -> {name, color, terminology}: the card's classes, completed by the report's."""
        table: dict[int, dict] = {}
        card = None
        model_path = (report.get("model") or {}).get("path")
        if model_path and os.path.isfile(os.path.join(model_path, "card.json")):
            try:
                with open(os.path.join(model_path, "card.json"), encoding="utf-8") as f:
                    card = json.load(f)
            except (OSError, ValueError):
                card = None
        for source in ((card or {}).get("classes") or [], report.get("classes") or []):
            for cls in source:
                try:
                    value = int(cls["value"])
                except (KeyError, TypeError, ValueError):
                    continue
                entry = table.setdefault(value, {})
                for key in ("name", "color", "terminology"):
                    if cls.get(key) is not None and entry.get(key) is None:
                        entry[key] = cls[key]
        standard = _standard_terminology()
        for entry in table.values():
            std = standard(entry.get("name", "")) if standard else None
            if std:
                entry.setdefault("color", std["color"])
                if entry.get("terminology") is None:
                    entry["terminology"] = std["terminology"]
        return table

    def _find_previous(self, input_node):
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") - 1, -1, -1):
            node = self.scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
            if node.GetAttribute(INPUT_ATTRIBUTE) == input_node.GetID():
                return node
        return None

    def _import(self, label_path: str, report: dict):
        nodes = self._pending["nodes"]
        reference = nodes[0]
        warnings: list[str] = []
        label = slicer.vtkMRMLLabelMapVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(label_path)
        if not storage.ReadData(label) or label.GetImageData() is None:
            raise OSError("the label map written by the library cannot be read")
        warnings += _grid_mismatch(reference, label)
        _ensure_conversion_rules()

        segmentation_node = self._find_previous(reference) if self._pending.get("replace") else None
        added = segmentation_node is None
        if added:
            segmentation_node = slicer.vtkMRMLSegmentationNode()
            segmentation_node.SetName(self.scene.GenerateUniqueName(f"{reference.GetName()} segmentation"))
            self.scene.AddNode(segmentation_node)
        try:
            segmentation = segmentation_node.GetSegmentation()
            with _batch_modify(segmentation_node):
                segmentation.RemoveAllSegments()
                if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentation_node, ""):
                    raise RuntimeError("Slicer could not import the label map")
                classes = self._class_table(report)
                present = {}
                for i in range(segmentation.GetNumberOfSegments()):
                    segment_id = segmentation.GetNthSegmentID(i)
                    present[segmentation.GetSegment(segment_id).GetLabelValue()] = segment_id
                unknown = sorted(v for v in present if v not in classes)
                if unknown:
                    warnings.append(f"label values {unknown} are not classes of the model")
                for value in sorted(v for v in classes if v != 0):
                    cls = classes[value]
                    name = str(cls.get("name") or f"label {value}")
                    color = normalise_color(cls.get("color")) or (0.5, 0.5, 0.5)
                    segment_id = present.get(value)
                    if segment_id is None:  # a class of the model with no voxel here: keep it, empty
                        segment_id = segmentation.AddEmptySegment(_segment_id(name, segmentation), name, color)
                    segment = segmentation.GetSegment(segment_id)
                    segment.SetName(name)
                    segment.SetColor(*color)
                    segment.SetNameAutoGenerated(False)  # they come from the card: Slicer must keep them
                    segment.SetColorAutoGenerated(False)
                    segment.SetLabelValue(value)
                    terminology = cls.get("terminology")
                    if terminology:
                        text = _terminology_string(terminology)
                        if text:
                            segment.SetTerminology(text)
                        else:
                            warnings.append(f"class '{name}': its terminology cannot be used")
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
            if not segmentation_node.GetDisplayNode():
                segmentation_node.CreateDefaultDisplayNodes()
            if self.create_closed_surface and not segmentation_node.CreateClosedSurfaceRepresentation():
                warnings.append("no closed surface (3D) representation could be made")
            self._set_provenance(segmentation_node, nodes, report)
        except Exception:
            if added:
                self.scene.RemoveNode(segmentation_node)
            raise
        return segmentation_node, warnings

    def _set_provenance(self, node, inputs, report: dict) -> None:
        model = report.get("model") or {}
        domain = report.get("domain") or {}
        attributes = {
            INPUT_ATTRIBUTE: inputs[0].GetID() or "",
            "InputVolumeIDs": json.dumps([n.GetID() for n in inputs]),
            "InputVolumeNames": json.dumps([n.GetName() for n in inputs]),
            "Model": str(model.get("name", "")),
            "ModelVersion": str(model.get("version", "")),
            "ModelSHA256": str(model.get("sha256", "")),
            "Device": str(report.get("device", "")),
            "DomainMode": str(domain.get("mode", "")),
            "Domain": str(domain.get("chosen", "")),
            "DomainProbabilities": json.dumps(domain.get("probabilities") or {}, sort_keys=True),
            "Unfamiliar": "true" if domain.get("unfamiliar") else "false",
            "GateUnsure": "true" if domain.get("unsure") else "false",
            "UnfamiliarScore": "" if domain.get("unfamiliar_score") is None else str(domain.get("unfamiliar_score")),
            "Created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "Report": json.dumps(_without_paths(report), sort_keys=True),
        }
        for key, value in attributes.items():
            node.SetAttribute(key if key.startswith(ATTRIBUTE_PREFIX) else ATTRIBUTE_PREFIX + key, value)


# -- helpers ------------------------------------------------------------------------------------

def _standard_terminology():
    """uharmony.model.terminology.standard_class, or None when the library is not importable."""
    try:
        ensure_library_importable()
        from uharmony.model.terminology import standard_class
    except ImportError:
        return None
    return standard_class


def _terminology_string(terminology) -> str | None:
    if isinstance(terminology, str):  # already Slicer's format
        return terminology if terminology.count("~") == 6 else None
    try:
        ensure_library_importable()
        from uharmony.model.terminology import slicer_terminology_entry
    except ImportError:
        return None
    try:
        return slicer_terminology_entry(terminology)
    except ValueError:
        return None


def _segment_id(name: str, segmentation) -> str:
    base = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "segment"
    candidate, n = base, 1
    while segmentation.GetSegment(candidate) is not None:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _without_paths(report: dict) -> dict:
    """The report minus the temporary file paths (they are deleted; keep the scene clean)."""
    clean = {k: v for k, v in report.items() if k not in ("inputs", "output", "outputs")}
    if isinstance(clean.get("model"), dict):
        clean["model"] = {k: v for k, v in clean["model"].items()}
    return clean


def check_volume_node(node, action: str = "segmented") -> None:
    """Refuse (ValueError, one line naming the volume) what the library cannot take as an image."""
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"{node.GetName()}: only scalar (grey-level) volumes can be {action}")
    if node.GetImageData() is None or node.GetImageData().GetNumberOfPoints() == 0:
        raise ValueError(f"{node.GetName()}: the volume has no image data")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"{node.GetName()}: a volume with several components per voxel (colour/vector) "
                         f"cannot be {action}; give one scalar volume per channel")
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise ValueError(
            f"{node.GetName()}: the volume is under a non-linear transform; harden it first "
            "(Data module: right-click the volume, 'Harden transform') or remove the transform")


def hardened_copy(node):
    """`node` itself when it has no parent transform; else a new volume node outside the scene that
    shares its voxels, with the (linear) transform applied to its IJK-to-RAS. The node is never modified."""
    if node.GetParentTransformNode() is None:
        return node
    source = node.CreateNodeInstance() if node.IsA("vtkMRMLLabelMapVolumeNode") else slicer.vtkMRMLScalarVolumeNode()
    source.SetName(node.GetName())
    source.SetAndObserveImageData(node.GetImageData())
    source.SetIJKToRASMatrix(_world_matrix(node))
    return source


def _world_matrix(node):
    """IJK-to-world of a volume node: its IJK-to-RAS, under its (linear) parent transform."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    transform = node.GetParentTransformNode()
    if transform is not None and transform.IsTransformToWorldLinear():
        to_world, hardened = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        vtk.vtkMatrix4x4.Multiply4x4(to_world, matrix, hardened)
        matrix = hardened
    return matrix


def _corner_points(matrix, dims) -> list[tuple[float, float, float]]:
    points = []
    for i in (0, dims[0] - 1):
        for j in (0, dims[1] - 1):
            for k in (0, dims[2] - 1):
                p = matrix.MultiplyPoint((float(i), float(j), float(k), 1.0))
                points.append((round(p[0], 2), round(p[1], 2), round(p[2], 2)))
    return sorted(points)


def _grid_mismatch(reference, label, tolerance_mm: float = 0.01) -> list[str]:
    """A warning when the label map does not cover the input's voxel grid in world space.

    Compared in world space, not index space: Slicer's reader may flip an axis of a left-handed
    (det < 0) file and the voxel order with it, which is the same grid.
    """
    ref_dims = reference.GetImageData().GetDimensions()
    lab_dims = label.GetImageData().GetDimensions()
    ref_corners = _corner_points(_world_matrix(reference), ref_dims)
    lab_corners = _corner_points(_world_matrix(label), lab_dims)
    worst = max(max(abs(a - b) for a, b in zip(p, q)) for p, q in zip(ref_corners, lab_corners))
    if sorted(ref_dims) != sorted(lab_dims) or worst > max(tolerance_mm, 0.01):
        return [f"the label map is not on the input's voxel grid (size {tuple(lab_dims)} vs {tuple(ref_dims)}, "
                f"corners up to {worst:.3g} mm apart); it is placed by its own geometry"]
    return []


_RULES_LOCK = threading.Lock()


def _ensure_conversion_rules() -> None:
    """Slicer registers labelmap<->surface converters at startup; bare slicer-core does not."""
    with _RULES_LOCK:
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        names = {type(rule).__name__ for rule in factory.GetConverterRules()}
        for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                    slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            if cls.__name__ not in names:
                factory.RegisterConverterRule(cls())


class _batch_modify:
    """StartModify/EndModify around many segment edits (one display update)."""

    def __init__(self, node):
        self.node = node

    def __enter__(self):
        self.state = self.node.StartModify()
        return self.node

    def __exit__(self, *exc):
        self.node.EndModify(self.state)
        return False
