"""Whole-volume segmentation: image file(s) in, label map on the input's own grid + report out.

Stages (each timed, each reported as progress): read -> preprocess (RAS order, model spacing,
normalisation) -> gate (domain probabilities on a low-resolution copy) -> infer (MONAI sliding window,
Gaussian blending, one domain's routing) -> postprocess (unfamiliar-input score, logits back onto the
input grid, argmax, volumes) -> write (atomic: nothing is left half-written).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from uharmony import __version__
from uharmony.augment.views import fov_view
from uharmony.data.io import Volume, atomic_output, check_output_path, read_header, read_volume, resample_onto
from uharmony.data.preprocess import from_model_grid, normalize_intensity, plan_grid, to_model_grid
from uharmony.device import autocast, available_memory_bytes, choose_device, is_out_of_memory
from uharmony.errors import BadInputError, ExitCode, OutOfMemoryError, UHarmonyError
from uharmony.infer.postprocess import drop_small_components
from uharmony.model import familiarity
from uharmony.model.package import load_model
from uharmony.model.registry import resolve_model
from uharmony.progress import Reporter

STAGES = ("read", "preprocess", "gate", "infer", "postprocess", "write")
UNSURE_MARGIN = 0.25  # the gate's first two choices closer than this in probability: reported as unsure


@dataclass
class GateResult:
    probabilities: dict[str, float]
    chosen: str
    mode: str  # "auto" or "forced"
    unfamiliar: bool
    score: float
    threshold: float

    @property
    def unsure(self) -> bool:
        """The gate chose, but its runner-up was close: the user should pick the domain if they know it.

        A margin rather than a floor on the first probability, so that it means the same for two domains
        as for four (the default brain model: 1 of 40 held-out synthetic heads, no real T1 scan)."""
        top = sorted(self.probabilities.values(), reverse=True)[:2]
        return self.mode == "auto" and len(top) == 2 and top[0] - top[1] < UNSURE_MARGIN

    def to_dict(self) -> dict:
        return {"mode": self.mode, "chosen": self.chosen, "probabilities": self.probabilities, "unsure": self.unsure,
                "unfamiliar": self.unfamiliar, "unfamiliar_score": self.score, "unfamiliar_threshold": self.threshold}


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 on the reference input's grid
    reference: Volume
    gate: GateResult
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    removed_ml: dict[str, float] = field(default_factory=dict)  # per class: small components relabelled


class Segmenter:
    """Loads a model once and segments any number of inputs with it."""

    def __init__(self, model: str | Path | None = None, device: str = "auto", reporter: Reporter | None = None,
                 max_memory: int | None = None, min_component_ml: dict[str, float] | None = None):
        """``min_component_ml``: per class name, the smallest component kept (0: keep all); overrides and
        adds to the card's `postprocess.min_component_ml`."""
        self.reporter = reporter or Reporter("none")
        self.device = choose_device(device)
        self.model_dir = resolve_model(model)
        self.model, self.card = load_model(self.model_dir, self.device)
        self.max_memory = max_memory
        inp = self.card["input"]
        self.spacing = tuple(float(s) for s in inp["spacing_mm"])
        self.patch = tuple(int(s) for s in inp["patch_size"])
        self.overlap = float(inp.get("overlap", 0.5))
        self.sw_batch_size = int(inp.get("sw_batch_size", 1))
        self.classes = sorted(self.card["classes"], key=lambda c: c["value"])
        self.model_sha256 = self.card["weights"]["sha256"]  # load_model checked the file against it
        named = {c["name"].lower(): c for c in self.classes if c["value"] != 0}  # names match case-insensitively
        asked = [*self.card.get("postprocess", {}).get("min_component_ml", {}).items(), *(min_component_ml or {}).items()]
        unknown = [n for n, _ in asked if n.lower() not in named]
        if unknown:
            raise UHarmonyError(f"no class {unknown[0]!r} to clean up in this model (it has: "
                                f"{', '.join(c['name'] for c in self.classes[1:])})", self.model_dir, code=ExitCode.USAGE)
        floors = {named[n.lower()]["name"]: float(v) for n, v in asked}  # the option's entries come last: they win
        self.min_component_ml = {n: v for n, v in floors.items() if v > 0}
        self._floor_values = {named[n.lower()]["value"]: v for n, v in self.min_component_ml.items()}

    # -- public -------------------------------------------------------------------------------
    @property
    def channel_names(self) -> list[str]:
        return [c["name"] for c in self.card["input"]["channels"]]

    def segment_files(self, inputs: list[str | Path], output: str | Path, *, report_path: str | Path | None = None,
                      preview_path: str | Path | None = None, domain: str = "auto", overwrite: bool = False) -> dict:
        """Segment one subject (one file per channel) and write the label map, report and preview."""
        t_start = time.perf_counter()
        outputs = [Path(output)] + [Path(p) for p in (report_path, preview_path) if p]
        for p in outputs:
            check_output_path(p, overwrite=overwrite)
        if len({p.resolve() for p in outputs}) != len(outputs):
            raise BadInputError("the label map, report and preview must be different files", output)
        for p in inputs:
            if Path(p).resolve() in {o.resolve() for o in outputs}:
                raise BadInputError("is both an input and an output", p)
        pred = self.predict_files(inputs, domain=domain)
        t0 = time.perf_counter()
        self.reporter.progress("write", 0, 1)
        report = self.make_report(pred, inputs, output)
        # Write everything to temporaries first, then rename: all outputs or none.
        from uharmony.data.io import write_volume

        written = []
        try:
            write_volume(output, pred.labels, pred.reference.affine, like=pred.reference, overwrite=overwrite)
            written.append(Path(output))
            if preview_path:
                from uharmony.infer.preview import save_preview

                save_preview(pred.reference, pred.labels, self.classes, preview_path,
                             title=f"{Path(inputs[0]).name}: {pred.gate.chosen}")
                written.append(Path(preview_path))
            pred.timings["write"] = time.perf_counter() - t0
            pred.timings["total"] = time.perf_counter() - t_start
            report["timings_s"] = {k: round(v, 4) for k, v in pred.timings.items()}
            if report_path:
                with atomic_output(report_path) as tmp:
                    Path(tmp).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
                written.append(Path(report_path))
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        self.reporter.progress("write", 1, 1)
        report["outputs"] = [str(p) for p in written]
        return report

    def predict_files(self, inputs: list[str | Path], domain: str = "auto") -> Prediction:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.reporter.progress("read", 0, len(inputs))
        volumes = self._read_inputs(inputs)
        self.reporter.progress("read", len(inputs), len(inputs))
        timings["read"] = time.perf_counter() - t0
        return self.predict_volumes(volumes, domain=domain, timings=timings)

    def predict_volumes(self, volumes: list[Volume], domain: str = "auto", timings: dict | None = None) -> Prediction:
        timings = timings if timings is not None else {}
        notes: list[str] = []
        reference = volumes[0]
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.reporter.progress("preprocess", 0, 1)
            grid = plan_grid(reference.shape, reference.affine, self.spacing)
            image = torch.from_numpy(np.stack([v.array for v in volumes]).astype(np.float32, copy=False))
            x = normalize_intensity(to_model_grid(image.to(self.device), grid), self.card["input"]["normalization"])
            del image
            self.reporter.progress("preprocess", 1, 1)
            timings["preprocess"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            self.reporter.progress("gate", 0, 1)
            gate = self.run_gate(x, domain)
            self.reporter.progress("gate", 1, 1)
            timings["gate"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            try:
                logits = self.run_network(x, gate.chosen)
            except Exception as e:  # CUDA/MPS out of memory: say so and finish on the CPU
                if self.device.type == "cpu" or not is_out_of_memory(e):
                    raise
                note = f"{self.device.type} ran out of memory; finished on the CPU instead"
                self.reporter.log(f"warning: {note}")
                notes.append(note)
                self._move_to_cpu()
                x = x.cpu()
                logits = self.run_network(x, gate.chosen)
            timings["network"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            self.reporter.progress("postprocess", 0, 1)
            self._contrast_familiarity(x, logits[0], gate)
            scores = from_model_grid(logits[0].float(), grid)
            labels = scores.argmax(0)
            floors = {v: math.ceil(ml / reference.voxel_ml) for v, ml in self._floor_values.items()}
            removed = drop_small_components(scores, labels, floors) if floors else {}
            labels = labels.to(torch.uint8).cpu().numpy()
            del scores
            self.reporter.progress("postprocess", 1, 1)
            timings["postprocess"] = time.perf_counter() - t0
        removed_ml = {c["name"]: round(removed[c["value"]] * reference.voxel_ml, 3)
                      for c in self.classes if c["value"] in removed}
        return Prediction(labels, reference, gate, str(self.device), timings, notes, removed_ml)

    # -- stages -------------------------------------------------------------------------------
    def _read_inputs(self, inputs: list[str | Path]) -> list[Volume]:
        want = len(self.channel_names)
        if len(inputs) != want:
            raise BadInputError(
                f"the model expects {want} input image(s) ({', '.join(self.channel_names)}), "
                f"{len(inputs)} were given", inputs[0] if inputs else None)
        # Estimate the peak before loading anything: inputs + model-grid copies + logits on the input grid
        # (+ the label map, and the component map when small components are dropped).
        shape, affine, _ = read_header(inputs[0])
        n_in = int(np.prod(shape))
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        n_model = int(np.prod([max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, self.spacing)]))
        n_classes = len(self.classes)
        need = 4 * (n_in * (want + n_classes + 1) + n_model * (want * 3 + n_classes * 3)) + n_in
        need += 13 * n_in if self._floor_values else 0  # int64 argmax before the uint8 copy, int32 components, a mask
        limit = self.max_memory if self.max_memory is not None else available_memory_bytes()
        if need > limit:
            raise OutOfMemoryError(f"needs about {need / 2**30:.2f} GiB of memory to segment, "
                                   f"{limit / 2**30:.2f} GiB available", inputs[0])
        volumes = []
        for i, path in enumerate(inputs):
            volumes.append(read_volume(path, max_bytes=limit))
            self.reporter.progress("read", i + 1, len(inputs))
        for i in range(1, len(volumes)):
            v = volumes[i]
            same = v.shape == volumes[0].shape and np.allclose(v.affine, volumes[0].affine, atol=1e-3)
            if not same:
                volumes[i] = resample_onto(v, volumes[0])
        return volumes

    def run_gate(self, x: torch.Tensor, domain: str = "auto") -> GateResult:
        names = self.model.domains
        gate = self.model.gate
        scales = [float(s) for s in self.card["gate"].get("fov_views") or [1.0]]
        if 1.0 not in scales:
            scales.append(1.0)
        # several fields of view when the card asks for them (a gate refit with --framing): probabilities
        # averaged over them, and the unfamiliar score is the lowest view's. The threshold bounds single
        # views of familiar scans framed at random, so a scan is familiar when some framing of it is; the
        # as-is view alone flagged real T1 scans padded with air, while masks and label maps score high
        # in every view (docs/model.md).
        small = torch.cat([gate.downsample(fov_view(x, s)[None]) for s in scales])
        logits, feats = gate(small)
        probs = torch.softmax(logits.float(), dim=1).mean(0).tolist()
        score = float(gate.unfamiliar_score(feats).min())
        threshold = float(self.card["gate"]["unfamiliar_threshold"])
        if domain == "auto":
            chosen, mode = names[int(np.argmax(probs))], "auto"
        elif domain in names:
            chosen, mode = domain, "forced"
        else:
            raise UHarmonyError(f"--domain {domain!r} is not a domain of this model (it has: {', '.join(names)})",
                                self.model_dir, code=ExitCode.USAGE)
        return GateResult({n: round(p, 6) for n, p in zip(names, probs)}, chosen, mode, score > threshold,
                          round(score, 4), threshold)

    def _contrast_familiarity(self, x: torch.Tensor, logits: torch.Tensor, gate: GateResult) -> None:
        """Replace the gate-feature score by the contrast-fingerprint score when the card has one."""
        calib = self.card["gate"].get("calibration", {})
        if calib.get("score") != familiarity.SCORE_NAME:
            return
        labels = logits.argmax(0)
        voxel_ml = float(np.prod(self.spacing)) / 1000.0
        feats = familiarity.fingerprint(x, labels, calib["classes"], voxel_ml)
        gate.score = round(familiarity.score(feats, calib["domains"]), 4)
        gate.unfamiliar = gate.score > gate.threshold

    def run_network(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        routing = self.model.routing_from(domain, self.sw_batch_size, self.device)
        total = math.ceil(count_windows(tuple(x.shape[1:]), self.patch, self.overlap) / self.sw_batch_size)
        done = [0]
        self.reporter.progress("infer", 0, total)

        def predictor(patches: torch.Tensor) -> torch.Tensor:
            with autocast(self.device):
                out = self.model(patches, routing[: patches.shape[0]])
            done[0] += 1
            self.reporter.progress("infer", min(done[0], total), total)
            return out

        logits = sliding_window_inference(
            x[None], roi_size=self.patch, sw_batch_size=self.sw_batch_size, predictor=predictor,
            overlap=self.overlap, mode="gaussian", padding_mode="constant", cval=float(x.min()),
        )
        self.reporter.progress("infer", total, total)
        return logits

    def _move_to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.model = self.model.cpu()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- report -------------------------------------------------------------------------------
    def make_report(self, pred: Prediction, inputs, output) -> dict:
        voxel_ml = pred.reference.voxel_ml
        counts = np.bincount(pred.labels.reshape(-1), minlength=len(self.classes))
        classes = []
        for c in self.classes:
            if c["value"] == 0:
                continue
            n = int(counts[c["value"]])
            classes.append({"value": c["value"], "name": c["name"], "voxels": n, "volume_ml": round(n * voxel_ml, 3),
                            "color": c.get("color")})
        return {
            "uharmony_version": __version__,
            "inputs": [str(p) for p in inputs],
            "output": str(output),
            "input_geometry": {"shape": list(pred.reference.shape),
                               "spacing_mm": [round(float(s), 5) for s in pred.reference.spacing]},
            "model": {"name": self.card["name"], "version": self.card["version"], "sha256": self.model_sha256,
                      "path": str(self.model_dir)},
            "device": pred.device,
            "notes": pred.notes,
            "domain": pred.gate.to_dict(),
            "classes": classes,
            "postprocess": {"min_component_ml": self.min_component_ml, "removed_ml": pred.removed_ml},
            "timings_s": {k: round(v, 4) for k, v in pred.timings.items()},
            "intended_use": self.card["intended_use"],
            "limitations": self.card["limitations"],
        }


def count_windows(image_size: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many windows MONAI's sliding_window_inference visits (its own scan rule)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = tuple(max(s, r) for s, r in zip(image_size, roi))
    interval = _get_scan_interval(padded, roi, len(roi), (overlap,) * len(roi))
    return len(dense_patch_slices(padded, roi, interval))
