"""`uharmony fed join`: a site starts and supervises its SuperNode and runs its own ClientApp executor.

- The SuperNode runs with ``--isolation process`` and a fresh SuperExec secret; `site_exec.ExecLoop`
  (a thread here) is the only executor, so only the installed uharmony ClientApp ever runs.
- An unexpected exit of the SuperNode restarts it with back-off (1, 2, 4 ... 30 s). A refusal ends
  the site with the reason (exit 9): an unregistered key is refused by the coordinator at activation
  (Flower's code 2004), which also happens for ~60 s after a site was killed without signing off;
  so 2004 at the very first start ends at once, after a working connection it is retried for 2 min.
- Round events (`--progress jsonl`): the ClientApp appends its round results to a private file; they
  are re-emitted as ``{"event":"round",...}`` once a round's evaluation is done.
- SIGTERM/Ctrl-C: SIGTERM to the SuperNode (it signs off, so the site can rejoin at once), exit 8.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from uharmony.errors import ExitCode, FederationError, UHarmonyError
from uharmony.fed import flower
from uharmony.progress import Reporter

REFUSED_2004 = re.compile(r"code: 2004|Failed to activate SuperNode")
BACKOFF = (1, 2, 4, 8, 15, 30)


def check_insecure(insecure: bool, hosts: dict[str, str]) -> None:
    """--insecure only when every end is on loopback; a one-line usage error naming the end otherwise."""
    if not insecure:
        return
    for what, host in hosts.items():
        if not flower.is_loopback(host):
            raise UHarmonyError(f"--insecure is accepted only when every end is on loopback, and {what} {host!r} is "
                                "not (use TLS: --ca and --key)", code=ExitCode.USAGE)


class Tail:
    """New complete lines of a file that another process appends to."""

    def __init__(self, path: Path):
        self.path, self.pos, self.buf = path, 0, ""

    def lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        self.buf += data
        *complete, self.buf = self.buf.split("\n")
        return [x for x in complete if x.strip()]


def _pump(stream, sink: deque, echo) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        sink.append(line)
        echo(line)
    stream.close()


def run_join(server: str, data: str, ca: str | None, key: str | None, *, insecure: bool = False,
             device: str = "auto", reporter: Reporter | None = None) -> int:
    reporter = reporter or Reporter("none")
    flower.require_flower()
    host, _port = flower.split_address(server, "--server")
    check_insecure(insecure, {"server": host})
    if not insecure:
        from uharmony.fed.keys import check_certificate, check_private_key

        if not ca or not key:
            raise UHarmonyError("--ca and --key are required (or --insecure on loopback)", code=ExitCode.USAGE)
        check_certificate(ca, "CA certificate")
        check_private_key(key)
    from uharmony.device import choose_device
    from uharmony.train.data import load_datasets

    ds = load_datasets([data])[0]  # a bad datalist ends here (exit 5), before anything starts
    choose_device(device)  # --device cuda without a GPU: exit 2 now, before the images are read
    check_images_read(ds, reporter)  # an image whose header reads but whose voxels do not: exit 5
    state = Path(tempfile.mkdtemp(prefix="uharmony-site-"))
    os.chmod(state, 0o700)
    try:
        return _supervise(server, Path(data).resolve(), ca, key, insecure, device, reporter, state, ds.domain)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def check_images_read(ds, reporter: Reporter) -> None:
    """Read every image of the site's datalist once, voxels and all: the datalist check reads headers
    only, and a site that joined with a truncated image would fail every round. All problems at once
    (exit 5); nothing has started yet."""
    from uharmony.data.io import read_volume
    from uharmony.errors import BadDatalistError, BadInputError

    paths = [p for case in ds.training + ds.validation for p in case.image]
    problems = []
    for i, path in enumerate(paths):
        reporter.progress("checking the site's images", i, len(paths))
        try:
            read_volume(path)
        except BadInputError as e:
            problems.append(str(e))
    reporter.progress("checking the site's images", len(paths), len(paths))
    if problems:
        raise BadDatalistError.listing(f"{len(problems)} of the site's {len(paths)} images cannot be used", problems)


def _supervise(server, data: Path, ca, key, insecure, device, reporter: Reporter, state: Path, domain: str) -> int:
    from uharmony.fed.site_exec import ExecLoop

    secret = os.urandom(32)
    (state / "secret").write_bytes(secret)
    os.chmod(state / "secret", 0o600)
    settings = {"data": str(data), "device": device, "events": str(state / "events.jsonl"),
                "refusals": str(state / "refusals.jsonl"), "approved_fabs": []}
    fault = os.environ.get("UHARMONY_FED_FAULT")  # tests only: {"scale": 100, "round": 2}
    if fault:
        settings["fault"] = json.loads(fault)
    (state / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    home = state / "flwr-home"
    home.mkdir()
    runtime_port = flower.free_port()
    runtime = f"127.0.0.1:{runtime_port}"
    cmd = [flower.tool("flower-supernode"), "--superlink", server, "--isolation", "process",
           "--port", str(runtime_port), "--superexec-auth-secret-file", str(state / "secret")]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(Path(ca).resolve()),
                                            "--auth-supernode-private-key", str(Path(key).resolve())]
    env = flower.flower_env(home)

    def log(msg: str) -> None:
        reporter.log(msg) if reporter.mode == "jsonl" else print(f"uharmony fed join: {msg}", file=sys.stderr, flush=True)

    loop = ExecLoop(runtime, secret, state / "settings.json", log)
    events, refusals = Tail(state / "events.jsonl"), Tail(state / "refusals.jsonl")
    last_loss: dict[int, float] = {}
    proc = None
    connected_once = False
    attempt = 0
    refused_since = None
    log(f"joining {server} as a {domain} site ({'INSECURE, loopback only' if insecure else 'TLS + key auth'})")
    try:
        loop.start()
        while True:
            output: deque = deque(maxlen=200)
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)  # our process group: it never outlives us
            pump = threading.Thread(target=_pump, args=(proc.stdout, output,
                                                        lambda s: print(s, file=sys.stderr, flush=True)), daemon=True)
            pump.start()
            started = time.time()
            while proc.poll() is None:
                time.sleep(0.5)
                if not connected_once and any("SuperNode ID" in x for x in list(output)):
                    connected_once = True
                    refused_since = None
                    log("connected to the coordinator")
                _relay(events, refusals, reporter, log, last_loss)
            pump.join(timeout=5)
            _relay(events, refusals, reporter, log, last_loss)
            text = "\n".join(output)
            if REFUSED_2004.search(text):
                if not connected_once:
                    raise FederationError(f"the coordinator at {server} refused this site's key (Flower code 2004): "
                                          "it is not registered (`uharmony fed register KEY.pub` on the coordinator), "
                                          "or this site was killed less than a minute ago; join again later")
                refused_since = refused_since or time.time()
                if time.time() - refused_since > 120:
                    raise FederationError(f"the coordinator at {server} keeps refusing this site's key (code 2004)")
            elif "SuperNode terminated gracefully" in text and time.time() - started < 2:
                pass
            tail = next((x for x in reversed(output) if "ERROR" in x or "Exit Code" in x), "")
            wait = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            attempt = 0 if time.time() - started > 120 else attempt + 1
            log(f"the SuperNode exited (code {proc.returncode}{'; ' + tail.strip()[:160] if tail else ''}); "
                f"restarting in {wait} s")
            time.sleep(wait)
    except KeyboardInterrupt:
        log("leaving the federation (SIGTERM to the SuperNode so that it signs off)")
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the SuperNode signs off, so the site can rejoin at once
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        loop.stop()


def _relay(events: Tail, refusals: Tail, reporter: Reporter, log, last_loss: dict) -> None:
    for line in refusals.lines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        log(f"REFUSED code from the server: {r.get('reason')}")
    for line in events.lines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("phase") == "failed":
            where = f"round {e['round']}" if e.get("round") is not None else "a task"
            log(f"{where} ({e.get('message_type') or 'message'}) failed here: {e.get('error')}; the coordinator was "
                "told the exception's type only; the site stays joined")
        elif e.get("phase") == "train":
            last_loss[e["round"]] = e.get("loss")
            log(f"round {e['round']}/{e['total']}: trained locally ({e.get('seconds')} s, loss {e.get('loss'):.4f})")
        elif e.get("phase") == "evaluate":
            metrics = {"loss": last_loss.get(e["round"]), "dice": e.get("dice", {}),
                       "gate_accuracy": e.get("gate_accuracy")}
            reporter.round(round=e["round"], total=e["total"], sites=e["sites"], metrics=metrics)
            if reporter.mode != "jsonl":
                dice = ", ".join(f"{c} {v:.3f}" for c, v in metrics["dice"].items())
                log(f"round {e['round']}/{e['total']} ({e['sites']} sites): local Dice {dice}")
