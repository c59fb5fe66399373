"""Where the `uharmony` library is, how to call its CLI, and what its exit codes mean.

The Slicer modules never import torch: every heavy call is ``<python> -m uharmony ...`` in a
separate process. Inside Slicer ``<python>`` is ``PythonSlicer`` (Slicer's own interpreter and
site-packages); in tests it is the test's interpreter.

Where the library is found (first hit wins):
1. ``UHARMONY_LIBRARY_PATH`` (a folder that contains the ``uharmony`` package),
2. the module's own folder (the installed extension puts ``uharmony/`` next to the module scripts),
3. the source tree: the folder above the module (``<repo>/UHarmonySegment`` -> ``<repo>``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../UHarmonySegment

# The exit-code table of uharmony.errors, repeated so the module can explain a code even when the
# library cannot be imported (a test checks both stay equal).
EXIT_CODE_TEXT = {
    0: "success",
    1: "internal error (a bug; the traceback is on stderr)",
    2: "bad command line",
    3: "bad input image",
    4: "bad or untrusted model package",
    5: "bad datalist",
    6: "output exists or cannot be written",
    7: "out of memory",
    8: "cancelled",
    9: "federation error",
    10: "batch finished with failures",
}
EXIT_CANCELLED = 8


def exit_code_text(code: int | None) -> str:
    if code is None:
        return "did not run"
    if code < 0:
        return f"ended by signal {-code}"
    return EXIT_CODE_TEXT.get(code, f"exit code {code}")


def find_library_root(extra_candidates: Sequence[str] = ()) -> str | None:
    """The folder holding the ``uharmony`` package, or None."""
    candidates = []
    if os.environ.get("UHARMONY_LIBRARY_PATH"):
        candidates.append(os.environ["UHARMONY_LIBRARY_PATH"])
    candidates.extend(extra_candidates)
    candidates.extend([MODULE_DIR, os.path.dirname(MODULE_DIR)])
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "uharmony", "__init__.py")):
            return os.path.abspath(folder)
    return None


def ensure_library_importable(library_root: str | None = None) -> str | None:
    """Put the library folder on sys.path (for its light, torch-free parts: errors, terminology)."""
    root = library_root or find_library_root()
    if root and root not in sys.path:
        sys.path.insert(0, root)
    return root


def default_python_executable() -> str:
    """PythonSlicer inside Slicer (same site-packages as Slicer), else this interpreter."""
    in_slicer = "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app")
    if in_slicer:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        home = getattr(getattr(sys.modules["slicer"], "app", None), "slicerHome", None)
        if home:
            for name in ("PythonSlicer", "PythonSlicer.exe"):
                path = os.path.join(home, "bin", name)
                if os.path.isfile(path):
                    return path
    return sys.executable


def process_environment(library_root: str | None, base: Mapping[str, str] | None = None,
                        extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: `base` (default: ours) updated with `extra`, the library first on
    PYTHONPATH (then `extra`'s PYTHONPATH, then the inherited one), unbuffered UTF-8 I/O."""
    env = dict(os.environ if base is None else base)
    extra = {str(k): str(v) for k, v in (extra or {}).items()}
    extra_path = extra.pop("PYTHONPATH", "")
    env.update(extra)
    parts: list[str] = []
    for part in [library_root or ""] + extra_path.split(os.pathsep) + env.get("PYTHONPATH", "").split(os.pathsep):
        if part and part not in parts:
            parts.append(part)
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class CommandError(RuntimeError):
    """A library command failed: its exit code and one-line message."""

    def __init__(self, code: int | None, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{message} ({exit_code_text(code)})" if message else exit_code_text(code))


def _error_message(stdout: str, stderr: str) -> str:
    """The protocol's error event when there is one, else the last non-empty stderr line."""
    for line in reversed(stdout.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == "error":
            return str(obj.get("message", ""))
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class LibraryCommands:
    """The small, quick library commands the modules need: models, model info, devices.

    ``call_sync`` blocks (scripts, tests); ``call_async`` uses a runner from ``runner_factory`` and
    calls ``on_done(data, error)`` on completion (the widget: the UI stays live while torch loads).
    """

    def __init__(self, python_executable: str | None = None, library_root: str | None = None,
                 runner_factory: Callable[[], Any] | None = None, environment: Mapping[str, str] | None = None,
                 module: str = "uharmony"):
        self.library_root = library_root or find_library_root()
        self.python_executable = python_executable or default_python_executable()
        self.runner_factory = runner_factory
        self.environment = process_environment(self.library_root, extra=environment)
        self.module = module
        self._runners: list[Any] = []

    def args(self, *cli: str) -> list[str]:
        return [self.python_executable, "-m", self.module, *[str(c) for c in cli]]

    # -- blocking -------------------------------------------------------------------------------
    def call_sync(self, cli: Sequence[str], parse_json: bool = True, timeout: float = 300.0) -> Any:
        try:
            done = subprocess.run(self.args(*cli), capture_output=True, text=True, env=self.environment,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(None, f"'{' '.join(cli[:2])}' did not answer within {timeout:.0f} s") from exc
        except OSError as exc:
            raise CommandError(None, f"cannot start {self.python_executable}: {exc}") from exc
        if done.returncode != 0:
            raise CommandError(done.returncode, _error_message(done.stdout, done.stderr))
        return _parse_json_output(done.stdout, cli) if parse_json else done.stdout

    # -- non-blocking ---------------------------------------------------------------------------
    def call_async(self, cli: Sequence[str], on_done: Callable[[Any, CommandError | None], None],
                   parse_json: bool = True) -> Any:
        if self.runner_factory is None:
            raise RuntimeError("call_async needs a runner_factory")
        runner = self.runner_factory()
        out: list[str] = []
        err: list[str] = []
        runner.on_line = out.append
        runner.on_stderr = err.append

        def finished(code: int) -> None:
            if runner in self._runners:
                self._runners.remove(runner)
            stdout, stderr = "\n".join(out), "\n".join(err)
            if code != 0:
                on_done(None, CommandError(code, _error_message(stdout, stderr)))
                return
            try:
                data = _parse_json_output(stdout, cli) if parse_json else stdout
            except CommandError as exc:
                on_done(None, exc)
                return
            on_done(data, None)

        runner.on_finished = finished
        self._runners.append(runner)  # keep it alive until it finishes
        try:
            runner.start(self.args(*cli), self.environment)
        except Exception as exc:
            self._runners.remove(runner)
            on_done(None, CommandError(None, f"cannot start {self.python_executable}: {exc}"))
        return runner

    def close_all(self) -> None:
        """End the commands still running, without calling their `on_done` (widget teardown)."""
        for runner in list(self._runners):
            runner.on_finished = None
            close = getattr(runner, "close", None)
            if close is not None:
                close()
            else:
                runner.stop()
        self._runners.clear()

    # -- the commands -----------------------------------------------------------------------------
    def list_models(self) -> list[dict]:
        data = self.call_sync(["models", "list", "--json"])
        if not isinstance(data, list):
            raise CommandError(None, "'models list --json' did not return a list")
        return data

    def add_model(self, folder: str, name: str | None = None) -> str:
        cli = ["models", "add", folder] + (["--name", name] if name else [])
        return self.call_sync(cli, parse_json=False)

    def model_info(self, model: str) -> dict:
        data = self.call_sync(["info", "--model", model, "--json"])
        if not isinstance(data, dict):
            raise CommandError(None, "'info --json' did not return an object")
        return data

    def devices(self) -> dict:
        data = self.call_sync(["devices", "--json"])
        if not isinstance(data, dict):
            raise CommandError(None, "'devices --json' did not return an object")
        return data


def _parse_json_output(stdout: str, cli: Sequence[str]) -> Any:
    text = stdout.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    # tolerate log lines before the document: take the last line that parses
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise CommandError(None, f"'{' '.join(cli[:2])}' printed no JSON")
