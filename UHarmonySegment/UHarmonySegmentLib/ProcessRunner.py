"""Process runners: how the logic starts, stops and listens to `python -m uharmony ...`.

The logic only knows the `ProcessRunner` protocol, so the same logic runs
- inside Slicer with `QtProcessRunner` (a QProcess: its output arrives in the Qt event loop, the UI
  never blocks), and
- under pytest, on slicer-core, or as a fallback with `SubprocessRunner` (subprocess.Popen plus
  reader threads; its callbacks are delivered on the thread that calls `wait()` or `poll()`, so MRML
  is only ever touched from the caller's thread).

Stopping: SIGTERM to the process and everything it started (PythonSlicer is a launcher that starts
the real interpreter as a child, so signalling only the launcher would orphan the worker), then,
after a grace period, SIGKILL. On Windows there is no SIGTERM: the tree is ended at once.
`on_finished` fires only once the process has exited and its output has been read.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

LineCallback = Callable[[str], None]
FinishedCallback = Callable[[int], None]

#: Exit code reported when a process ended without one (crashed, killed without a known signal).
UNKNOWN_EXIT = -1


@runtime_checkable
class ProcessRunner(Protocol):
    """What the logic needs from a process runner (one process at a time per runner)."""

    on_line: LineCallback | None  # one stdout line, without its newline
    on_stderr: LineCallback | None  # one stderr line (library logs), without its newline
    on_finished: FinishedCallback | None  # exit code; negative = ended by that signal (POSIX)

    def start(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None: ...

    def stop(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    @property
    def running(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...


# -- process trees ---------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process, without psutil (Linux /proc, else `ps`)."""
    children: dict[int, list[int]] = {}
    if os.path.isdir("/proc/self"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    data = stat.read()
                # the command name is in parentheses and may contain spaces
                ppid = int(data[data.rindex(b")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        return children
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return children
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    return children


def descendant_pids(pid: int) -> list[int]:
    """All processes started (directly or not) by `pid`, deepest first."""
    try:
        import psutil  # Slicer usually has it; optional

        try:
            return [p.pid for p in reversed(psutil.Process(pid).children(recursive=True))]
        except psutil.Error:
            return []
    except ImportError:
        pass
    if sys.platform == "win32":  # pragma: no cover - no Windows here
        return []
    children = _children_map()
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return list(reversed(found))


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    if pid is None or pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover
        try:
            out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True).stdout
            return str(pid) in out
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return True


def signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def enum_int(value) -> int:
    """int() of a Qt enum from PythonQt (ints) or PySide6 (Python enums)."""
    return int(getattr(value, "value", value))


def kill_tree_windows(pid: int) -> None:  # pragma: no cover - no Windows here
    subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True)


# -- subprocess.Popen runner -----------------------------------------------------------------


class SubprocessRunner:
    """`ProcessRunner` over subprocess.Popen; callbacks run on the thread calling wait()/poll().

    Inside Slicer, when the QProcess runner cannot be used, call `poll()` from a qt.QTimer.
    """

    def __init__(self, grace_period_s: float = 5.0):
        self.on_line: LineCallback | None = None
        self.on_stderr: LineCallback | None = None
        self.on_finished: FinishedCallback | None = None
        self.grace_period_s = grace_period_s
        self._proc: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._finished = threading.Event()  # the process exited and its pipes are drained
        self._delivered = True  # on_finished has been called for the last process
        self._stop_tree: set[int] = set()
        self._lock = threading.Lock()

    # -- protocol -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self._delivered

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError("this runner is already running a process")
        self._events = queue.Queue()
        self._finished.clear()
        self._stop_tree = set()
        kwargs: dict = {}
        if sys.platform == "win32":  # pragma: no cover
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: signals reach the whole tree
        self._proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            **kwargs,
        )
        self._delivered = False
        readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr, "err"), daemon=True),
        ]
        for reader in readers:
            reader.start()
        waiter = threading.Thread(target=self._wait_exit, args=(self._proc, readers), daemon=True)
        waiter.start()
        self._threads = readers + [waiter]

    def stop(self) -> None:
        proc = self._proc
        if proc is None or self._finished.is_set():
            return
        if sys.platform == "win32":  # pragma: no cover
            kill_tree_windows(proc.pid)
            return
        tree = descendant_pids(proc.pid) + [proc.pid]
        with self._lock:
            self._stop_tree.update(tree)
        try:  # the process group also holds workers whose launcher already exited
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        signal_pids(tree, signal.SIGTERM)
        timer = threading.Thread(target=self._kill_after_grace, args=(proc,), daemon=True)
        timer.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Deliver events on this thread until the process has finished (True) or `timeout` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._delivered:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                event = self._events.get(timeout=0.1 if remaining is None else max(0.0, min(0.1, remaining)))
            except queue.Empty:
                continue
            self._dispatch(event)
        return True

    def poll(self) -> bool:
        """Deliver the events that are waiting, without blocking; True once finished."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return self._delivered
            self._dispatch(event)

    # -- internals -----------------------------------------------------------------------------
    def _dispatch(self, event: tuple) -> None:
        kind, payload = event
        if kind == "out":
            if self.on_line:
                self.on_line(payload)
        elif kind == "err":
            if self.on_stderr:
                self.on_stderr(payload)
        elif kind == "finished":
            self._delivered = True
            if self.on_finished:
                self.on_finished(payload)

    def _read(self, stream, kind: str) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._events.put((kind, raw.decode("utf-8", "replace").rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _wait_exit(self, proc: subprocess.Popen, readers: list[threading.Thread]) -> None:
        code = proc.wait()
        for reader in readers:
            reader.join()
        # a worker that outlived the launcher after a stop: give it the grace period, then kill it
        with self._lock:
            leftovers = [pid for pid in self._stop_tree if pid != proc.pid]
        if leftovers:
            deadline = time.monotonic() + self.grace_period_s
            while any(pid_alive(p) for p in leftovers) and time.monotonic() < deadline:
                time.sleep(0.05)
            signal_pids([p for p in leftovers if pid_alive(p)], signal.SIGKILL)
        self._finished.set()
        self._events.put(("finished", code if code is not None else UNKNOWN_EXIT))

    def _kill_after_grace(self, proc: subprocess.Popen) -> None:
        if self._finished.wait(self.grace_period_s):
            return
        tree = descendant_pids(proc.pid) + [proc.pid]
        with self._lock:
            self._stop_tree.update(tree)
            targets = list(self._stop_tree)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        signal_pids([p for p in targets if pid_alive(p)], signal.SIGKILL)


# -- QProcess runner -------------------------------------------------------------------------


class QtProcessRunner:
    """`ProcessRunner` over QProcess; output and finish arrive through the Qt event loop.

    `qt` is the Qt namespace to use: PythonQt's ``qt`` module inside Slicer, or ``PySide6.QtCore``
    in tests (the calls used here exist in both).
    """

    def __init__(self, qt, grace_period_s: float = 5.0):
        self.qt = qt
        self.on_line: LineCallback | None = None
        self.on_stderr: LineCallback | None = None
        self.on_finished: FinishedCallback | None = None
        self.grace_period_s = grace_period_s
        self._process = None
        self._buffers = {"out": b"", "err": b""}
        self._running = False
        self._stop_tree: set[int] = set()
        self._generation = 0

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pid(self) -> int | None:
        if self._process is None:
            return None
        pid = int(self._process.processId())
        return pid or None

    def start(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self._running:
            raise RuntimeError("this runner is already running a process")
        qt = self.qt
        process = qt.QProcess()
        if env is not None:
            environment = qt.QProcessEnvironment()
            for key, value in env.items():
                environment.insert(str(key), str(value))
            process.setProcessEnvironment(environment)
        self._generation += 1
        generation = self._generation

        def current() -> bool:  # events of an older or closed process are ignored
            return generation == self._generation and self._process is process

        process.readyReadStandardOutput.connect(lambda: current() and self._read("out"))
        process.readyReadStandardError.connect(lambda: current() and self._read("err"))
        process.finished.connect(lambda code=None, status=None: current() and self._on_process_finished(code, status))
        process.errorOccurred.connect(lambda error=None: current() and self._on_process_error(error))
        self._buffers = {"out": b"", "err": b""}
        self._stop_tree = set()
        self._process = process
        self._running = True
        process.start(str(args[0]), [str(a) for a in args[1:]])

    def stop(self) -> None:
        process = self._process
        if process is None or not self._running:
            return
        pid = self.pid
        if sys.platform == "win32" or not pid:  # pragma: no cover
            if pid:
                kill_tree_windows(pid)
            process.kill()
            return
        tree = descendant_pids(pid) + [pid]
        self._stop_tree.update(tree)
        signal_pids(tree, signal.SIGTERM)
        generation = self._generation
        self.qt.QTimer.singleShot(int(self.grace_period_s * 1000), lambda: self._kill_if_running(generation))

    def wait(self, timeout: float | None = None) -> bool:
        if not self._running:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running:
            step = 100 if deadline is None else max(1, min(100, int((deadline - time.monotonic()) * 1000)))
            if self._process is not None:
                self._process.waitForFinished(step)
            if self._running and self._process is not None and enum_int(self._process.state()) == 0:
                # NotRunning but no finished signal yet (failed to start): deliver it ourselves
                self._on_process_finished(self._process.exitCode(), 1)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return not self._running

    def close(self) -> None:
        """Forget the process without callbacks, ending it first if it still runs (widget teardown).

        A QProcess destroyed while running kills its child and emits signals from its destructor;
        closing first keeps those signals away from Python code that is being torn down.
        """
        process, was_running = self._process, self._running
        self._generation += 1  # from now on its signals are ignored
        self._running = False
        if process is not None and was_running:
            pid = self.pid
            if pid and sys.platform != "win32":
                signal_pids(descendant_pids(pid) + [pid], signal.SIGKILL)
            try:
                process.kill()
                process.waitForFinished(3000)
            except RuntimeError:  # the C++ object is already gone
                pass

    # -- internals -----------------------------------------------------------------------------
    def _kill_if_running(self, generation: int) -> None:
        if generation != self._generation or not self._running:
            return
        targets = set(self._stop_tree)
        if self.pid:
            targets.update(descendant_pids(self.pid) + [self.pid])
        signal_pids([p for p in targets if pid_alive(p)], signal.SIGKILL)
        if self._process is not None:
            self._process.kill()

    def _read(self, kind: str) -> None:
        process = self._process
        if process is None:
            return
        try:
            data = process.readAllStandardOutput() if kind == "out" else process.readAllStandardError()
        except RuntimeError:  # the QProcess was destroyed (application exit)
            return
        chunk = data.data() if hasattr(data, "data") else bytes(data)
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        buffer = self._buffers[kind] + bytes(chunk)
        *lines, rest = buffer.split(b"\n")
        self._buffers[kind] = rest
        callback = self.on_line if kind == "out" else self.on_stderr
        for raw in lines:
            if callback:
                callback(raw.decode("utf-8", "replace").rstrip("\r"))

    def _flush(self) -> None:
        self._read("out")
        self._read("err")
        for kind in ("out", "err"):
            rest, self._buffers[kind] = self._buffers[kind], b""
            callback = self.on_line if kind == "out" else self.on_stderr
            if rest and callback:
                callback(rest.decode("utf-8", "replace").rstrip("\r"))

    def _on_process_error(self, error=None) -> None:
        # FailedToStart (0) never produces `finished`: report it as one
        if self._running and self._process is not None and enum_int(error if error is not None else -1) == 0:
            self._on_process_finished(UNKNOWN_EXIT, 1)

    def _on_process_finished(self, exit_code=None, exit_status=None) -> None:
        if not self._running:
            return
        self._flush()
        crashed = exit_status is not None and enum_int(exit_status) != 0
        code = UNKNOWN_EXIT if crashed else int(exit_code if exit_code is not None else UNKNOWN_EXIT)
        leftovers = [pid for pid in self._stop_tree if pid != self.pid and pid_alive(pid)]
        if leftovers:  # the worker outlived its launcher after a stop: grace period, then kill
            deadline = time.monotonic() + self.grace_period_s
            while any(pid_alive(p) for p in leftovers) and time.monotonic() < deadline:
                time.sleep(0.05)
            signal_pids([p for p in leftovers if pid_alive(p)], signal.SIGKILL)
        self._running = False
        if self.on_finished:
            self.on_finished(code)
