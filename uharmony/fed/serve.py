"""`uharmony fed serve` and `uharmony fed register`: the coordinator.

serve: start Flower's SuperLink (state database, TLS + SuperNode authentication unless ``insecure``,
no runtime dependency installation), submit the U-Harmony app (`flwr run`) with fed.toml's settings,
follow the round log (``round`` events with ``--progress jsonl``), and stop the run (`flwr stop`) when
the overall deadline passes, saying why (for example: 1 site connected, 2 needed). After a restart it
starts a new run from the last global model written (Flower does not resume runs): rounds continue
from the last one in ``rounds.jsonl`` up to ``rounds``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from uharmony.errors import ExitCode, FederationError, UHarmonyError
from uharmony.fed import flower
from uharmony.fed.config import FedConfig, load_fed_config
from uharmony.fed.join import Tail, _pump, check_insecure
from uharmony.fed.server_app import GLOBAL, ROUND_LOG, STATUS
from uharmony.model.registry import sha256_file
from uharmony.progress import Reporter


def client_address(cfg: FedConfig) -> str:
    host, port = flower.split_address(cfg.address, "address")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _prepare(cfg: FedConfig) -> tuple[Path, Path]:
    host, _ = flower.split_address(cfg.address, "address")
    check_insecure(cfg.insecure, {"address": host})
    out = cfg.path(cfg.out)
    home = out / "flower-home"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UHarmonyError(f"cannot be created ({e.strerror or e})", out, code=ExitCode.OUTPUT_ERROR) from None
    if not cfg.insecure:
        from uharmony.fed.keys import check_certificate

        check_certificate(cfg.path(cfg.ca_cert), "CA certificate")
        check_certificate(cfg.path(cfg.server_cert), "server certificate")
        if not cfg.path(cfg.server_key).is_file():
            raise UHarmonyError("server key file does not exist", cfg.path(cfg.server_key), code=ExitCode.USAGE)
    flower.write_cli_config(home, client_address(cfg), ca=None if cfg.insecure else str(cfg.path(cfg.ca_cert)),
                            insecure=cfg.insecure)
    return out, home


def run_register(public_key: str, config_path: str) -> int:
    from uharmony.fed.keys import check_public_key

    flower.require_flower()
    cfg = load_fed_config(config_path)
    line = check_public_key(public_key)
    if cfg.insecure:
        raise UHarmonyError("site keys are only used with TLS: this fed.toml sets insecure = true", config_path,
                            code=ExitCode.USAGE)
    _, home = _prepare(cfg)
    try:
        res = flower.flwr_cli(["supernode", "register", str(Path(public_key).resolve()), "uharmony"], home)
    except FederationError as e:
        if "already" in e.message.lower():
            print(f"{public_key}: already registered")
            return 0
        raise FederationError(f"cannot register the key with the coordinator at {client_address(cfg)} (is "
                              f"`uharmony fed serve` running?): {e.message}") from None
    print(f"registered {public_key} ({line.split()[-1]}) as node {res.get('node-id')}")
    return 0


def last_round(out: Path) -> tuple[int, list[float]]:
    """(last round in the round log whose model exists, accepted update norms so far)."""
    log = out / ROUND_LOG
    last, history = 0, []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed coordinator
            last, history = int(e["round"]), list(e.get("accepted_norms", []))
    if last and not (out / GLOBAL / "card.json").is_file():
        return 0, []
    return last, history


def _contrast_encoder(cfg: FedConfig, reporter: Reporter, log) -> str | None:
    """A new federation's negative-free gate features: the cached contrast encoder, pretrained here the
    first time (minutes to an hour on a CPU, once per gate shape), so the ServerApp only loads it."""
    from uharmony.fed.server_app import contrast_encoder_file, uses_contrast_encoder

    s = cfg.to_dict()
    if not uses_contrast_encoder(s):
        return None
    log("the gate's contrast encoder: loading it, or pretraining it first if this gate shape has none cached")
    return str(contrast_encoder_file(s, lambda stage, i, n: reporter.progress(f"contrast encoder {stage}", i, n)))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run_serve(config_path: str, reporter: Reporter | None = None) -> int:
    reporter = reporter or Reporter("none")
    flower.require_flower()
    cfg = load_fed_config(config_path)
    out, home = _prepare(cfg)
    host, port = flower.split_address(cfg.address, "address")

    def log(msg: str) -> None:
        reporter.log(msg) if reporter.mode == "jsonl" else print(f"uharmony fed serve: {msg}", file=sys.stderr,
                                                                  flush=True)

    done, history = last_round(out)
    if done >= cfg.rounds:
        log(f"the federation finished already: round {done} of {cfg.rounds} is in {out / ROUND_LOG}")
        reporter.result([out / GLOBAL], {"rounds": done})
        return 0
    encoder = _contrast_encoder(cfg, reporter, log) if not done else None
    (out / "superlink").mkdir(exist_ok=True)
    cmd = [flower.tool("flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(out / "superlink" / "state.db"), "--disable-runtime-dependency-installation"]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(cfg.path(cfg.ca_cert)), "--ssl-certfile", str(cfg.path(cfg.server_cert)),
                "--ssl-keyfile", str(cfg.path(cfg.server_key)), "--enable-supernode-auth"]
    output: deque = deque(maxlen=300)
    link = subprocess.Popen(cmd, env=flower.flower_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=out)  # our process group: it dies with us
    threading.Thread(target=_pump, args=(link.stdout, output, lambda s: print(s, file=sys.stderr, flush=True)),
                     daemon=True).start()
    run_id = None
    try:
        t0 = time.time()
        local = client_address(cfg).rsplit(":", 1)[0].strip("[]")
        while not _port_open(local, port):
            if link.poll() is not None or time.time() - t0 > 60:
                tail = next((x for x in reversed(output) if "ERROR" in x or "Error" in x), "")
                raise FederationError(f"the SuperLink did not start on {cfg.address}: {tail.strip()[:200]}")
            time.sleep(0.3)
        log(f"SuperLink up on {cfg.address} ({'INSECURE, loopback only' if cfg.insecure else 'TLS + site keys'}); "
            f"{'continuing after round ' + str(done) if done else 'starting a new federation'}")
        stop_stale_runs(home, log)  # a coordinator killed in round 1 leaves one too
        app_dir = flower.write_app_dir(out / "app")
        settings = {**cfg.to_dict(), "out": str(out), "start_round": done + 1, "history": history,
                    "resume_from": str(out / GLOBAL) if done else None, "gate_encoder": encoder,
                    "resume_sha256": sha256_file(out / GLOBAL / "model.safetensors") if done else None}
        import tomli_w

        (out / "run-config.toml").write_text(tomli_w.dumps({"settings": json.dumps(settings)}), encoding="utf-8")
        (out / STATUS).unlink(missing_ok=True)
        res = flower.flwr_cli(["run", str(app_dir), "uharmony", "--run-config", str(out / "run-config.toml")], home,
                              timeout=120)
        run_id = int(res["run-id"])
        log(f"run {run_id}: rounds {done + 1}..{cfg.rounds}, at least {cfg.min_sites} sites per round, "
            f"deadline {cfg.deadline_s:g} s")
        _follow(cfg, out, home, run_id, link, reporter, log, t0=time.time())
        run_id = None
        reporter.result([out / GLOBAL], {"rounds": last_round(out)[0], "round_log": str(out / ROUND_LOG)})
        return 0
    finally:
        if run_id is not None:
            try:
                flower.flwr_cli(["stop", str(run_id), "uharmony"], home, timeout=20, check_json=False)
            except Exception as e:  # noqa: BLE001 - best effort while ending anyway
                print(f"uharmony fed serve: could not stop run {run_id}: {e}", file=sys.stderr)
        if link.poll() is None:
            link.send_signal(signal.SIGTERM)
            try:
                link.wait(15)
            except subprocess.TimeoutExpired:
                link.kill()
                link.wait()


def _follow(cfg: FedConfig, out: Path, home: Path, run_id: int, link, reporter: Reporter, log, t0: float) -> None:
    rounds = Tail(out / ROUND_LOG)
    rounds.lines()  # rounds of earlier runs were reported by them
    rounds.pos = (out / ROUND_LOG).stat().st_size if (out / ROUND_LOG).exists() else 0
    rounds.buf = ""
    last_check = 0.0
    while True:
        time.sleep(1.0)
        _report_rounds(rounds, cfg, out, reporter, log)
        if link.poll() is not None:
            raise FederationError(f"the SuperLink exited (code {link.returncode}) during run {run_id}")
        if time.time() - t0 > cfg.deadline_s:
            flower.flwr_cli(["stop", str(run_id), "uharmony"], home, timeout=30, check_json=False)
            raise FederationError(f"deadline of {cfg.deadline_s:g} s reached: {why_waiting(out)}; run {run_id} stopped "
                                  f"(the last global model is in {out / GLOBAL})")
        if time.time() - last_check >= 3:
            last_check = time.time()
            status = run_status(home, run_id)
            if status.startswith("finished"):
                _report_rounds(rounds, cfg, out, reporter, log)  # the last round's line, if not seen yet
                if status != "finished:completed":
                    detail = run_log_tail(home, run_id)
                    raise FederationError(f"run {run_id} ended {status}: {detail}")
                return


def _report_rounds(rounds: Tail, cfg: FedConfig, out: Path, reporter: Reporter, log) -> None:
    for line in rounds.lines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        sites = sum(1 for p in e["participants"] if p.get("accepted"))
        reporter.round(round=e["round"], total=cfg.rounds, sites=sites, metrics=e["metrics"])
        rej = "; ".join(f"site {r['site']} rejected: {r['reason']}" for r in e["rejected"])
        fail = "; ".join(f"site {r['site']}: {r['reason'][:120]}" for r in e["failures"])
        per_domain = ", ".join(f"{d} x{v['sites']}" for d, v in e["domains"].items())
        log(f"round {e['round']}/{cfg.rounds}: {sites} site(s) aggregated ({per_domain}), wrote {out / GLOBAL}"
            + (f"; {rej}" if rej else "") + (f"; {fail}" if fail else ""))


def why_waiting(out: Path) -> str:
    try:
        s = json.loads((out / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "the run never started a round"
    if s.get("state") == "waiting":
        return (f"round {s['round']} was waiting for sites: {s['connected']} connected, {s['needed']} needed "
                f"(min_sites)")
    return f"round {s.get('round')} was {s.get('state')}"


def stop_stale_runs(home: Path, log) -> list[int]:
    """Stop the runs a killed coordinator left unfinished in the SuperLink's database.

    Until the SuperLink notices the dead ServerApp (a heartbeat timeout), it still hands out that run's
    pending messages; a site that takes one trains for nothing, one message at a time, before it takes
    the new run's."""
    try:
        runs = flower.flwr_cli(["ls", "uharmony"], home, timeout=30).get("runs") or []
    except FederationError as e:
        log(f"could not list the earlier runs: {e}")
        return []
    stale = [int(r["run-id"]) for r in runs if not str(r.get("status", "")).startswith("finished")]
    for run_id in stale:
        try:
            flower.flwr_cli(["stop", str(run_id), "uharmony"], home, timeout=30, check_json=False)
            log(f"stopped run {run_id}, left unfinished by the previous coordinator")
        except FederationError as e:
            log(f"could not stop the earlier run {run_id}: {e}")
    return stale


def run_status(home: Path, run_id: int) -> str:
    try:
        res = flower.flwr_cli(["ls", "uharmony", "--run-id", str(run_id)], home, timeout=30)
    except FederationError:
        return "unknown"
    runs = res.get("runs") or []
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def run_log_tail(home: Path, run_id: int) -> str:
    cmd = [flower.tool("flwr"), "log", str(run_id), "uharmony", "--show"]
    try:
        done = subprocess.run(cmd, env=flower.flower_env(home), capture_output=True, text=True, timeout=30,
                              check=False)
    except subprocess.TimeoutExpired:
        return "(no log)"
    lines = [x for x in (done.stdout + done.stderr).splitlines() if "Error" in x or "ERROR" in x]
    return " | ".join(x.strip() for x in lines[-3:])[:400] or "(see `flwr log`)"
