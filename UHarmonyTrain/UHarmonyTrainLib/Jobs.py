"""What both Train logics share: one library process at a time on a `ProcessRunner`, its protocol
events, its stderr for the log, cancel (SIGTERM, then kill: the runner's job), and a private
temporary folder that is deleted whatever happens.

Built from UHarmonySegmentLib's pieces (runner protocol, protocol parser, library location, exit
codes, temporary folders, the task object), so both modules behave the same.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from UHarmonySegmentLib.JsonLines import ProgressParser
from UHarmonySegmentLib.Library import (
    EXIT_CANCELLED,
    LibraryCommands,
    default_python_executable,
    exit_code_text,
    find_library_root,
    process_environment,
)
from UHarmonySegmentLib.Logic import SegmentTask, TaskResult, finish_task
from UHarmonySegmentLib.ProcessRunner import ProcessRunner
from UHarmonySegmentLib.Signal import Signal
from UHarmonySegmentLib.TempFolders import make_private_dir

LOG = logging.getLogger("UHarmony")


JobResult = TaskResult  # a Train job's result: AdaptResult and JoinResult add their outputs


class JobTask(SegmentTask):
    """One run: `cancel()` it, `wait()` for it; `result` is set once it has finished (every step of it)."""

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.result is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            finished = self._logic.runner.wait(remaining)
            if finished and self.result is None and not self._logic.runner.running:
                break  # nothing left that could deliver a result
        return self.result


class JobLogic:
    """Base of AdaptLogic and FederatedLogic (one process at a time; see those for the API).

    :param process_runner: a `ProcessRunner` (QtProcessRunner in Slicer, SubprocessRunner in tests).
    :param python_executable: interpreter that runs ``-m uharmony`` (PythonSlicer in Slicer).
    :param temp_root: where private temporary folders are made (default: the system's).
    :param environment: extra environment variables for the process.
    :param library_module: the module run with ``-m`` (tests may put a stand-in there).
    """

    def __init__(self, process_runner: ProcessRunner, python_executable: str | None = None,
                 temp_root: str | None = None, library_root: str | None = None,
                 environment: dict | None = None, library_module: str = "uharmony",
                 runner_factory: Callable[[], Any] | None = None):
        self.runner = process_runner
        self.python_executable = python_executable or default_python_executable()
        self.temp_root = temp_root
        self.library_root = library_root or find_library_root()
        self.environment = process_environment(self.library_root, extra=environment)
        self.library_module = library_module
        self.commands = LibraryCommands(python_executable=self.python_executable, library_root=self.library_root,
                                        runner_factory=runner_factory or type(process_runner), environment=environment,
                                        module=library_module)
        self.parser = ProgressParser()
        # progress(stage, done, total, fraction), log(message), finished(result)
        self.progress = Signal("stage", "done", "total", "fraction")
        self.log = Signal("message")
        self.finished = Signal("result")
        self._task: JobTask | None = None
        self._callbacks: dict[str, Callable | None] = {}
        self._stderr_tail: list[str] = []
        self._on_exit: Callable[[int], None] | None = None
        self.parser.progress.connect(self._on_progress)
        self.parser.log.connect(self._emit_log)
        self.parser.unparsed.connect(self._emit_log)

    # -- public ---------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._task is not None and self._task.running

    def library_args(self, *cli: str) -> list[str]:
        return [self.python_executable, "-m", self.library_module, *[str(c) for c in cli]]

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- for subclasses -------------------------------------------------------------------------
    def _begin(self, callbacks: dict[str, Callable | None], temp_prefix: str | None = None) -> JobTask:
        if self.is_running:
            raise RuntimeError("a run is already going; cancel it or wait for it")
        task = JobTask(self)
        self._task = task
        self._callbacks = dict(callbacks)
        self._stderr_tail = []
        self.parser.reset()
        if temp_prefix:
            task.temp_dir = make_private_dir(self.temp_root, temp_prefix)
        return task

    def _run(self, args: Sequence[str], on_exit: Callable[[int], None], on_line: Callable[[str], None] | None = None) -> None:
        """Start one library process; `on_exit(code)` runs when it has ended (unless cancelled)."""
        self._on_exit = on_exit
        self.runner.on_line = on_line or self.parser.feed
        self.runner.on_stderr = self._on_stderr
        self.runner.on_finished = self._on_process_finished
        self._emit_log("Running: " + " ".join(os.path.basename(a) if i == 0 else str(a) for i, a in enumerate(args)))
        self.runner.start(list(args), self.environment)
        if self._task is not None:
            self._task.pid = self.runner.pid

    def _failure_message(self, exit_code: int, what: str) -> str:
        if self.parser.last_error is not None:
            message = self.parser.last_error[1]
        else:
            tail = [ln for ln in self._stderr_tail if ln.strip()]
            message = tail[-1].strip() if tail else ""
        text = exit_code_text(exit_code)
        return f"{message} ({text}, exit code {exit_code})" if message else f"{what} failed: {text} (exit code {exit_code})"

    def _cancelled(self, exit_code: int | None) -> bool:
        return (self._task is not None and self._task.cancel_requested) or exit_code == EXIT_CANCELLED

    def _finish(self, result: JobResult) -> None:
        callbacks, self._callbacks = self._callbacks, {}
        self._on_exit = None
        finish_task(self._task, result, self.finished, callbacks.get("finished"))

    def _callback(self, name: str, *args) -> None:
        callback = self._callbacks.get(name)
        if callback:
            callback(*args)

    # -- process events -------------------------------------------------------------------------
    def _stop_process(self) -> None:  # SegmentTask.cancel() calls this
        if self.runner.running:
            self._emit_log("Stopping...")
            self.runner.stop()

    def _emit_log(self, message: str) -> None:
        LOG.info(message)
        self.log.emit(message)
        self._callback("log", message)

    def _on_stderr(self, line: str) -> None:
        self._stderr_tail = (self._stderr_tail + [line])[-40:]
        self._emit_log(line)

    def _fraction(self, stage: str, done: int, total: int) -> float:
        return 0.0 if total <= 0 else max(0.0, min(1.0, done / total))

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        fraction = self._fraction(stage, done, total)
        self.progress.emit(stage, done, total, fraction)
        self._callback("progress", stage, done, total, fraction)

    def _on_process_finished(self, exit_code: int) -> None:
        task, handler = self._task, self._on_exit
        if task is None or task.result is not None or handler is None:
            return
        try:
            handler(exit_code)
        except Exception as exc:
            LOG.exception("UHarmony: handling the end of the process failed")
            if task.result is None:
                self._finish(JobResult("failed", f"{type(exc).__name__}: {exc}", exit_code))

    def _start_safely(self, task: JobTask, start: Callable[[], None], make_result: Callable[[str], JobResult]) -> JobTask:
        """Run `start()`; anything it raises ends the task as failed (nothing raised into the UI)."""
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - nothing started: report it, never raise into the UI
            message = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            if task.result is None:
                self._finish(make_result(message))
        return task
