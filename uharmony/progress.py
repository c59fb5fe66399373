"""Progress reporting: a tqdm bar for people, JSON lines (protocol v1) for the Slicer modules.

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
from typing import IO, Any

PROTOCOL_VERSION = 1
MODES = ("auto", "bar", "jsonl", "none")


class Reporter:
    """Sends progress, metrics and results either as a terminal bar or as JSON lines."""

    def __init__(self, mode: str = "auto", stream: IO[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, not {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "none"
        self.mode = mode
        self._stream = stream
        self._bars: dict[str, Any] = {}

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
