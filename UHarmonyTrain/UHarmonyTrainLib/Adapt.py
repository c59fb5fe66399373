"""Adapt a model to the user's labelled cases, without Qt: export, `uharmony adapt`, save the model.

Usage (Slicer's Python console, a script, a test)::

    from UHarmonySegmentLib import SubprocessRunner
    from UHarmonyTrainLib import AdaptLogic, AdaptRequest, SceneCase
    logic = AdaptLogic(slicer.mrmlScene, SubprocessRunner())
    request = AdaptRequest(base_model="brain", cases=[SceneCase(volume, segmentation)], domain="mri-swi",
                           new_modality=True, steps=100, model_name="brain-swi")
    result = logic.adapt_sync(request)
    print(result.model_name, result.history.summary())

Steps, each in a separate process so the UI never waits:
1. the cases go into a private temporary folder (mode 0700): scene cases through storage nodes with
   a ``dataset.json``, a user's datalist as a copy with absolute paths (and the chosen domain);
2. ``<python> -m uharmony adapt --model BASE --data ... [--keep ...] --out <temp>/out/NAME
   --config <temp>/adapt.toml --progress jsonl``; its ``metric`` events feed `MetricHistory`
   (the live loss/Dice plot, and the before/after Dice of phase "before"/"after");
3. ``<python> -m uharmony models add <temp>/out/NAME --name NAME --json``: the same validation and
   trusted-hash record as `uharmony models add` and UHarmony Segment's "Add model...", so Segment
   lists the new model.
The temporary folder (patient data, the unregistered model, its checkpoints) is deleted at the end
of every run: success, failure or cancel. Cancel stops the running process (SIGTERM, then kill).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from UHarmonySegmentLib.Library import CommandError
from UHarmonySegmentLib.Signal import Signal
from UHarmonySegmentLib.TempFolders import make_private_dir

from .Cases import (
    SceneCase,
    check_classes,
    check_domain,
    check_scene_cases,
    copy_datalist,
    datalist_classes,
    export_scene_cases,
    read_datalist,
    resolve_datalist,
    segment_names,
)
from .Jobs import JobLogic, JobResult, JobTask
from .Metrics import MetricHistory

MAX_STEPS = 100000
#: Share of the progress bar per stage (validation passes keep the bar where it is).
ADAPT_STAGES = {"load": (0.0, 0.05), "train": (0.05, 0.95), "save": (0.95, 1.0)}


@dataclass
class AdaptRequest:
    """What to adapt, on what, how long, and under which name to save it."""

    base_model: str = "brain"  # a name of `uharmony models list` (the bundled default brain model) or a folder
    cases: list[SceneCase] = field(default_factory=list)  # labelled scene cases, or:
    datalist: str | None = None  # a dataset.json (or a folder holding one)
    domain: str = ""  # the domain of the cases: a new modality's name, or one of the model's domains
    new_modality: bool = False
    new_classes: bool = False
    keep: list[str] = field(default_factory=list)  # datalists of old domains to replay (--keep)
    steps: int = 100
    evaluate_every: int = 0  # points of the live plot: evaluate every N steps (0: only before and after)
    device: str = "auto"
    model_name: str = ""
    overwrite: bool = False
    base_card: dict | None = None  # the base model's card (read with `uharmony info` when None)


@dataclass
class AdaptResult(JobResult):
    model_name: str | None = None
    model_path: str | None = None
    sha256: str | None = None
    history: MetricHistory = field(default_factory=MetricHistory)
    card: dict | None = None


def valid_model_name(name: str) -> str | None:
    """Why `name` cannot name a model folder, or None."""
    if not name or not name.strip():
        return "give the adapted model a name"
    if name != name.strip() or "/" in name or "\\" in name or name.startswith(".") or os.sep in name:
        return f"'{name}' cannot name a model folder (no slashes, no leading dot or spaces)"
    return None


def config_text(steps: int, evaluate_every: int) -> str:
    """The adapt config (TOML): the budget, evaluation points for the plot, no checkpoints (the
    temporary folder they would go to is deleted after the run anyway)."""
    return f"steps = {int(steps)}\nval_every = {int(evaluate_every)}\ncheckpoint_every = 0\n"


class AdaptLogic(JobLogic):
    """Adapt a model package to labelled cases; the result goes into the user's model folder.

    Signals (besides progress/log/finished of `JobLogic`): ``metric(history)`` after each metric event.
    """

    def __init__(self, scene, process_runner, **kwargs):
        super().__init__(process_runner, **kwargs)
        self.scene = scene
        self.history = MetricHistory()
        self.metric = Signal("history")
        self.parser.metric.connect(self._on_metric)
        self._model_folder: str | None = None
        self._stage_floor = 0.0

    # -- helpers for the widget -----------------------------------------------------------------
    def model_folder(self) -> str:
        """The user's model folder (`uharmony models where`), where adapted models go."""
        if self._model_folder is None:
            self._model_folder = self.commands.call_sync(["models", "where"], parse_json=False).strip()
        return self._model_folder

    def base_card(self, request: AdaptRequest) -> dict:
        if request.base_card is None:
            request.base_card = self.commands.model_info(request.base_model)
        return request.base_card

    def command(self, request: AdaptRequest, data: list[str], out: str, config: str) -> list[str]:
        args = ["adapt", "--model", request.base_model, "--data", *data]
        if request.keep:
            args += ["--keep", *[resolve_datalist(k) for k in request.keep]]
        args += ["--out", out, "--config", config, "--progress", "jsonl", "--device", request.device or "auto"]
        return self.library_args(*args)

    # -- checks -----------------------------------------------------------------------------------
    def check(self, request: AdaptRequest) -> list[str]:
        """Every problem that can be found before running, one line each (empty: good to go)."""
        problems = []
        reason = valid_model_name(request.model_name)
        if reason:
            problems.append(reason)
        elif not request.overwrite:
            try:
                if os.path.exists(os.path.join(self.model_folder(), request.model_name)):
                    problems.append(f"a model named '{request.model_name}' is already in your model folder: "
                                    "choose another name (or allow replacing it)")
            except CommandError as exc:
                problems.append(f"cannot find your model folder: {exc}")
        if not 1 <= int(request.steps) <= MAX_STEPS:
            problems.append(f"the budget must be 1 to {MAX_STEPS} steps")
        if int(request.evaluate_every) < 0:
            problems.append("'evaluate every' cannot be negative")
        try:
            card = self.base_card(request)
        except CommandError as exc:
            return problems + [f"base model {request.base_model}: {exc.message or exc}"]
        base_domains = [d.get("name") for d in card.get("domains") or [] if isinstance(d, dict)]
        base_classes = _class_names(card)
        channels = len((card.get("input") or {}).get("channels") or [None])
        if request.datalist and request.cases:
            problems.append("give either scene cases or a datalist, not both")
        elif request.datalist:
            try:
                doc = read_datalist(request.datalist)
            except ValueError as exc:
                problems.append(str(exc))
            else:
                domain = request.domain or str(doc.get("domain") or "")
                problems += check_domain(domain, request.new_modality, base_domains)
                problems += check_classes(datalist_classes(doc), request.new_classes, base_classes,
                                          os.path.basename(resolve_datalist(request.datalist)))
        else:
            case_problems = check_scene_cases(request.cases, channels)
            problems += case_problems
            problems += check_domain(request.domain, request.new_modality, base_domains)
            if not case_problems:
                names = list(dict.fromkeys(n for c in request.cases for n in segment_names(c.segmentation)))
                problems += check_classes(names, request.new_classes, base_classes, "the scene cases")
        for keep in request.keep:
            try:
                resolve_datalist(keep)
            except ValueError as exc:
                problems.append(f"replay datalist: {exc}")
        return problems

    # -- running ----------------------------------------------------------------------------------
    def adapt(self, request: AdaptRequest, on_progress: Callable | None = None, on_metric: Callable | None = None,
              on_log: Callable | None = None, on_finished: Callable[[AdaptResult], None] | None = None) -> JobTask:
        """Start; returns at once. `on_finished(AdaptResult)` is called exactly once."""
        task = self._begin({"progress": on_progress, "metric": on_metric, "log": on_log, "finished": on_finished})
        self.history = MetricHistory()
        self._stage_floor = 0.0

        def start():
            problems = self.check(request)
            if problems:
                raise ValueError("\n".join(problems))
            task.temp_dir = make_private_dir(self.temp_root, "uharmony-adapt-")
            data_dir, out_dir = os.path.join(task.temp_dir, "data"), os.path.join(task.temp_dir, "out")
            os.mkdir(data_dir, 0o700)
            os.mkdir(out_dir, 0o700)
            card = request.base_card or {}
            if request.datalist:
                data = [copy_datalist(request.datalist, data_dir, request.domain or None)]
            else:
                channel = ((card.get("input") or {}).get("channels") or [{"name": "image"}])[0]
                exported = export_scene_cases(request.cases, data_dir, request.domain, _class_names(card),
                                              channel_name=str(channel.get("name", "image")) if isinstance(channel, dict) else "image")
                for note in exported.notes:
                    self._emit_log(f"note: {note}")
                self._emit_log(f"exported {exported.cases} case(s); classes: "
                               + ", ".join(f"{v} {n}" for v, n in exported.labels.items() if v))
                data = exported.datalists
            config = os.path.join(task.temp_dir, "adapt.toml")
            with open(config, "w", encoding="utf-8") as f:
                f.write(config_text(request.steps, request.evaluate_every))
            out = os.path.join(out_dir, request.model_name)
            self._run(self.command(request, data, out, config), lambda code: self._adapt_ended(code, request, out))

        return self._start_safely(task, start, lambda message: AdaptResult("failed", message, history=self.history))

    def adapt_sync(self, request: AdaptRequest, timeout: float | None = None, **kwargs) -> AdaptResult:
        """Adapt and wait (scripts, self-tests); the result says whether it succeeded."""
        task = self.adapt(request, **kwargs)
        result = task.wait(timeout)
        if result is None:
            task.cancel()
            result = task.wait(30) or AdaptResult("failed", "timed out", history=self.history)
        return result

    # -- steps ------------------------------------------------------------------------------------
    def _adapt_ended(self, exit_code: int, request: AdaptRequest, out: str) -> None:
        if self._cancelled(exit_code):
            self._finish(AdaptResult("cancelled", "Cancelled; nothing was added to your model folder.", exit_code,
                                     history=self.history))
            return
        if exit_code != 0:
            self._finish(AdaptResult("failed", self._failure_message(exit_code, "Adaptation"), exit_code,
                                     history=self.history))
            return
        if not os.path.isfile(os.path.join(out, "card.json")):
            self._finish(AdaptResult("failed", "The adaptation finished but wrote no model.", exit_code,
                                     history=self.history))
            return
        card = (self.parser.last_result or {}).get("report") or {}
        card = card.get("card") if isinstance(card, dict) else None
        lines: list[str] = []
        self._on_progress("save", 0, 1)
        args = self.library_args("models", "add", out, "--name", request.model_name, "--json",
                                 *(["--overwrite"] if request.overwrite else []))
        self.parser.reset()
        self._run(args, lambda code: self._save_ended(code, lines, card), on_line=lines.append)

    def _save_ended(self, exit_code: int, lines: list[str], card: dict | None) -> None:
        if self._cancelled(exit_code):
            self._finish(AdaptResult("cancelled", "Cancelled while saving; nothing was added to your model folder.",
                                     exit_code, history=self.history))
            return
        if exit_code != 0:
            self._finish(AdaptResult("failed", "The adapted model could not be saved: "
                                     + self._failure_message(exit_code, "Saving"), exit_code, history=self.history))
            return
        entry = {}
        for line in reversed(lines):
            try:
                entry = json.loads(line)
                break
            except ValueError:
                continue
        self._on_progress("save", 1, 1)
        summary = self.history.summary()
        message = f"Saved as '{entry.get('name')}' in your model folder." + (f" {summary}." if summary else "")
        self._finish(AdaptResult("success", message, 0, model_name=entry.get("name"), model_path=entry.get("path"),
                                 sha256=entry.get("sha256"), history=self.history, card=card))

    # -- events -----------------------------------------------------------------------------------
    def _fraction(self, stage: str, done: int, total: int) -> float:
        if stage in ADAPT_STAGES and total > 0:
            low, high = ADAPT_STAGES[stage]
            self._stage_floor = max(self._stage_floor, low + (high - low) * max(0.0, min(1.0, done / total)))
        return self._stage_floor

    def _on_metric(self, event: dict) -> None:
        self.history.add(event)
        self.metric.emit(self.history)
        self._callback("metric", self.history)


def _class_names(card: dict | None) -> list[str]:
    classes = sorted((c for c in (card or {}).get("classes") or [] if isinstance(c, dict)), key=lambda c: c.get("value", 0))
    names = [""] * (max((int(c.get("value", 0)) for c in classes), default=0) + 1)
    for c in classes:
        names[int(c.get("value", 0))] = str(c.get("name", ""))
    return names
