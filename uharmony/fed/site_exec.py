"""The site's own executor: the only code a site runs is its installed uharmony ClientApp.

Flower's stock path (``flower-supernode`` launching ``flower-superexec`` launching ``flwr-clientapp``)
unpacks and runs whatever app (FAB) the server ships. A site must not trust that: the SuperLink's
control API is unauthenticated, so whoever reaches it can start a run (FLOWER.md, "Security").

So `uharmony fed join` starts the SuperNode with ``--isolation process`` (it then launches nothing)
and a SuperExec authentication secret, and runs this executor instead, which

- acquires ClientApp tasks only (`ExecLoop`, a thread of the join process), and for each one starts
  ``python -m uharmony.fed.site_exec`` (`run_task`), which
- pulls the task's message and FAB, computes the FAB's sha256 and **refuses** the task (an error reply
  naming the hash, and a line in the site's refusal log) unless the site approved that hash: by default
  only the FAB that `flwr run` builds from this very uharmony version's app, which ships no code;
- never unpacks or installs the FAB: an approved task runs `uharmony.fed.client_app.app`, imported
  from the site's installed package.

This relies on Flower internals (the Runtime API client, task protos): flwr is pinned to 1.41.0 and
Testing/fed/test_security.py proves a foreign FAB is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CLIENT_TASK = "flwr-clientapp"


def _client(address: str, interceptors: list):
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


class ExecLoop(threading.Thread):
    """Acquires ClientApp tasks from the local SuperNode's Runtime API and starts `run_task` for each."""

    def __init__(self, address: str, secret: bytes, settings_path: Path, log, poll_s: float = 0.5):
        super().__init__(daemon=True, name="uharmony-site-exec")
        self.address, self.secret, self.settings_path, self.log, self.poll_s = address, secret, settings_path, log, poll_s
        self.stop_event = threading.Event()
        self.children: list[subprocess.Popen] = []
        self.spare: subprocess.Popen | None = None

    def run(self) -> None:
        client = None
        while not self.stop_event.is_set():
            try:
                if client is None:
                    client = self._connect()
                self._poll(client)
            except Exception as e:  # noqa: BLE001 - the SuperNode restarts under us; retry
                self.log(f"site executor: {type(e).__name__}: {' '.join(str(e).split())[:200]}; retrying")
                try:
                    if client is not None:
                        client.close()
                except Exception:  # noqa: BLE001, S110 - a broken connection is replaced anyway
                    pass
                client = None
                self.stop_event.wait(2.0)
            self.children = [c for c in self.children if c.poll() is None]
            if self.spare is None or self.spare.poll() is not None:
                self.spare = self._spawn()
            self.stop_event.wait(self.poll_s)

    def _connect(self):
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )

        return _client(self.address, [RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                                      SuperExecAuthHttpInterceptor(
                                          master_secret=self.secret,
                                          protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))])

    def _poll(self, client) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENT_TASK], agentapp_fab_hashes=[]))
        if res.HasField("task") and res.token:
            if res.task.type != CLIENT_TASK:
                self.log(f"site executor: ignored a task of type {res.task.type!r} (only ClientApp tasks run here)")
                return
            child = self.spare if self.spare is not None and self.spare.poll() is None else self._spawn()
            self.spare = None
            child.stdin.write(res.token.encode("ascii") + b"\n")
            child.stdin.close()
            self.children.append(child)
            self.spare = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        """A task process that imports torch, MONAI and the ClientApp now and then waits for its token.

        Keeping one such warm spare ready saves the imports (seconds to tens of seconds on a busy
        machine) from every message: Flower starts a fresh ClientApp process per message.
        """
        cmd = [sys.executable, "-m", "uharmony.fed.site_exec", "--runtime-api-address", self.address,
               "--settings", str(self.settings_path), "--parent-pid", str(os.getpid())]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=sys.stderr, stderr=sys.stderr)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self.spare is not None:
            self.children.append(self.spare)
            self.spare = None
        for c in self.children:
            if c.poll() is None:
                c.terminate()
        for c in self.children:
            try:
                c.wait(timeout)
            except subprocess.TimeoutExpired:
                c.kill()


def approved_hashes(settings: dict) -> set[str]:
    from uharmony.fed.flower import app_fab_sha256

    return {app_fab_sha256(), *[h.lower() for h in settings.get("approved_fabs", [])]}


def _append_jsonl(path: str | None, entry: dict) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _round_of(message) -> int | None:
    """The federated round a message belongs to, if it says (our ServerApp's ``config["global-round"]``)."""
    try:
        return int(message.content["config"]["global-round"])
    except Exception:  # noqa: BLE001 - no message, another server's message: the round is unknown
        return None


def run_task(address: str, token: str, settings_path: Path) -> int:
    """Run one task: refuse an unapproved FAB, else the installed uharmony ClientApp. Returns an exit code."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    client = _client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest not in approved_hashes(settings):
            details = (f"refused by the site: the code the server shipped (app {run.fab_id} {run.fab_version}, "
                       f"FAB sha256 {digest}) is not approved by this site; it runs only its installed uharmony "
                       "ClientApp")
            _append_jsonl(settings.get("refusals"), {"time": time.time(), "run_id": run.run_id, "fab_id": run.fab_id,
                                                     "fab_sha256": digest, "reason": details})
            print(f"uharmony site: {details}", file=sys.stderr, flush=True)
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details), reply_to=message)
            code = 3
        else:
            os.environ["UHARMONY_FED_SITE_SETTINGS"] = str(settings_path)
            from uharmony.fed.client_app import app

            reply = app(message=message, context=context)
            status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as e:  # noqa: BLE001 - reported to the server; the traceback goes to the site's log
        import traceback

        traceback.print_exc()
        details = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
        # The SuperNode handles one message at a time and waits for its reply: without this error reply it
        # would never pull another message, and the site would be silent for the rest of the federation.
        # Only the exception's type leaves the site: its text may name the site's files.
        reason = f"the site's ClientApp failed ({type(e).__name__}); the details are in the site's log"
        _append_jsonl(settings.get("events"), {
            "phase": "failed", "round": _round_of(message), "error": details,
            "message_type": message.metadata.message_type if message is not None else None})
        reply = (Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                 if message is not None else None)
    finally:
        heartbeat.stop()
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as e:  # noqa: BLE001 - the task's status below still tells the SuperNode
                print(f"uharmony site: could not return the reply: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
                status, details, code = SubStatus.FAILED, f"{type(e).__name__}: {e}", 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="uharmony's site executor: one ClientApp task (token on stdin)")
    ap.add_argument("--runtime-api-address", required=True)
    ap.add_argument("--settings", required=True, type=Path)
    ap.add_argument("--parent-pid", type=int, default=None)
    args = ap.parse_args(argv)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    import monai.inferers  # noqa: F401
    import torch  # noqa: F401 - warm up: a spare process imports everything before its task arrives

    import uharmony.fed.client_app
    import uharmony.train.trainer  # noqa: F401

    token = sys.stdin.readline().strip()
    if not token:
        return 0  # a spare that was never used
    return run_task(args.runtime_api_address, token, args.settings)


if __name__ == "__main__":
    sys.exit(main())
