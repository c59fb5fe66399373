"""Run a benchmark's independent jobs as child processes, a few at a time, one CPU thread each.

On a small CPU machine several single-threaded trainings of small models finish sooner than the same
trainings one after another with every thread: a 24^3 patch through a small network leaves threads
idle at each synchronisation. Each job is a `uharmony` command line that writes its own results file;
the caller merges the files. Jobs start longest first (their `cost`), so the last to finish is short.
Each job's output goes to its own log file; a failed job stops the others and names its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from uharmony.errors import ExitCode, UHarmonyError

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
POLL_S = 2.0
_POSIX = hasattr(os, "killpg")


@dataclass
class Job:
    name: str  # also the log file's stem
    args: list[str]  # arguments of `python -m uharmony`
    cost: float = 1.0  # relative run time, for the order only


class JobFailed(UHarmonyError):
    """A job exited non-zero: the message names it and its exit code, the path is its log; the job's own
    exit code is kept (a cancelled job: CANCELLED)."""


def run_jobs(jobs: list[Job], workers: int, log_dir: Path, *, poll_s: float = POLL_S, on_done=None,
             program: tuple[str, ...] = (sys.executable, "-m", "uharmony")) -> dict[str, float]:
    """Run every job (`program` + its args), at most `workers` at a time; returns {name: seconds}. Raises
    JobFailed (the running ones are ended first) or re-raises KeyboardInterrupt after ending them."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    log_dir.mkdir(parents=True, exist_ok=True)
    todo = sorted(jobs, key=lambda j: -j.cost)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    env = {**os.environ, **SINGLE_THREAD_ENV}
    try:
        while todo or running:
            while todo and len(running) < workers:
                job = todo.pop(0)
                log = open(log_dir / f"{job.name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed on exit)
                proc = subprocess.Popen([*program, *job.args], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=_POSIX)
                running[job.name] = (proc, time.time(), log)
            time.sleep(poll_s)
            for name, (proc, t0, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[name]
                if rc != 0:
                    code = rc if rc in {int(c) for c in ExitCode} and rc > 0 else ExitCode.INTERNAL
                    raise JobFailed(f"the log of job {name}, which exited with code {rc}", log_dir / f"{name}.log", code)
                seconds[name] = time.time() - t0
                if on_done is not None:
                    on_done(name, seconds[name])
    finally:
        for proc, _, log in running.values():
            _end(proc)
            log.close()
    return seconds


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (the process itself where there are no groups), SIGKILL after 10 s."""
    if not _POSIX:
        proc.terminate()
        proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
