"""Progress reporting: a tqdm bar for people, plain lines for log files, JSON lines (protocol v1) for
the Slicer modules.

``auto`` is a bar on a terminal and ``log`` otherwise: a run under nohup or a scheduler writes one line
per stage at most every LOG_EVERY_S seconds (done/total, elapsed, time left), and nothing for stages
that end sooner, so quick commands stay quiet.

Protocol (DESIGN.md): with ``--progress jsonl`` stdout carries only JSON objects, one per line,
each with ``"v": 1`` and an ``"event"``: ``progress`` (stage, done, total), ``metric``, ``round``,
``result`` (outputs, report), ``error`` (code, message), ``log`` (message). Every other line
(tqdm, MONAI, Flower, warnings) goes to stderr: `Reporter.claim_stdout` moves file descriptor 1 onto
stderr so that even C libraries cannot write into the protocol stream.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any, Callable

PROTOCOL_VERSION = 1
MODES = ("auto", "bar", "log", "jsonl", "none")
LOG_EVERY_S = 60.0


class Reporter:
    """Sends progress, metrics and results either as a terminal bar or as JSON lines."""

    def __init__(self, mode: str = "auto", stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._stream = stream
        self._bars: dict[str, Any] = {}
        self._clock = clock
        self._logged: dict[str, list[float]] = {}  # stage -> [start time, first done, last line's time]

    # -- stream ownership -------------------------------------------------------------------
    def claim_stdout(self) -> None:
        """In jsonl mode keep a private copy of stdout and point fd 1 at stderr."""
        if self.mode != "jsonl" or self._stream is not None:
            return
        sys.stdout.flush()
        self._stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def _emit(self, event: str, **fields: Any) -> None:
        if self.mode != "jsonl":
            return
        stream = self._stream or sys.stdout
        stream.write(json.dumps({"v": PROTOCOL_VERSION, "event": event, **fields}, default=_jsonable) + "\n")
        stream.flush()

    # -- events -----------------------------------------------------------------------------
    def progress(self, stage: str, done: int, total: int) -> None:
        if self.mode == "jsonl":
            self._emit("progress", stage=stage, done=int(done), total=int(total))
        elif self.mode == "bar":
            bar = self._bars.get(stage)
            if bar is None:
                from tqdm import tqdm

                bar = self._bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
            bar.total = total
            bar.n = done
            bar.refresh()
            if done >= total:
                bar.close()
                del self._bars[stage]
        elif self.mode == "log":
            self._log_progress(stage, int(done), int(total))

    def _log_progress(self, stage: str, done: int, total: int) -> None:
        now = self._clock()
        start, first, last = self._logged.setdefault(stage, [now, done, now])
        finished = done >= total
        if now - last >= LOG_EVERY_S or (finished and now - start >= LOG_EVERY_S):
            elapsed = now - start
            line = f"{stage}: {done}/{total} ({100 * done // max(total, 1)} %), {_clock_text(elapsed)} elapsed"
            if not finished and done > first:
                line += f", ~{_clock_text(elapsed / (done - first) * (total - done))} left"
            print(line, file=sys.stderr, flush=True)
            self._logged[stage][2] = now
        if finished:
            del self._logged[stage]

    def metric(self, **fields: Any) -> None:
        self._emit("metric", **fields)

    def round(self, **fields: Any) -> None:
        self._emit("round", **fields)

    def result(self, outputs: list[str], report: dict | None = None, **fields: Any) -> None:
        self._emit("result", outputs=[str(o) for o in outputs], report=report, **fields)

    def error(self, code: int, message: str, **fields: Any) -> None:
        self._emit("error", code=int(code), message=message, **fields)

    def log(self, message: str) -> None:
        """A human-readable line: stderr always, and a ``log`` event in jsonl mode."""
        if self.mode == "jsonl":
            self._emit("log", message=message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._logged.clear()


def _clock_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _jsonable(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
