"""`uharmony bench fed`: federated (one site per style) vs centralized U-Harmony on the cross-modality benchmark.

Data, budget, seeds and scoring are those of `uharmony bench generalize` (`uharmony.bench.generalize`):
atlas-based heads rendered as mri-t1, mri-t2 and ct (the three sites, one style each) and the unseen
mri-flair, whose validation heads are also scored in the three brain-tissue orders no site has
(generalize's "new tissue orders" column: the styles GIN is for); the same reduced budget
(`generalize.budget`); every model scored by the same evaluator (mean Dice of CSF, GM and WM per case
on the same validation cases, routed by the gate).

Two parts:

1. **Dice (in-process).** Each federated run uses the real federation code in one process: the
   coordinator is `uharmony.fed.server_app.UHarmonyStrategy` (its ``configure_train`` builds the
   messages, ``aggregate_train`` checks every reply against the whitelist, screens and aggregates with
   `uharmony.fed.aggregate`, ``after_round`` writes the global package and the round log) and each site
   is the installed ClientApp (`uharmony.fed.client_app.app`, called with the message as Flower's
   executor calls it) on that site's datalist. Only the transport (SuperLink, SuperNodes, gRPC/TLS) is
   left out; the stand-in for the SuperLink's node list is `_LocalGrid`. Sites train one after
   another. Evaluation of the sites is off (the global model is scored by the benchmark's evaluator).
2. **Bytes and round overhead (real Flower).** One short run with a real SuperLink (`uharmony fed serve`,
   TLS + site authentication) and three real SuperNodes (`uharmony fed join`) on 127.0.0.1, at the
   benchmark's scale, as the end-to-end tests do (Testing/fed).

Budget matching: the centralized model trains S steps of B patches, its domains drawn uniformly
(each domain sees ~S*B/3 patches). A federated run has R rounds of L local steps of b patches at each
of the 3 sites, L = round(S*B / (3 R b)): every site trains R*L*b ~ S*B/3 patches of its own domain, as
many as its domain sees in centralized training (the warm-up + poly decay of the learning rate spans
each site's R*L steps; the AdamW state restarts every round, as the ClientApp does). By default b = 1
and R = 24 (B = 2): a site then makes 2/3 of the centralized optimiser steps instead of 1/3 at b = B,
which closed most of the gap at 1000 steps (docs/benchmarks.md). ``--central-batch b'`` trains the
centralized arm at b' patches per step for S*B/b' steps instead (the same patches; generalize's models
are then not reused): at b' = 1 both arms take steps of one patch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from uharmony.bench import generalize as G
from uharmony.data import heads
from uharmony.data.io import write_json

SITES = tuple(heads.BENCH_TRAIN_DOMAINS)  # one site per training style
UNSEEN = heads.BENCH_UNSEEN_DOMAIN
STYLES = (*SITES, UNSEEN)
NOVEL = tuple(heads.BENCH_NOVEL_STYLES)  # the unseen style's heads in tissue orders no site has (as generalize's)
SCORED = (*STYLES, *NOVEL)  # what each model routed by its gate is scored on
TARGET_RATIO = 0.95


# ----------------------------------------------------------------------------------------- configs


SITE_BATCH = 1  # patches per local step (the centralized arm's batch is the budget's)
ROUNDS = 24


def local_steps(steps: int, rounds: int, central_batch: int, site_batch: int = SITE_BATCH,
                sites: int = len(SITES)) -> int:
    """Local steps per round so that every site trains as many patches of its domain as the centralized
    arm's ``steps`` x ``central_batch`` hold of it (see the module doc)."""
    return max(1, round(steps * central_batch / (sites * rounds * site_batch)))


def central_config(base: dict, seed: int, gin: bool, gin_options: dict | None = None,
                   batch: int | None = None) -> dict:
    """The centralized U-Harmony config of `uharmony bench generalize` for this seed (as its run_train gets it).

    ``batch``: patches per step other than the budget's, with the steps scaled to keep the patches (and so
    every domain's share) equal: `central_steps`."""
    cfg = {**base, "augment": G.augment_section(gin, gin_options), "method": "uharmony", "seed": seed}
    if batch is not None and batch != base["batch_size"]:
        cfg.update(batch_size=batch, steps=central_steps(base["steps"], base["batch_size"], batch))
    return cfg


def patches(n: int) -> str:
    """``1 patch``, ``2 patches``: for the budget lines."""
    return f"{n} patch{'es' * (n != 1)}"


def central_steps(steps: int, budget_batch: int, batch: int) -> int:
    """Steps of ``batch`` patches that hold as many patches as the budget's ``steps`` of ``budget_batch``."""
    return max(1, round(steps * budget_batch / batch))


def fed_config(base: dict, *, classes: list[str], rounds: int, local: int, seed: int, gin: bool,
               site_batch: int = SITE_BATCH, evaluate: bool = False, address: str = "127.0.0.1:9092",
               insecure: bool = False,
               pretrain: tuple[int, int] = (1500, 1800), gin_options: dict | None = None) -> dict:
    """A fed.toml (as a dict) with the benchmark's budget; `uharmony.fed.config` validates it. ``gin_options``:
    as `bench generalize`'s (the fed.toml `train` section has the same GIN/IPA keys as a config's `augment`)."""
    from uharmony.bench.generalize import effective_model
    from uharmony.train.config import GateConfig

    gate = {**GateConfig().__dict__, **base["gate"]}
    return {"domains": list(SITES), "classes": list(classes), "name": "bench-fed", "address": address,
            "out": "federation", "insecure": insecure, "rounds": rounds, "min_sites": len(SITES),
            "start_sites": len(SITES), "round_timeout_s": 1800.0, "deadline_s": 3600.0, "aggregation": "uharmony",
            "evaluate": evaluate, "gate_pretrain_steps": pretrain[0], "gate_pretrain_views": pretrain[1],
            "train": {"local_steps": local, "batch_size": site_batch, "patch_size": list(base["patch_size"]),
                      "spacing_mm": list(base["spacing_mm"]), "fg_prob": base.get("fg_prob", 0.67),
                      "lr": base["lr"], "seed": seed, "eval_cases": 1, **G.augment_section(gin, gin_options)},
            "model": effective_model(base),  # every ModelConfig key: the budget's, the rest the defaults
            "gate": {k: gate[k] for k in ("input_size", "filters", "weight")}}


def write_fed_config(folder: Path, cfg: dict):
    """Write `folder/fed.json` and load it back through `uharmony fed`'s own validation."""
    from uharmony.fed.config import load_fed_config

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fed.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return load_fed_config(path)


def encoder_ready(settings: dict, log) -> None:
    """Pretrain the gate's contrast encoder for this gate shape now if it is not cached: otherwise every
    federated job of `arm_jobs` would pretrain the same one at once."""
    from uharmony.fed.server_app import contrast_encoder_file, uses_contrast_encoder

    if uses_contrast_encoder(settings):
        log(f"gate contrast encoder: {contrast_encoder_file(settings)}")


def arm_jobs(root: Path, todo, *, steps: int, rounds: int, site_batch: int, train_cases: int, quick: bool,
             parts: Path, gin_options: dict | None = None, central_batch: int | None = None,
             device: str = "cpu") -> list:
    """One `uharmony bench fed --arm ARM --seeds S --gin on|off` command per (arm, seed, GIN setting), each
    writing parts/<name>.json (no real Flower run: the caller runs it once, alone, for its timings)."""
    from uharmony.bench.workers import Job

    jobs = []
    for arm, seed, gin in todo:
        name = f"seed{seed}-{arm}{'+GIN' if gin else ''}"
        args = ["bench", "fed", "--work", str(root), "--seeds", str(seed), "--steps", str(steps), "--rounds",
                str(rounds), "--site-batch", str(site_batch), "--cases", str(train_cases), "--arm", arm,
                "--gin", "on" if gin else "off", "--flower-rounds", "0", "--workers", "1",
                "--json", str(parts / f"{name}.json"), "--device", device]
        args += G.gin_option_args(gin_options)
        if central_batch is not None:
            args += ["--central-batch", str(central_batch)]
        # one core, 1000 steps: a federated seed took 5.2-5.4 min (24 x 28 of 1 patch), a centralized model 2-3
        # at the budget's 2 patches per step, 5.5-5.9 at 1 (twice the steps)
        cost = 2.0 if arm == "federated" else 2.0 / (central_batch or 2)
        jobs.append(Job(name, args + (["--quick"] if quick else []), cost=cost))
    return jobs


def site_array_bytes(model, domain: str, fixed_gate: bool = True) -> int:
    """Bytes of the arrays a `domain` site sends: the global model's, by `messages.site_keys`, plus (fixed,
    negative-free gate) its gate feature statistics: float64 count, mean (F), scatter (F x F) and the style
    features' mean and scatter diagonal (S each)."""
    from uharmony.fed import messages as M
    from uharmony.model.package import portable_state_dict

    tensors = portable_state_dict(model)
    keys = M.site_keys(list(tensors), list(model.domains), domain, fixed_gate)
    stats = M.gate_stats_bytes(model.gate.pooled_dim, model.gate.style_dim) if fixed_gate else 0
    return int(sum(tensors[k].numel() * tensors[k].element_size() for k in keys)) + stats


# ------------------------------------------------------------------------------ in-process federation


class _LocalGrid:
    """What `UHarmonyStrategy.configure_train` asks of Flower's Grid in-process: the connected node ids."""

    def __init__(self, nodes: list[int]):
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class _TaskIdentity:
    """Flower's task identity (set by flwr-serverapp in a real run) for building messages in-process."""

    def __enter__(self):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        self.saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        return self

    def __exit__(self, *exc):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = self.saved


def run_federation_inprocess(cfg_dict: dict, datalists: dict[str, Path], folder: Path, log=None,
                             device: str = "cpu") -> dict:
    """One federated training with the real ServerApp strategy and ClientApp, in this process; the sites train
    on ``device``.

    Returns {"out": package folder, "rounds": [...], "bytes": [...], "seconds": {...}}.
    """
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common.serde import message_to_proto

    from uharmony.fed import client_app
    from uharmony.fed import messages as M
    from uharmony.fed.server_app import (
        GLOBAL,
        ROUND_LOG,
        UHarmonyStrategy,
        initial_model,
    )

    cfg = write_fed_config(folder, cfg_dict)
    out = folder / "federation"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    s = {**cfg.to_dict(), "out": str(out), "start_round": 1, "history": [], "resume_from": None,
         "resume_sha256": None}
    nodes = {i + 1: d for i, d in enumerate(SITES)}
    settings_paths = {}
    for node, domain in nodes.items():
        p = folder / f"site-{domain}.json"
        events = folder / f"site-{domain}.events.jsonl"
        events.unlink(missing_ok=True)
        p.write_text(json.dumps({"data": str(datalists[domain]), "device": device, "events": str(events)}))
        settings_paths[node] = p
    model = initial_model(s)
    strategy = UHarmonyStrategy(s, model)
    grid = _LocalGrid(list(nodes))
    rounds = int(s["rounds"])
    byte_rows: list[dict] = []
    t0 = time.time()
    local_seconds = 0.0
    old_env = os.environ.get("UHARMONY_FED_SITE_SETTINGS")
    try:
        with _TaskIdentity():
            for r in range(1, rounds + 1):
                t_round = time.time()
                msgs = list(strategy.configure_train(r, M.to_arrays(strategy.global_np), ConfigRecord(), grid))
                replies = []
                for msg in msgs:
                    node = int(msg.metadata.dst_node_id)
                    os.environ["UHARMONY_FED_SITE_SETTINGS"] = str(settings_paths[node])
                    ctx = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                    reply = client_app.app(message=msg, context=ctx)
                    if reply.has_error():
                        raise RuntimeError(f"site {nodes[node]} failed in round {r}: {reply.error.reason}")
                    arrays = dict(reply.content[M.ARRAYS].items())
                    if M.GATE_STATS in reply.content:
                        arrays.update({f"gate-stats.{k}": v for k, v in reply.content[M.GATE_STATS].items()})
                    byte_rows.append({
                        "round": r, "domain": nodes[node],
                        "up_array_bytes": int(sum(a.numpy().nbytes for a in arrays.values())),
                        "up_arrays": len(arrays),
                        "up_message_bytes": int(message_to_proto(reply).ByteSize()),
                        "down_array_bytes": int(sum(a.numpy().nbytes for a in msg.content[M.ARRAYS].values())),
                        "down_message_bytes": int(message_to_proto(msg).ByteSize()),
                    })
                    replies.append(reply)
                arrays, _ = strategy.aggregate_train(r, replies)
                strategy.after_round(r, arrays)
                entry = strategy.entry
                if log:
                    loss = entry["metrics"].get("loss")
                    log(f"  round {r}/{rounds}: {sum(p['accepted'] for p in entry['participants'])} of "
                        f"{len(entry['participants'])} updates aggregated, loss {loss}, "
                        f"{time.time() - t_round:.1f} s")
    finally:
        if old_env is None:
            os.environ.pop("UHARMONY_FED_SITE_SETTINGS", None)
        else:
            os.environ["UHARMONY_FED_SITE_SETTINGS"] = old_env
    log_entries = [json.loads(x) for x in (out / ROUND_LOG).read_text().splitlines() if x.strip()]
    for node, domain in nodes.items():
        ev = [json.loads(x) for x in (folder / f"site-{domain}.events.jsonl").read_text().splitlines() if x.strip()]
        local_seconds += sum(e["seconds"] for e in ev if e.get("phase") == "train")
    total = time.time() - t0
    return {"out": str(out / GLOBAL), "rounds": log_entries, "bytes": byte_rows,
            "seconds": {"total": round(total, 1), "local_training": round(local_seconds, 1),
                        "outside_local_training": round(total - local_seconds, 1)}}


# ------------------------------------------------------------------------------ real Flower run


class _Procs:
    """Processes of the real Flower run, each in its own session (the pattern of Testing/fed/fed_helpers.py)."""

    def __init__(self, root: Path):
        self.root, self.procs = root, {}

    def env(self) -> dict:
        e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MKL_NUM_THREADS="1")
        e.pop("UHARMONY_FED_FAULT", None)
        return e

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - lives as long as the process
        err = open(self.root / f"{name}.err", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "uharmony", *args], cwd=self.root, env=self.env(),
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        self.procs[name] = p
        return p

    def text(self, name: str, kind: str = "out") -> str:
        return (self.root / f"{name}.{kind}").read_text(encoding="utf-8", errors="replace")

    def events(self, name: str) -> list[dict]:
        out = []
        for x in self.text(name).splitlines():
            try:
                out.append(json.loads(x))
            except ValueError:
                continue
        return out

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def run_flower(cfg_dict: dict, datalists: dict[str, Path], folder: Path, *, timeout: float, log=None,
               device: str = "cpu") -> dict:
    """A short real federation (SuperLink + 3 SuperNodes, TLS + keys, 127.0.0.1): its round log and site timings."""
    import re

    from uharmony.fed.flower import free_port
    from uharmony.fed.keys import make_ca, make_site_key

    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    keys = folder / "keys"
    make_ca(keys)
    site_keys = {d: make_site_key(d, keys)[0] for d in SITES}
    port = free_port()
    cfg = {**cfg_dict, "address": f"127.0.0.1:{port}", "round_timeout_s": float(timeout),
           "deadline_s": float(timeout)}
    write_fed_config(folder, cfg)
    procs = _Procs(folder)
    t0 = time.time()
    result: dict = {"ok": False}
    try:
        procs.start("serve", ["fed", "serve", "--config", str(folder / "fed.json"), "--progress", "jsonl"])
        _wait(lambda: any(e.get("message", "").startswith("run ") for e in procs.events("serve"))
              or procs.procs["serve"].poll() is not None, 120, "the coordinator's run")
        if procs.procs["serve"].poll() is not None:
            raise RuntimeError("fed serve exited: " + procs.text("serve", "err")[-800:])
        for d in SITES:
            done = subprocess.run([sys.executable, "-m", "uharmony", "fed", "register", f"{site_keys[d]}.pub",
                                   "--config", str(folder / "fed.json")], env=procs.env(), capture_output=True,
                                  text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"fed register {d}: {done.stderr[-500:]}")
        for d in SITES:
            procs.start(f"site-{d}", ["fed", "join", "--server", f"127.0.0.1:{port}", "--data", str(datalists[d]),
                                      "--ca", str(keys / "ca.crt"), "--key", str(site_keys[d]), "--device", device,
                                      "--progress", "jsonl"])
        if log:
            log(f"  real Flower run: SuperLink on 127.0.0.1:{port}, 3 SuperNodes, {cfg['rounds']} round(s)")
        pat = re.compile(r"round (\d+)/\d+: trained locally \(([\d.]+) s")
        stamps: dict[str, dict[int, float]] = {}  # when each site's "trained locally" line appeared (+<= 0.75 s)
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for d in SITES:
                    for e in procs.events(f"site-{d}"):
                        m = pat.match(str(e.get("message", "")))
                        if m:
                            stamps.setdefault(d, {}).setdefault(int(m.group(1)), time.time())
                stop.wait(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            code = procs.procs["serve"].wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        stop.set()
        watcher.join(5)
        result["serve_exit"] = code
        result["seconds"] = round(time.time() - t0, 1)
        log_path = folder / "federation" / "rounds.jsonl"
        rounds = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
        local: dict[str, dict[int, float]] = {}
        for d in SITES:
            for e in procs.events(f"site-{d}"):
                m = pat.match(str(e.get("message", "")))
                if m:
                    local.setdefault(d, {})[int(m.group(1))] = float(m.group(2))
        result["local_train_seconds"] = local
        result["rounds"] = [summarise_flower_round(e, local, stamps) for e in rounds]
        result["ok"] = code == 0 and len(rounds) == int(cfg["rounds"])
        if not result["ok"]:
            result["error"] = (f"fed serve exit {code}, {len(rounds)} of {cfg['rounds']} rounds: "
                               + procs.text("serve", "err")[-600:])
    except Exception as e:  # noqa: BLE001 - reported in the results, the Dice part stands on its own
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        procs.close()
    return result


def summarise_flower_round(e: dict, local: dict[str, dict[int, float]], stamps: dict | None = None) -> dict:
    """One real round: phases, the slowest site's local training, overhead = the rest of the round.

    With `stamps` (when each site's "trained locally" line appeared), the overhead is split, roughly
    (+- 1 s), into the time until the last site finished training minus its training (message delivery,
    task process, loading the site's data, building the model) and the time after it (reply, checks,
    aggregation).
    """
    r = e["round"]
    secs = e["seconds"]
    by_node = {p["site"]: p for p in e["participants"]}
    trained = [local[d][r] for d in local if r in local[d]]
    slowest = max(trained) if trained else None
    rnd = float(secs["round"]) - float(secs.get("evaluate_phase", 0.0))
    split = {}
    done = {d: v[r] for d, v in (stamps or {}).items() if r in v}
    if done and len(done) == len(trained):
        start = float(e["time"]) - float(secs["round"])  # the round log's time is written at the round's end
        last = max(done, key=done.get)
        split = {"until_last_site_trained_seconds": round(done[last] - start, 2),
                 "last_site_before_training_seconds": round(done[last] - start - local[last][r], 2),
                 "after_last_site_trained_seconds": round(start + rnd - done[last], 2)}
    return {"round": r, "round_seconds": rnd, "train_phase_seconds": float(secs["train_phase"]), **split,
            "local_train_seconds": {d: local[d].get(r) for d in local},
            "slowest_local_train_seconds": slowest,
            "overhead_seconds": None if slowest is None else round(rnd - slowest, 2),
            "overhead_ratio": None if not slowest else round((rnd - slowest) / slowest, 3),
            "bytes_up": {p["domain"]: p["bytes_up"] for p in by_node.values()},
            "bytes_down_per_site": e["bytes"]["down_per_site"],
            "accepted": sum(1 for p in e["participants"] if p.get("accepted"))}


def _wait(predicate, timeout: float, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------ the centralized arm


def reuse_central(path: str, root: Path, base: dict, seeds, datalists: dict[str, Path], arch: dict | None = None,
                  gin_options: dict | None = None, batch: int | None = None) -> dict:
    """Centralized scores of `uharmony bench generalize --json` if, and only if, they are of the same runs.

    Checks: the JSON's budget equals ours, it holds every seed for uharmony and uharmony+GIN, and each of
    those models' cards (in ROOT/runs/seed<S>/<label>/card.json, i.e. the same --work) records our
    training config and the sha256 of our very datalists (and, given `arch`, the federated model's
    architecture: then both arms also start from the same weights, torch seeded with the seed). Raises
    ValueError saying what differs.
    """
    from uharmony.train.config import load_config
    from uharmony.train.data import datalist_sha256

    if batch is not None and batch != base["batch_size"]:
        raise ValueError(f"--central-batch {batch}: the models of `bench generalize` train {base['batch_size']} "
                         "patches per step")
    r = json.loads(Path(path).read_text())
    if r.get("config") != base:
        raise ValueError(f"{path}: its budget differs from this benchmark's: {r.get('config')} vs {base}")
    want = [datalist_sha256(datalists[d]) for d in SITES]
    out: dict = {}
    for gin in (False, True):
        label = "uharmony" + ("+GIN" if gin else "")
        runs = r.get("runs", {}).get(label, {})
        for seed in seeds:
            if str(seed) not in runs and seed not in runs:
                raise ValueError(f"{path}: no {label} run of seed {seed}")
            card_path = root / "runs" / f"seed{seed}" / label / "card.json"
            if not card_path.is_file():
                raise ValueError(f"{card_path} is missing: the centralized models must be in the same --work")
            card = json.loads(card_path.read_text())
            tmp = root / "fed" / "central-check.json"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            expected = central_config(base, seed, gin, gin_options, batch)
            tmp.write_text(json.dumps(expected))
            cfg, _ = load_config(str(tmp))
            # read back through the loader: keys added since (with their old behaviour as default) are filled in
            tmp.write_text(json.dumps(card["training"]["config"]))
            recorded, _ = load_config(str(tmp))
            if recorded.to_dict() != cfg.to_dict():
                raise ValueError(f"{card_path}: trained with another config than {expected}")
            if arch is not None and card["architecture"] != arch:
                raise ValueError(f"{card_path}: another architecture than the federated model's {arch}")
            got = [x["sha256"] for x in card["training"]["datalists"]]
            if got != want:
                raise ValueError(f"{card_path}: trained on other datalists than {[str(datalists[d]) for d in SITES]}")
            tag = "+GIN" if gin else ""
            scores = runs.get(str(seed), runs.get(seed))
            out.setdefault("centralized" + tag, {})[seed] = {d: v for d, v in scores.items() if d in SCORED}
            oracle = r.get("runs", {}).get("oracle" + tag, {})  # the same model, routed by the true domain
            if str(seed) in oracle or seed in oracle:
                out.setdefault("centralized-oracle" + tag, {})[seed] = oracle.get(str(seed), oracle.get(seed))
    return out


# ------------------------------------------------------------------------------ the benchmark


def run_bench_fed(*, work: str | None = None, seeds=(0, 1, 2), rounds: int = ROUNDS, steps: int = G.DEFAULT_STEPS,
                  site_batch: int = SITE_BATCH, central_batch: int | None = None,
                  train_cases: int = 12, val_cases: int = 3, quick: bool = False, json_path: str | None = None,
                  central_json: str | None = None, flower_rounds: int = 2, flower_timeout: float = 600.0,
                  workers: int = 1, arms=("central", "federated"), gin=(False, True),
                  gin_options: dict | None = None, device: str = "cpu") -> int:
    """Both arms for every seed and GIN setting in `gin`, then (with `flower_rounds`) one real Flower run.
    ``device``: where both arms train (the sites too) and every model is scored, as for generalize.
    ``workers`` > 1: each (arm, seed, GIN setting) in its own single-threaded process, that many at a time
    (`arm_jobs`); ``arms`` = one arm only is what such a job runs."""
    from uharmony.data.datalist import union_label_space
    from uharmony.data.sources import cache_root
    from uharmony.model.package import load_model
    from uharmony.progress import Reporter
    from uharmony.train.data import load_datasets
    from uharmony.train.trainer import run_train

    t0 = time.time()
    gin_options = dict(gin_options or {})

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    root = Path(work) if work else cache_root().parent / "bench-generalize"
    root.mkdir(parents=True, exist_ok=True)
    base = G.budget(steps, quick, device=device)
    data = G.make_data(root, train=train_cases, val=val_cases, spacing=base["spacing_mm"][0])
    datalists = {d: data[d] for d in SITES}
    union, _ = union_label_space(load_datasets([str(datalists[d]) for d in SITES]))
    classes = list(union[1:])
    local = local_steps(steps, rounds, base["batch_size"], site_batch)
    patch = tuple(base["patch_size"])
    pretrain = (5, 12) if quick else (1500, 1800)  # the gate's contrast encoder (cached per gate shape)
    central_batch = central_batch or base["batch_size"]
    c_steps = central_steps(steps, base["batch_size"], central_batch)
    plan = {"central_steps": c_steps, "batch_size": base["batch_size"], "central_batch_size": central_batch,
            "sites": len(SITES), "rounds": rounds,
            "site_batch_size": site_batch, "local_steps": local, "steps_per_site": rounds * local,
            "fed_steps_total": len(SITES) * rounds * local,
            "patches_per_domain_central": c_steps * central_batch / len(SITES),
            "patches_per_domain_fed": rounds * local * site_batch}
    log(f"budget: centralized {c_steps} steps x {patches(central_batch)} (domains "
        f"uniform); federated "
        f"{len(SITES)} sites x {rounds} rounds x {local} local steps of {patches(site_batch)} = "
        f"{plan['fed_steps_total']} steps ({plan['steps_per_site']} per site)")
    results: dict[str, dict[int, dict]] = {}
    extra: dict = {"central_source": None, "fed_runs": {}, "flower": None}
    evaluate_with = None

    def evaluator(model):
        nonlocal evaluate_with
        if evaluate_with is None:
            evaluate_with = G._evaluator(data, base["spacing_mm"], model.gate.downsample, device)
        return evaluate_with

    def save(partial: bool) -> dict:
        summary = G.summarise(results)
        doc = {"summary": summary, "ratios": ratios(summary), "runs": results, "config": base, "seeds": list(seeds),
               "classes": classes, "plan": plan, "bytes": bytes_summary(extra["fed_runs"]),
               "targets": check_targets(summary), "minutes": round((time.time() - t0) / 60, 1),
               "gin_options": gin_options,
               "partial": partial, "quick": quick, **extra}
        if json_path:
            write_json(json_path, doc, default=str)
        return doc

    def record(label: str, seed: int, scores: dict) -> None:
        results.setdefault(label, {})[seed] = scores
        log(f"seed {seed} {label:<16} " + " ".join(
            f"{d}={scores[d]['score']:.3f}" for d in (*SITES, UNSEEN) if d in scores and scores[d]["score"] is not None))

    probe: dict = {}

    def fed_settings() -> dict:
        """The federation's settings as `uharmony fed` reads them (its architecture, its gate shape); written
        by this process only when needed: jobs run in parallel must not write the same file."""
        if not probe:
            probe.update(write_fed_config(root / "fed" / "arch-check", fed_config(
                base, classes=classes, rounds=rounds, local=local, seed=seeds[0], gin=True, pretrain=pretrain,
                gin_options=gin_options, site_batch=site_batch)).to_dict())
        return probe

    # -- centralized arm: reused when it can be (it then needs both GIN settings of every seed)
    if central_json and "central" in arms:
        try:
            from uharmony.fed.server_app import arch_of

            arch = arch_of({**fed_settings(), "out": str(root / "fed" / "arch-check")})
            for label, per in reuse_central(central_json, root, base, seeds, datalists, arch, gin_options,
                                            central_batch).items():
                for seed, scores in per.items():
                    record(label, seed, scores)
            extra["central_source"] = f"reused from {central_json} (same data, config and seeds; cards checked)"
        except ValueError as e:
            log(f"not reusing the centralized results: {e}; training them here")
    todo = [(arm, seed, g) for arm in arms if arm == "federated" or extra["central_source"] is None
            for seed in seeds for g in gin]
    if workers > 1 and len(todo) > 1:
        if val_cases != (1 if quick else 3):
            raise ValueError("with workers, the validation cases are the command line's (3, or 1 with quick)")
        if any(arm == "federated" for arm, _, _ in todo):  # pretrain the gate's encoder once, not in every job
            encoder_ready(fed_settings(), log)
        parts = root / "fed" / "parts"
        jobs = arm_jobs(root, todo, steps=steps, rounds=rounds, site_batch=site_batch, train_cases=train_cases,
                        quick=quick, parts=parts, gin_options=gin_options,
                        central_batch=None if central_batch == base["batch_size"] else central_batch, device=device)
        for job in jobs:
            (parts / f"{job.name}.json").unlink(missing_ok=True)  # a file left by an earlier run is not this run's
        log(f"{len(jobs)} single-threaded jobs, {workers} at a time (logs in {parts})")
        from uharmony.bench.workers import run_jobs

        seconds = run_jobs(jobs, workers, parts, on_done=lambda name, sec: log(f"{name} done in {sec / 60:.1f} min"))
        files = [parts / f"{job.name}.json" for job in jobs]
        merged = merge_fed_results([(str(f), json.loads(f.read_text())) for f in files])  # refuses another plan, a run twice
        for label, per in merged["runs"].items():
            results[label] = {int(seed): scores for seed, scores in per.items()}
        extra["fed_runs"].update(merged["fed_runs"])
        extra["job_minutes"] = {k: round(v / 60, 1) for k, v in seconds.items()}
        extra["workers"] = workers
        save(partial=True)
        todo = []
    rep = Reporter("none")
    for arm, seed, g in todo:
        tag = "+GIN" if g else ""
        if arm == "central":
            out = root / "fed" / f"seed{seed}" / ("central" + tag)
            cfg_path = out.with_name(out.name + ".json")
            cfg_path.parent.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(json.dumps(central_config(base, seed, g, gin_options, central_batch)))
            run_train([str(datalists[d]) for d in SITES], str(out), str(cfg_path), overwrite=True, reporter=rep,
                      argv=["bench", "fed"])
            model, _ = load_model(out)
            record("centralized" + tag, seed, evaluator(model)(model, "auto", patch, only=SCORED))
            record("centralized-oracle" + tag, seed, evaluator(model)(model, "oracle", patch, only=SITES))
            save(partial=True)
            continue
        folder = root / "fed" / f"seed{seed}" / ("federated" + tag)
        log(f"seed {seed} federated{tag}: {rounds} rounds x {local} local steps at {len(SITES)} sites (in-process)")
        cfg = fed_config(base, classes=classes, rounds=rounds, local=local, seed=seed, gin=g, pretrain=pretrain,
                         gin_options=gin_options, site_batch=site_batch)
        run = run_federation_inprocess(cfg, datalists, folder, log=log, device=device)
        model, _ = load_model(run["out"])
        expected = {d: site_array_bytes(model, d) for d in SITES}
        extra["fed_runs"][f"seed{seed}{tag}"] = {"bytes": run["bytes"], "expected_up_array_bytes": expected,
                                                 "seconds": run["seconds"],
                                                 "rejected": [x for e in run["rounds"] for x in e["rejected"]],
                                                 "round_seconds": [e["seconds"]["round"] for e in run["rounds"]]}
        record("federated" + tag, seed, evaluator(model)(model, "auto", patch, only=SCORED))
        # the same model routed by the true domain: separates the gate's routing from the segmentation
        record("federated-oracle" + tag, seed, evaluator(model)(model, "oracle", patch, only=SITES))
        save(partial=True)
    if "central" in arms and extra["central_source"] is None:
        extra["central_source"] = ("trained here with the config of `uharmony bench generalize`" if central_batch ==
                                   base["batch_size"] else f"trained here: generalize's config at "
                                   f"{patches(central_batch)} per step, {c_steps} steps")

    # -- one short real Flower run: bytes and round overhead
    if flower_rounds > 0 and "federated" in arms:
        log(f"real Flower run: {flower_rounds} round(s) x {local} local steps, 3 sites, TLS + keys on 127.0.0.1")
        cfg = fed_config(base, classes=classes, rounds=flower_rounds, local=local, seed=seeds[0], gin=True,
                         pretrain=pretrain, gin_options=gin_options, site_batch=site_batch)
        extra["flower"] = run_flower(cfg, datalists, root / "fed" / "flower-run", timeout=flower_timeout, log=log,
                                     device=device)
        if not extra["flower"]["ok"]:
            log(f"the real Flower run failed: {extra['flower'].get('error', '')[:400]}")
    doc = save(partial=False)
    print(format_report(doc))
    return 0


# ------------------------------------------------------------------------------ summaries and the table


def ratio_text(r: float) -> str:
    """A fed/central ratio as a whole percent, or with one decimal where the whole percent would hide
    which side of the target it is on (0.9488 is "94.9 %", not a failing "95 %")."""
    if r < TARGET_RATIO <= round(100 * r) / 100:
        return f"{min(round(1000 * r) / 10, 100 * TARGET_RATIO - 0.1):.1f} %"  # 0.94999: 94.9 %, never 95.0 %
    return f"{100 * r:.0f} %"


def ratio_cells(row: dict, doms) -> list[str]:
    """A table's ratio cells: one per domain of ``doms``, then the mean of the trained domains ("n/a" if absent)."""
    return [ratio_text(row[d]) if d in row else "n/a" for d in (*doms, "mean of trained")]


def ratio_summary(row: dict, mean_label: str, *notes: str) -> str:
    """'mri-t1 97 %, mri-t2 99 %, ct 102 % (MEAN_LABEL 99 %; NOTES)': a target line's ratios, as the table words them."""
    inside = [f"{mean_label} {ratio_text(row['mean of trained'])}"] if "mean of trained" in row else []
    inside += notes
    return ", ".join(f"{d} {ratio_text(row[d])}" for d in SITES if d in row) + (f" ({'; '.join(inside)})" if inside else "")


def ratios(summary: dict) -> dict:
    """fed/central ratio of the mean Dice over seeds, per domain and GIN setting; also with oracle routing."""
    out = {}
    for tag, oracle in (("", ""), ("+GIN", ""), ("", "-oracle"), ("+GIN", "-oracle")):
        c, f = summary.get("centralized" + oracle + tag), summary.get("federated" + oracle + tag)
        if not c or not f:
            continue
        row = {d: f[d]["mean"] / c[d]["mean"] for d in (*SITES, UNSEEN, G.NEW_ORDERS)
               if d in c and d in f and c[d]["mean"]}
        trained_c = [c[d]["mean"] for d in SITES if d in c]
        trained_f = [f[d]["mean"] for d in SITES if d in f]
        if len(trained_c) == len(SITES) and len(trained_f) == len(SITES):
            row["mean of trained"] = float(np.mean(trained_f) / np.mean(trained_c))
        out[oracle[1:] + "-" * bool(oracle) + ("gin" if tag else "no-gin")] = row
    return out


def bytes_summary(fed_runs: dict) -> dict:
    """Per domain: bytes a site sends and receives per round (they are the same every round and seed)."""
    per: dict[str, dict] = {}
    for run in fed_runs.values():
        for b in run["bytes"]:
            p = per.setdefault(b["domain"], {k: set() for k in ("up_array_bytes", "up_message_bytes",
                                                                 "down_array_bytes", "down_message_bytes")})
            for k in p:
                p[k].add(b[k])
    return {d: {k: sorted(v) for k, v in p.items()} for d, p in per.items()}


def check_targets(summary: dict) -> list[str]:
    lines = ["targets:"]
    r = ratios(summary)
    for tag, key in (("", "no-gin"), ("+GIN", "gin")):
        if key in r:
            row = r[key]
            ok = all(row.get(d, 0) >= TARGET_RATIO for d in SITES)
            lines.append(f"- {'PASS' if ok else 'FAIL'} federated{tag} >= {100 * TARGET_RATIO:.0f} % of centralized{tag}"
                         " on every trained domain: " + ratio_summary(
                             row, "mean of trained",
                             *([f"unseen {UNSEEN} {ratio_text(row[UNSEEN])}, not a criterion"] if UNSEEN in row else [])))
    for style, name in ((UNSEEN, f"the unseen {UNSEEN}"), (G.NEW_ORDERS, "the never-seen tissue orders")):
        for arm in ("federated", "centralized"):
            a = summary.get(arm, {}).get(style, {}).get("mean")
            b = summary.get(arm + "+GIN", {}).get(style, {}).get("mean")
            if a is not None and b is not None:
                verdict = ("PASS" if b > a else "FAIL") if arm == "federated" else "info:"
                lines.append(f"- {verdict} GIN ahead of no-GIN on {name} ({arm}): "
                             f"{100 * a:.1f} -> {100 * b:.1f} ({100 * (b - a):+.1f})")
    for tag, key in (("", "oracle-no-gin"), ("+GIN", "oracle-gin")):
        if key in r:
            lines.append(f"- info: routed by the true domain (oracle), federated{tag} / centralized{tag}: "
                         + ratio_summary(r[key], "mean"))
    return lines


def format_report(doc: dict) -> str:
    summary, plan = doc["summary"], doc["plan"]
    site_batch = plan.get("site_batch_size", plan["batch_size"])  # older files: sites trained the budget's batch
    central_batch = with_central_batch(plan)["central_batch_size"]
    doms = [*SITES, UNSEEN, G.NEW_ORDERS]
    unseen = {UNSEEN: " (unseen)", G.NEW_ORDERS: f" (unseen, mean of {len(NOVEL)})"}
    lines = [(f"Dice (mean of CSF, GM, WM; mean ± sd over seeds {', '.join(map(str, doc['seeds']))}), "
             f"{'QUICK smoke run, not meaningful; ' if doc.get('quick') else ''}"
             f"{'' if doc['config'].get('device', 'cpu') == 'cpu' else 'on ' + doc['config']['device'] + '; '}"
             f"{doc['minutes']:.1f} min in all"),
             (f"centralized: {plan['central_steps']} steps x {patches(central_batch)} "
              f"({doc['central_source']}); "
             f"federated (in-process: real ServerApp strategy + ClientApp, no transport): {plan['sites']} sites x "
             f"{plan['rounds']} rounds x {plan['local_steps']} local steps of {patches(site_batch)} "
             f"= {plan['fed_steps_total']} steps"),
             *G.gin_options_line(doc.get("gin_options")),
             "",
             "| arm | " + " | ".join(d + unseen.get(d, "") for d in doms) + " | mean of trained |",
             "|" + "---|" * (len(doms) + 2)]
    r = doc["ratios"]
    for tag, key in (("", "no-gin"), ("+GIN", "gin")):
        for arm in ("centralized", "federated"):
            row = summary.get(arm + tag)
            if not row:
                continue
            cells = [G.cell(row, d) for d in doms]
            trained = [row[d]["mean"] for d in SITES if d in row]
            cells.append(f"{100 * np.mean(trained):.1f}" if trained else "n/a")
            lines.append(f"| {arm}{tag} | " + " | ".join(cells) + " |")
        if key in r:
            lines.append(f"| **fed/central{tag}** | " + " | ".join(ratio_cells(r[key], doms)) + " |")
    if any(k.endswith(("oracle", "oracle+GIN")) for k in summary):
        lines += ["", "the same models routed by the true domain (oracle; trained domains only):", "",
                  "| arm | " + " | ".join(SITES) + " | mean of trained |", "|" + "---|" * (len(SITES) + 2)]
        for tag, key in (("", "oracle-no-gin"), ("+GIN", "oracle-gin")):
            for arm in ("centralized", "federated"):
                row = summary.get(f"{arm}-oracle{tag}")
                if row:
                    cells = [G.cell(row, d) for d in SITES]
                    cells.append(f"{100 * np.mean([row[d]['mean'] for d in SITES if d in row]):.1f}")
                    lines.append(f"| {arm}-oracle{tag} | " + " | ".join(cells) + " |")
            if key in r:
                lines.append(f"| **fed/central-oracle{tag}** | " + " | ".join(ratio_cells(r[key], SITES)) + " |")
    gates = {label: {d: row[d]["gate"] for d in SITES if d in row and "gate" in row[d]} for label, row in summary.items()
             if "oracle" not in label}
    gates = {k: v for k, v in gates.items() if v}
    if gates:
        lines += ["", "gate accuracy on the trained domains: " + "; ".join(
            f"{k}: " + ", ".join(f"{d} {100 * a:.0f}%" for d, a in v.items()) for k, v in gates.items())]
    lines += ["", "bytes per site per round (federated, in-process; the same in every round and seed):",
              "| site | up: arrays | up: serialized message | down: arrays | down: serialized message |",
              "|---|---|---|---|---|"]
    for d, b in doc["bytes"].items():
        lines.append(f"| {d} | " + " | ".join("/".join(f"{v:,}" for v in b[k]) for k in
                                               ("up_array_bytes", "up_message_bytes", "down_array_bytes",
                                                "down_message_bytes")) + " |")
    fl = doc.get("flower")
    if fl:
        lines += ["", "real Flower run (SuperLink + 3 SuperNodes, TLS + keys, 127.0.0.1; sites evaluate nothing):"]
        if fl.get("rounds"):
            lines += [("| round | round s (excl. evaluation) | slowest local training s | overhead s "
                       "| overhead / local training | of it: before the last site trained s | after s "
                       "| bytes up per site |"), "|---|---|---|---|---|---|---|---|"]
            for x in fl["rounds"]:
                ratio = "n/a" if x["overhead_ratio"] is None else f"{100 * x['overhead_ratio']:.0f} %"
                lines.append(f"| {x['round']} | {x['round_seconds']:.1f} | "
                             f"{x['slowest_local_train_seconds']} | {x['overhead_seconds']} | {ratio} | "
                             f"{x.get('last_site_before_training_seconds', 'n/a')} | "
                             f"{x.get('after_last_site_trained_seconds', 'n/a')} | "
                             + ", ".join(f"{d} {v:,}" for d, v in sorted(x["bytes_up"].items())) + " |")
        if not fl.get("ok"):
            lines.append(f"FAILED: {str(fl.get('error'))[:300]}")
    lines += ["", *check_targets(summary)]  # from the scores, so a re-print follows the current wording
    return "\n".join(lines)


def merge_fed_results(docs: list[tuple[str, dict]]) -> dict:
    """One results document from one or several `bench fed --json` files of the same budget and federated
    plan (seeds, arms or GIN settings run as separate commands, or a run's job files); ValueError naming
    the file that is not a `bench fed` result, has another budget or plan, or repeats a run of another file."""
    for path, r in docs:
        if "plan" not in r or "fed_runs" not in r:
            raise ValueError(f"{path}: not the --json results of `uharmony bench fed`")
    first = docs[0][1]
    if len(docs) == 1:
        return first
    for path, r in docs[1:]:
        plan, first_plan = with_central_batch(r["plan"]), with_central_batch(first["plan"])
        if plan != first_plan:
            raise ValueError(f"{path}: another federated plan than the first file's (differs in "
                             f"{G.differing(plan, first_plan)})")
    merged = G.merge_results(docs)
    fed_runs = {k: v for _, r in docs for k, v in r["fed_runs"].items()}
    summary = G.summarise(merged["runs"])
    sources = list(dict.fromkeys(r["central_source"] for _, r in docs if r.get("central_source")))
    return {**first, "runs": merged["runs"], "seeds": merged["seeds"], "minutes": merged["minutes"],
            "summary": summary, "ratios": ratios(summary), "targets": check_targets(summary),
            "fed_runs": fed_runs, "bytes": bytes_summary(fed_runs), "central_source": "; ".join(sources) or None,
            "flower": next((r["flower"] for _, r in docs if r.get("flower")), None),
            "partial": any(r.get("partial") for _, r in docs), "quick": any(r.get("quick") for _, r in docs)}


def with_central_batch(plan: dict) -> dict:
    """The plan with its centralized batch (files before --central-batch: the budget's)."""
    return {**plan, "central_batch_size": plan.get("central_batch_size", plan["batch_size"])}


def print_from_json(docs: list[tuple[str, dict]]) -> int:
    """Re-print the report of one or more (path, results) of --json (several: merged into one table)."""
    print(format_report(merge_fed_results(docs)))
    return 0
