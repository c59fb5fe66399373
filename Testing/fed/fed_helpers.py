"""Helpers of the federation tests: real Flower processes on 127.0.0.1 (no mocks), tiny synthetic sites.

Every process is started in its own session and killed (its whole group) at teardown. Flower must be
installed (CI installs the `fed` extra): a missing flwr fails these tests loudly, nothing is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UHARMONY = [sys.executable, "-m", "uharmony"]

FED_TOML = """domains = ["synth-t1", "synth-t2"]
classes = ["cerebrospinal fluid", "grey matter", "white matter", "lesion"]
address = "127.0.0.1:{port}"
out = "federation"
rounds = {rounds}
min_sites = {min_sites}
start_sites = {start_sites}
round_timeout_s = {timeout}
deadline_s = {deadline}
evaluate = {evaluate}
gate_pretrain_steps = 10
gate_pretrain_views = 12
[train]
local_steps = 3
patch_size = [16, 16, 16]
spacing_mm = [6.0, 6.0, 6.0]
eval_cases = 1
[model]
filters = [4, 8, 16]
strides = [1, 2, 2]
harmony_levels = 1
[gate]
input_size = [8, 8, 8]
filters = [4, 8]
"""


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.pop("UHARMONY_FED_FAULT", None)
    return e


class Procs:
    """Processes of one test module; each in its own session so that its whole group can be killed."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
        err = open(self.root / f"{name}.err", "wb")  # noqa: SIM115
        p = subprocess.Popen([*UHARMONY, *args], cwd=self.root, env={**env(), **(extra_env or {})},
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        self.procs[name] = p
        return p

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        p = self.procs[name]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout)

    def out(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(encoding="utf-8", errors="replace")

    def err(self, name: str) -> str:
        return (self.root / f"{name}.err").read_text(encoding="utf-8", errors="replace")

    def events(self, name: str) -> list[dict]:
        return [json.loads(x) for x in self.out(name).splitlines() if x.strip()]

    def close(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is None:
                self.kill(name, signal.SIGTERM)
        deadline = time.time() + 15
        for name, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(name, signal.SIGKILL)
                p.wait()


def wait_for(predicate, timeout: float, what: str, procs: Procs | None = None, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    detail = ""
    if procs is not None:
        detail = "\n".join(f"--- {n}.err ---\n{procs.err(n)[-3000:]}" for n in procs.procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")


def read_rounds(out: Path) -> list[dict]:
    log = out / "rounds.jsonl"
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_config(folder: Path, fed_data: dict, *, rounds=2, min_sites=2, start_sites=0, timeout=60, deadline=600,
                 evaluate=True) -> tuple[Path, int]:
    from uharmony.fed.flower import free_port

    folder.mkdir(parents=True, exist_ok=True)
    keys = folder / "keys"
    if not keys.exists():
        keys.symlink_to(fed_data["root"] / "keys")
    port = free_port()
    path = folder / "fed.toml"
    path.write_text(FED_TOML.format(port=port, rounds=rounds, min_sites=min_sites, start_sites=start_sites,
                                    timeout=timeout,
                                    deadline=deadline, evaluate="true" if evaluate else "false"), encoding="utf-8")
    return path, port


def join_args(fed_data: dict, site: str, port: int, key: str | None = None) -> list[str]:
    return ["fed", "join", "--server", f"127.0.0.1:{port}", "--data", str(fed_data["data"][site]),
            "--ca", str(fed_data["ca"]), "--key", str(fed_data["keys"][key or site]), "--device", "cpu",
            "--progress", "jsonl"]


def register(config: Path, fed_data: dict, sites) -> None:
    for s in sites:
        done = subprocess.run([*UHARMONY, "fed", "register", f"{fed_data['keys'][s]}.pub", "--config", str(config)],
                              env=env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
