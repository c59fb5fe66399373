"""Join a federated training run as a site, without Qt: keys, availability, join/leave, rounds.

The work is ``<python> -m uharmony fed join --server HOST:PORT --data site/dataset.json --ca ca.crt
--key site_key --progress jsonl`` (issue 5's CLI): it starts and supervises this site's Flower
SuperNode, trains locally and sends weights only. Its ``round`` events
(``{"v":1,"event":"round","round":2,"total":10,"sites":3,"metrics":{"loss":..,"dice":{..},
"gate_accuracy":..}}``) feed `RoundHistory`. Leave = SIGTERM (the process ends its SuperNode cleanly
so the site can rejoin at once), then kill after the grace period.

Until the library has ``uharmony fed`` (federated training is built in issue 5), `availability()`
says so and the module keeps Join disabled with that explanation.

Scene cases are exported like the Adapt tab's into a private temporary folder that exists for the
whole run and is deleted when it ends (images and labels never leave the site; the folder only
feeds the local process).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from UHarmonySegmentLib.Library import CommandError
from UHarmonySegmentLib.Signal import Signal
from UHarmonySegmentLib.TempFolders import make_private_dir

from .Cases import SceneCase, check_scene_cases, export_scene_cases, resolve_datalist
from .Jobs import JobLogic, JobResult, JobTask
from .Metrics import RoundHistory, RoundRow

#: Options of `uharmony fed join` this module uses; availability requires all of them.
JOIN_OPTIONS = ("--server", "--data", "--ca", "--key", "--progress")
SERVER_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")
NOT_BUILT = ("This uharmony library has no 'uharmony fed' command yet: federated training is still being built "
             "(issue 5). Join and key creation are disabled until a library with it is installed.")


@dataclass
class Availability:
    available: bool
    reason: str = ""


def interpret_availability(help_error: CommandError | None, help_text: str, flower_installed: bool) -> Availability:
    """Whether Join can work, from `fed join --help` (its error or text) and whether Flower is installed."""
    if help_error is not None:
        detail = (help_error.message or "").strip()
        if help_error.code == 2 or "invalid choice" in detail:
            return Availability(False, NOT_BUILT)
        return Availability(False, f"'uharmony fed join --help' failed: {detail or help_error}")
    missing = [option for option in JOIN_OPTIONS if option not in help_text]
    if missing:
        return Availability(False, "this library's 'uharmony fed join' lacks the options " + ", ".join(missing)
                            + " that this module uses: update the extension or the library")
    if not flower_installed:
        return Availability(False, "Flower (the 'flwr' package) is not installed in Slicer's Python; install it "
                                   "(pip install 'flwr==1.41.0') to join a federation")
    return Availability(True, "")


def check_server(server: str) -> str | None:
    match = SERVER_PATTERN.match(server.strip()) if server else None
    if not match:
        return f"'{server}' is not a server address: give HOST:PORT, like fl.hospital.org:9092" if server \
            else "give the server address (HOST:PORT) the coordinator sent you"
    if not 1 <= int(match.group(2)) <= 65535:
        return f"port {match.group(2)} is out of range (1-65535)"
    return None


def public_key_path(key_path: str) -> str:
    return key_path if key_path.endswith(".pub") else key_path + ".pub"


def read_public_key(key_path: str) -> str:
    """The public half of a site key, to send to the coordinator; never the private key."""
    path = public_key_path(key_path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no public key next to the site key (it is made together with it by 'Create')")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if "PRIVATE KEY" in text:
        raise ValueError(f"{path}: holds a PRIVATE key; it must never be sent to anyone")
    return text


@dataclass
class JoinRequest:
    server: str
    ca: str
    key: str
    datalist: str | None = None  # a dataset.json (or a folder holding one), or:
    cases: list[SceneCase] = field(default_factory=list)
    domain: str = ""  # for scene cases: the domain this site's data belongs to
    base_classes: list[str] = field(default_factory=list)  # class names in label-value order (for scene cases)


@dataclass
class JoinResult(JobResult):
    rounds: RoundHistory = field(default_factory=RoundHistory)


class FederatedLogic(JobLogic):
    """Site side of a federation. Signals: ``round(row, history)`` after each round event."""

    def __init__(self, scene, process_runner, require_flower: bool = True, **kwargs):
        super().__init__(process_runner, **kwargs)
        self.scene = scene
        self.require_flower = require_flower
        self.rounds = RoundHistory()
        self.round = Signal("row", "history")
        self.parser.round.connect(self._on_round)

    # -- availability and keys ----------------------------------------------------------------
    def flower_installed(self) -> bool:
        return not self.require_flower or importlib.util.find_spec("flwr") is not None

    def availability(self) -> Availability:
        try:
            text = self.commands.call_sync(["fed", "join", "--help"], parse_json=False, timeout=120)
            return interpret_availability(None, text, self.flower_installed())
        except CommandError as exc:
            return interpret_availability(exc, "", self.flower_installed())

    def availability_async(self, on_done: Callable[[Availability], None]) -> None:
        def done(text, error):
            on_done(interpret_availability(error, text or "", self.flower_installed()))

        self.commands.call_async(["fed", "join", "--help"], done, parse_json=False)

    def key_command(self, name: str, out_dir: str) -> list[str]:
        return self.library_args("fed", "keys", "site", "--name", name, "--out", out_dir)

    def create_site_key(self, name: str, out_dir: str, on_done: Callable[[str | None, str | None], None]) -> None:
        """`uharmony fed keys site --name NAME --out DIR`; on_done(private key path, error message)."""
        if not name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            on_done(None, "give the site a name of letters, digits, '-', '_' or '.'")
            return
        if not out_dir or not os.path.isdir(out_dir):
            on_done(None, f"{out_dir or '(none)'}: choose an existing folder for the key")
            return

        def done(_output, error):
            if error is not None:
                on_done(None, error.message or str(error))
                return
            key = os.path.join(out_dir, name)
            on_done(key, None if os.path.isfile(public_key_path(key)) else
                    f"the command succeeded but {public_key_path(key)} is not there")

        self.commands.call_async(["fed", "keys", "site", "--name", name, "--out", out_dir], done, parse_json=False)

    # -- join / leave -----------------------------------------------------------------------------
    def command(self, request: JoinRequest, data: str) -> list[str]:
        return self.library_args("fed", "join", "--server", request.server.strip(), "--data", data,
                                 "--ca", request.ca, "--key", request.key, "--progress", "jsonl")

    def check(self, request: JoinRequest) -> list[str]:
        problems = []
        reason = check_server(request.server)
        if reason:
            problems.append(reason)
        for what, path in (("CA certificate", request.ca), ("site key", request.key)):
            if not path:
                problems.append(f"choose the {what} file")
            elif not os.path.isfile(path):
                problems.append(f"{path}: the {what} file does not exist")
        if request.key and os.path.isfile(request.key) and request.key.endswith(".pub"):
            problems.append(f"{request.key}: that is the public key; choose the private site key (without .pub)")
        if request.datalist and request.cases:
            problems.append("give either scene cases or a datalist, not both")
        elif request.datalist:
            try:
                resolve_datalist(request.datalist)
            except ValueError as exc:
                problems.append(str(exc))
        else:
            problems += check_scene_cases(request.cases)
            if not request.domain:
                problems.append("give the domain (kind of scan) of this site's cases, like \"mri-t1\"")
        return problems

    def join(self, request: JoinRequest, on_round: Callable | None = None, on_progress: Callable | None = None,
             on_log: Callable | None = None, on_finished: Callable[[JoinResult], None] | None = None) -> JobTask:
        """Start taking part; returns at once. `on_finished(JoinResult)` once the process has ended."""
        task = self._begin({"round": on_round, "progress": on_progress, "log": on_log, "finished": on_finished})
        self.rounds = RoundHistory()

        def start():
            problems = self.check(request)
            if problems:
                raise ValueError("\n".join(problems))
            if request.datalist:
                data = resolve_datalist(request.datalist)
            else:
                task.temp_dir = make_private_dir(self.temp_root, "uharmony-fed-")
                exported = export_scene_cases(request.cases, task.temp_dir, request.domain, request.base_classes or None,
                                              name="site")
                data = exported.datalists[0]
                if len(exported.datalists) > 1:
                    raise ValueError("the scene cases annotate different sets of classes; a site joins with one "
                                     "datalist: give every case the same segments")
            self._run(self.command(request, data), self._ended)

        return self._start_safely(task, start, lambda message: JoinResult("failed", message, rounds=self.rounds))

    def leave(self) -> None:
        self.cancel()

    def _ended(self, exit_code: int) -> None:
        if self._cancelled(exit_code):
            result = JoinResult("cancelled", "Left the federation.", exit_code, rounds=self.rounds)
        elif exit_code == 0:
            last = self.rounds.latest
            done = f" after round {last.round}" + (f" of {last.total}" if last.total else "") if last else ""
            result = JoinResult("success", f"The federated run ended{done}.", 0, rounds=self.rounds)
        else:
            result = JoinResult("failed", self._failure_message(exit_code, "Joining"), exit_code, rounds=self.rounds)
        self._finish(result)

    def _on_round(self, event: dict) -> None:
        row: RoundRow | None = self.rounds.add(event)
        if row is None:
            return
        fraction = self.rounds.fraction()
        self.progress.emit("round", row.round, row.total or 0, fraction)
        self._callback("progress", "round", row.round, row.total or 0, fraction)
        self.round.emit(row, self.rounds)
        self._callback("round", row, self.rounds)
