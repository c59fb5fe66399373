"""Reader of the library's progress protocol (version 1): one JSON object per stdout line.

``{"v":1,"event":"progress","stage":"infer","done":3,"total":12}``, ``log``, ``metric``, ``round``,
``result`` (outputs, report) and ``error`` (code, message). See DESIGN.md, "Progress protocol".
"""

from __future__ import annotations

import json
from typing import Any

from .Signal import Signal

PROTOCOL_VERSION = 1

#: Segment stages in order, with the share of the whole run each one usually takes.
SEGMENT_STAGES = {"read": 0.05, "preprocess": 0.10, "gate": 0.05, "infer": 0.65, "postprocess": 0.10, "write": 0.05}


class ProgressParser:
    """Feed it stdout lines; it emits one signal per event.

    Signals: ``progress(stage, done, total)``, ``log(message)``, ``metric(dict)``, ``round(dict)``,
    ``result(outputs, report)``, ``error(code, message)``, ``unparsed(line)`` (a line that is not a
    v1 protocol object: kept for the log, never fatal).
    """

    def __init__(self):
        self.progress = Signal("stage", "done", "total")
        self.log = Signal("message")
        self.metric = Signal("dict")
        self.round = Signal("dict")
        self.result = Signal("outputs", "report")
        self.error = Signal("code", "message")
        self.unparsed = Signal("line")
        self.reset()

    def reset(self) -> None:
        self.last_error: tuple[int, str] | None = None
        self.last_result: dict[str, Any] | None = None
        self.events = 0

    def feed(self, line: str | bytes) -> dict[str, Any] | None:
        """Parse one line; returns the event object, or None when the line is not one."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        text = line.strip()
        if not text:
            return None
        try:
            obj = json.loads(text)
        except ValueError:
            self.unparsed.emit(line)
            return None
        if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION or not isinstance(obj.get("event"), str):
            self.unparsed.emit(line)
            return None
        event = obj["event"]
        if event == "progress":
            try:
                done, total = int(obj.get("done", 0)), int(obj.get("total", 0))
            except (TypeError, ValueError):
                self.unparsed.emit(line)
                return None
            self.progress.emit(str(obj.get("stage", "")), done, total)
        elif event == "log":
            self.log.emit(str(obj.get("message", "")))
        elif event == "metric":
            self.metric.emit({k: v for k, v in obj.items() if k not in ("v", "event")})
        elif event == "round":
            self.round.emit({k: v for k, v in obj.items() if k not in ("v", "event")})
        elif event == "result":
            outputs = [str(o) for o in obj.get("outputs") or []]
            report = obj.get("report") if isinstance(obj.get("report"), dict) else None
            self.last_result = {"outputs": outputs, "report": report}
            self.result.emit(outputs, report)
        elif event == "error":
            try:
                code = int(obj.get("code", 1))
            except (TypeError, ValueError):
                code = 1
            message = str(obj.get("message", ""))
            self.last_error = (code, message)
            self.error.emit(code, message)
        # unknown events of a newer minor revision are ignored on purpose
        self.events += 1
        return obj


def overall_fraction(stage: str, done: int, total: int, stages: dict[str, float] = SEGMENT_STAGES) -> float:
    """0..1 over the whole run, from one stage's done/total (stages in `stages` order)."""
    if stage not in stages:
        return 0.0
    before = 0.0
    for name, weight in stages.items():
        if name == stage:
            break
        before += weight
    within = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    return max(0.0, min(1.0, (before + stages[stage] * within) / sum(stages.values())))
