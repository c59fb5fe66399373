"""What the widget shows, computed without Qt so it is tested under pytest.

The widget only copies these strings and rows into its labels, combo boxes and table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Choice:
    label: str
    value: str
    enabled: bool = True
    tooltip: str = ""


def normalise_color(color: Any) -> tuple[float, float, float] | None:
    """[r, g, b] as 0..1 floats (accepts 0..255 too), or None when unusable."""
    try:
        rgb = [float(c) for c in list(color)[:3]]
    except (TypeError, ValueError):
        return None
    if len(rgb) != 3 or any(c < 0 for c in rgb):
        return None
    if any(c > 1.0 for c in rgb):
        rgb = [c / 255.0 for c in rgb]
    return (min(rgb[0], 1.0), min(rgb[1], 1.0), min(rgb[2], 1.0))


def device_choices(devices: dict | None) -> list[Choice]:
    """Auto / GPU / CPU, labelled with what the library detected (None: not detected yet)."""
    if devices is None:
        return [
            Choice("Auto", "auto", True, "GPU when one is available, else CPU (detecting...)"),
            Choice("GPU", "cuda", True, "Detecting GPUs..."),
            Choice("CPU", "cpu", True, "Run on the processor"),
        ]
    auto = str(devices.get("auto") or "cpu")
    cuda = bool(devices.get("cuda"))
    cuda_name = devices.get("cuda_name") or "CUDA"
    auto_label = {"cuda": f"GPU: {cuda_name}", "mps": "GPU: Apple (MPS)"}.get(auto, "CPU")
    choices = [Choice(f"Auto ({auto_label})", "auto", True, "The library picks the fastest device it found")]
    if cuda:
        choices.append(Choice(f"GPU: {cuda_name}", "cuda", True, "Run on the NVIDIA GPU"))
    if devices.get("mps"):
        choices.append(Choice("GPU: Apple (MPS)", "mps", True, "Run on the Apple GPU"))
    if not cuda and not devices.get("mps"):
        choices.append(Choice("GPU (none found)", "cuda", False,
                              "No usable GPU was found: torch has no CUDA/MPS device here"))
    choices.append(Choice("CPU", "cpu", True, "Run on the processor (slower, always available)"))
    return choices


def model_choices(models: list[dict] | None) -> list[Choice]:
    """One entry per model from `models list --json`; unusable ones disabled with the reason."""
    choices = []
    for model in models or []:
        name = str(model.get("name") or model.get("path") or "?")
        problem = model.get("problem")
        trusted = bool(model.get("trusted", True))
        tags = []
        if model.get("bundled"):
            tags.append("bundled")
        if problem:
            tags.append("unusable")
        elif not trusted:
            tags.append("untrusted")
        label = f"{name} ({', '.join(tags)})" if tags else name
        sha = str(model.get("sha256") or "")
        tip = [str(model.get("path") or "")]
        if sha:
            tip.append(f"sha256 {sha[:16]}...")
        if problem:
            tip.append(f"Problem: {problem}")
        elif not trusted:
            tip.append("Not trusted: add it again with 'Add model...' to record its hash")
        choices.append(Choice(label, name, bool(trusted and not problem), "\n".join(t for t in tip if t)))
    # usable first, bundled first among them, then by name
    choices.sort(key=lambda c: (not c.enabled, "(bundled" not in c.label, c.label.lower()))
    return choices


@dataclass
class SegmentRow:
    value: int
    name: str
    color: tuple[float, float, float] | None
    voxels: int | None
    volume_ml: float | None

    @property
    def volume_text(self) -> str:
        return "" if self.volume_ml is None else f"{self.volume_ml:.1f}"


@dataclass
class ResultSummary:
    domain_text: str = ""
    domain_probability: float | None = None
    probabilities_text: str = ""
    unfamiliar: bool = False
    unsure: bool = False  # the gate's first two domains were close (the report's domain.unsure)
    warning_text: str = ""
    rows: list[SegmentRow] = field(default_factory=list)
    intended_use: str = ""
    limitations: list[str] = field(default_factory=list)
    model_text: str = ""
    device_text: str = ""
    cleanup_text: str = ""  # the report's postprocess: which small pieces were relabelled

    @property
    def warned(self) -> bool:
        """Whether the result panel shows its warning box."""
        return self.unfamiliar or self.unsure

    @property
    def limitations_text(self) -> str:
        return "\n".join(f"\u2022 {item}" for item in self.limitations)


def summarize_report(report: dict | None) -> ResultSummary:
    """The result panel's content from a segment report (missing fields give empty text)."""
    summary = ResultSummary()
    if not isinstance(report, dict):
        return summary
    domain = report.get("domain") or {}
    chosen = domain.get("chosen")
    probabilities = domain.get("probabilities") or {}
    if chosen:
        probability = probabilities.get(chosen)
        summary.domain_probability = None if probability is None else float(probability)
        if domain.get("mode", "auto") == "auto":
            summary.domain_text = f"{chosen} ({float(probability):.0%})" if probability is not None else str(chosen)
        else:
            summary.domain_text = f"{chosen} (chosen by the user)"
    ranked = sorted(((str(k), float(v)) for k, v in probabilities.items()), key=lambda kv: -kv[1])
    summary.probabilities_text = ", ".join(f"{k} {v:.0%}" for k, v in ranked)
    summary.unfamiliar = bool(domain.get("unfamiliar"))
    if summary.unfamiliar:
        score, threshold = domain.get("unfamiliar_score"), domain.get("unfamiliar_threshold")
        detail = ""
        if score is not None and threshold is not None:
            detail = f" (score {float(score):.1f}, threshold {float(threshold):.1f})"
        summary.warning_text = (
            "Unfamiliar input: this image does not resemble the data the model was trained on"
            f"{detail}. The segmentation may be wrong; review it carefully before any use."
        )
    summary.unsure = bool(domain.get("unsure"))
    if summary.unsure:
        top_two = ", ".join(f"{k} {v:.0%}" for k, v in ranked[:2])
        note = (f"The domain gate is unsure ({top_two}): if you know the contrast, choose it under Domain "
                "and segment again.")
        summary.warning_text = f"{summary.warning_text}\n{note}" if summary.warning_text else note
    rows = []
    for cls in report.get("classes") or []:
        try:
            value = int(cls.get("value"))
        except (TypeError, ValueError):
            continue
        if value == 0:
            continue
        voxels = cls.get("voxels")
        volume = cls.get("volume_ml")
        rows.append(SegmentRow(value, str(cls.get("name", value)), normalise_color(cls.get("color")),
                               None if voxels is None else int(voxels), None if volume is None else float(volume)))
    summary.rows = sorted(rows, key=lambda r: r.value)
    summary.intended_use = str(report.get("intended_use") or "")
    limitations = report.get("limitations") or []
    summary.limitations = [str(x) for x in limitations] if isinstance(limitations, list) else [str(limitations)]
    model = report.get("model") or {}
    if model:
        parts = [str(model.get("name", "?"))]
        if model.get("version"):
            parts.append(f"v{model['version']}")
        if model.get("sha256"):
            parts.append(f"sha256 {str(model['sha256'])[:12]}")
        summary.model_text = " ".join(parts)
    if report.get("device"):
        summary.device_text = str(report["device"])
    post = report.get("postprocess") or {}
    floors, removed = post.get("min_component_ml") or {}, post.get("removed_ml") or {}
    summary.cleanup_text = "; ".join(
        f"{name} pieces under {float(ml):g} mL relabelled ({float(removed.get(name) or 0):.1f} mL)"
        for name, ml in floors.items())
    return summary


def domain_choices(card: dict | None) -> list[Choice]:
    """'Automatic' (the domain gate decides) and each domain of the model, to override it."""
    choices = [Choice("Automatic (domain gate)", "auto", True,
                      "The model recognises the kind of scan and picks the matching domain")]
    for domain in (card or {}).get("domains") or []:
        name = domain.get("name") if isinstance(domain, dict) else None
        if not name:
            continue
        modality = domain.get("modality")
        label = f"{name} ({modality})" if modality and modality != name else str(name)
        choices.append(Choice(label, str(name), True, f"Force the '{name}' domain (skips the gate's choice)"))
    return choices


def channel_names(card: dict | None) -> list[str]:
    """The model's input channels in order (one input volume each); ['image'] when unknown."""
    channels = ((card or {}).get("input") or {}).get("channels") or []
    names = []
    for index, channel in enumerate(channels):
        name = channel.get("name") if isinstance(channel, dict) else channel
        names.append(str(name or f"channel {index + 1}"))
    return names or ["image"]
