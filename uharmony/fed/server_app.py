"""The coordinator's ServerApp: the U-Harmony strategy over Flower's FedAvg loop.

Runs inside the ``flwr-serverapp`` process the SuperLink starts for a run; `uharmony fed serve` passes
everything in the run config key ``settings`` (JSON). Per round: wait for ``min_sites`` connected
sites (writing why it waits to ``status.json``), send the global arrays, check every reply against
the whitelist (`messages.check_reply`), screen and aggregate (`aggregate`), let the sites that
answered evaluate the new model, then write the global model package (``global-model/``, and a copy
in ``rounds/NNNN/``) and one line of the round log (``rounds.jsonl``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from uharmony.data.io import atomic_output, write_json
from uharmony.fed import aggregate as A
from uharmony.fed import messages as M
from uharmony.fed.config import site_domain_lr_scale

app = ServerApp()
ROUND_LOG = "rounds.jsonl"
STATUS = "status.json"
GLOBAL = "global-model"
GATE_STATS_FILE = "gate-stats.safetensors"  # per-domain gate feature statistics, kept for a restarted coordinator


def gate_method_of(s: dict) -> str:
    """The gate method in force: a plain FedAvg model (one joint domain) has no routing to fit."""
    return s.get("gate_method", "negative-free") if s["aggregation"] == "uharmony" else "averaged"


def save_gate_stats(path: Path, site_stats: dict) -> None:
    """Write each site's latest gate statistics ({site: (domain, FeatureStats)}) atomically."""
    from safetensors.numpy import save_file

    arrays = {f"{site}.{k}": np.ascontiguousarray(v, np.float64) for site, (_, st) in site_stats.items()
              for k, v in (("count", np.asarray([st.count], np.float64)), ("mean", st.mean), ("scatter", st.scatter),
                           ("style-mean", st.style_mean), ("style-scatter", st.style_scatter)) if v is not None}
    sites = json.dumps({site: domain for site, (domain, _) in site_stats.items()})
    with atomic_output(path) as tmp:
        save_file(arrays, tmp, metadata={"sites": sites})


def load_gate_stats(path: Path, domains: list[str]) -> dict:
    """{site: (domain, FeatureStats)} from `save_gate_stats`, for the federation's domains only.

    A file written before statistics were kept per site holds one entry per domain; each becomes a
    pseudo-site ``domain:<name>`` (replaced as soon as a site of that domain reports again).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    raw = load_file(str(path))
    sites = json.loads(meta["sites"]) if "sites" in meta else \
        {f"domain:{k[:-len('.count')]}": k[:-len(".count")] for k in raw if k.endswith(".count")}
    legacy = "sites" not in meta
    out = {}
    for site, domain in sites.items():
        key = domain if legacy else site
        if domain in domains and f"{key}.count" in raw:
            out[site] = (domain, A.FeatureStats(int(raw[f"{key}.count"][0]), raw[f"{key}.mean"], raw[f"{key}.scatter"],
                                                raw.get(f"{key}.style-mean"), raw.get(f"{key}.style-scatter")))
    return out


def append_jsonl(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def arch_of(s: dict) -> dict:
    from uharmony.model.network import ArchConfig

    joint = s["aggregation"] == "fedavg"
    return ArchConfig(in_channels=len(s["channels"]), num_classes=1 + len(s["classes"]),
                      domains=["joint"] if joint else list(s["domains"]), filters=list(s["model"]["filters"]),
                      strides=list(s["model"]["strides"]),
                      harmony_levels=0 if joint else s["model"]["harmony_levels"],
                      poly_degree=s["model"]["poly_degree"], clamp=s["model"]["clamp"],
                      poly_scale=s["model"]["poly_scale"],
                      gate_input_size=list(s["gate"]["input_size"]), gate_filters=list(s["gate"]["filters"])).to_dict()


def initial_model(s: dict):
    """The run's starting model: the last global model written (after a restart) or a fresh one."""
    import torch

    from uharmony.errors import BadModelError
    from uharmony.model.network import ArchConfig, UHarmonyNet
    from uharmony.model.package import load_model

    arch = arch_of(s)
    if s.get("resume_from"):
        model, card = load_model(s["resume_from"])
        if ArchConfig.from_dict(card["architecture"]).to_dict() != arch:  # a key absent from an older card: its default
            raise BadModelError("the last global model's architecture differs from fed.toml's; move the out folder "
                                "away to start a new federation", s["resume_from"])
        s["gate_features_info"] = card["gate"].get("calibration", {}).get("features")
        return model
    torch.manual_seed(int(s["train"]["seed"]))
    model = UHarmonyNet(ArchConfig.from_dict(arch))
    if uses_contrast_encoder(s):
        from uharmony.train.contrast import load_encoder

        path = s.get("gate_encoder") or contrast_encoder_file(s)
        s["gate_features_info"] = {"kind": "contrast encoder", **load_encoder(model.gate, Path(path))}
    return model


def uses_contrast_encoder(s: dict) -> bool:
    """Negative-free gate with pretrained contrast features (`uharmony.train.contrast`), the default."""
    return gate_method_of(s) == "negative-free" and s.get("gate_features", "contrast") == "contrast"


def contrast_encoder_file(s: dict, progress=None) -> Path:
    """The cached contrast encoder for the federation's gate shape (pretrained now if not cached yet)."""
    from uharmony.train.contrast import ensure_encoder

    return ensure_encoder(len(s["channels"]), s["gate"]["input_size"], s["gate"]["filters"],
                          steps=int(s.get("gate_pretrain_steps", 1500)), views=int(s.get("gate_pretrain_views", 1800)),
                          progress=progress)


def gate_stats_reference(model) -> A.FeatureStats:
    """What the fixed gate's features look like on synthetic heads in every contrast: sites' statistics
    are screened against it (`aggregate.screen_stats`)."""
    from uharmony.train.contrast import reference_features

    return A.FeatureStats.of(reference_features(model.gate))


def make_card(s: dict, arch: dict, round_no: int, entry: dict, lda: dict | None = None) -> dict:
    from uharmony import __version__
    from uharmony.data.preprocess import DEFAULT_NORMALIZATION
    from uharmony.train.trainer import OVERLAP, class_table

    union = ["background", *s["classes"]]
    modality = "+".join(s["channels"])
    fam = entry.get("familiarity")
    return {
        "name": s["name"], "version": f"0.{round_no}.0",
        "description": f"U-Harmony model trained by federated learning (FedGIN, {s['aggregation']} aggregation), "
                       f"round {round_no} of {s['rounds']}",
        "input": {"channels": [{"name": c} for c in s["channels"]], "normalization": dict(DEFAULT_NORMALIZATION),
                  "spacing_mm": list(s["train"]["spacing_mm"]), "orientation": "RAS",
                  "patch_size": list(s["train"]["patch_size"]), "overlap": OVERLAP, "sw_batch_size": 1},
        "domains": [{"name": d, "modality": modality, "description": "trained at the federation's sites of this domain",
                     "annotated_classes": list(s["classes"])} for d in arch["domains"]],
        "classes": class_table(union),
        "gate": {"unfamiliar_threshold": fam["threshold"] if fam else 1e6, "routing": "argmax",
                 "calibration": {**familiarity_record(s, fam), **gate_fit_record(s, entry)},
                 # as `uharmony train`'s cards: adapt refits a negative-free gate's rows from these means
                 "method": "negative-free" if gate_method_of(s) == "negative-free" else "trained",
                 **({"lda": lda} if lda else {})},
        "intended_use": "Research. A federated model; validate it on your own data before relying on it. "
                        "Not a medical device.",
        "limitations": ["The unfamiliar-input flag compares the fixed gate's features with every site's training "
                        "cases: it fires on inputs unlike all of them (noise, masks, partial or skull-stripped "
                        "scans), not on a new MRI contrast of a whole head (docs/federation.md)." if fam else
                        "The unfamiliar-input flag is not calibrated for this federated model (it never fires).",
                        *(["The domain gate's routing is fitted without negatives (LDA on the gate's fixed "
                           "features, never trained on site data); check the domain it chose, and pass --domain "
                           "when the domain is known."] if gate_method_of(s) == "negative-free" else []),
                        "Only as good as the sites' data: " + ", ".join(s["domains"])],
        "training": {"method": f"federated-{s['aggregation']}", "round": round_no, "rounds": s["rounds"],
                     "local_steps": s["train"]["local_steps"], "gin": s["train"]["gin"],
                     "domain_lr_scale": site_domain_lr_scale(s),
                     "participants": [{"domain": p["domain"], "samples": p["samples"]}
                                      for p in entry["participants"] if p.get("accepted")],
                     "uharmony_version": __version__, "domains": list(s["domains"])},
        "evaluation": {"routing": "joint" if s["aggregation"] == "fedavg" else "auto", "split": "site validation",
                       "dice": {d: v.get("dice", {}) for d, v in entry["domains"].items()},
                       "gate_accuracy": {d: v.get("gate_accuracy") for d, v in entry["domains"].items()}},
    }


THRESHOLD_FACTOR = 1.25  # as `trainer.calibrate_gate`: 1.25 x the largest held-back score


def familiarity_threshold(participants: list[dict]) -> dict | None:
    """The unfamiliar-input threshold from the sites' evaluate replies: 1.25 x the largest ``unfamiliar_max``
    (each site's largest score of its validation cases under this round's model), or None when no site
    reported one (evaluation off, the averaged gate, or no domain described yet)."""
    held = {p["site"]: p["evaluate"]["unfamiliar_max"] for p in participants
            if (p.get("evaluate") or {}).get("unfamiliar_max") is not None}
    if not held:
        return None
    return {"threshold": round(THRESHOLD_FACTOR * max(held.values()), 6), "held_max": held}


def familiarity_record(s: dict, fam: dict | None) -> dict:
    if fam is None:
        why = "the sites reported no validation scores" if gate_method_of(s) == "negative-free" and s["evaluate"] \
            else "no site data reaches the coordinator"
        return {"note": f"unfamiliar-input score not calibrated: {why}"}
    return {"score": "min over domains of the mean squared z-distance of gate style features",
            "familiarity_fitted_on": "each domain's training cases, from the count, mean and scatter its sites sent",
            "threshold_rule": f"{THRESHOLD_FACTOR:g} x the largest score of the sites' validation cases (each site "
                              "reports its own largest)",
            "held_max_by_site": fam["held_max"]}


def gate_fit_record(s: dict, entry: dict) -> dict:
    if gate_method_of(s) != "negative-free":
        return {"routing_fit": "gate trained at every site and averaged over all sites"}
    features = s.get("gate_features_info") or {"kind": "random: the seeded initial convolutions, never trained"}
    return {"routing_fit": "negative-free: linear discriminant analysis of the fixed gate's pooled features, fitted "
                           "by the coordinator from each domain's feature count, mean and scatter sent by its sites",
            "features": features, **entry.get("gate", {})}


class UHarmonyStrategy(FedAvg):
    """FedAvg's round loop with U-Harmony's aggregation, screening, per-round packages and log."""

    def __init__(self, s: dict, model):
        from uharmony.model.package import portable_state_dict

        n = int(s["min_sites"])
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if s["evaluate"] else 0.0, min_train_nodes=n,
                         min_evaluate_nodes=1, min_available_nodes=n)
        self.s, self.model = s, model
        self.out = Path(s["out"])
        self.arch = arch_of(s)
        self.domains = list(self.arch["domains"])
        self.classes = ["background", *s["classes"]]
        self.global_np = {k: v.numpy() for k, v in portable_state_dict(model).items()}
        self.gate_method = gate_method_of(s)
        self.stats_dim = model.gate.pooled_dim if self.gate_method == "negative-free" else None
        self.style_dim = model.gate.style_dim if self.stats_dim else 0
        stats_file = self.out / GATE_STATS_FILE
        # {site: (domain, stats)}: each site's latest accepted statistics. The gate's features are fixed,
        # so a site that misses a round (or whose update is rejected) still describes its data.
        self.site_stats = load_gate_stats(stats_file, self.domains) if s.get("resume_from") and stats_file.exists() \
            else {}
        self.stats_reference = gate_stats_reference(model) if self.stats_dim else None
        self.expected = {k: (v.shape, str(v.dtype)) for k, v in self.global_np.items()}
        self.history: list[float] = list(s.get("history", []))
        self.offset = int(s.get("start_round", 1)) - 1
        self.entry: dict = {}
        self.responders: list[int] = []
        self.outbox: list = []  # the messages of the current phase, their ids set by the grid on sending
        self.t_round = time.time()
        self.t_eval: float | None = None
        self.start_info = {"new_run_from_round": self.offset, "resumed_from": s.get("resume_from"),
                           "model_sha256": s.get("resume_sha256")}

    # -- helpers ---------------------------------------------------------------------------
    def status(self, **fields) -> None:
        write_json(self.out / STATUS, {"time": time.time(), **fields})

    def _outgoing(self, record: RecordDict, nodes: list[int], kind: str) -> list:
        self.outbox = list(self._construct_messages(record, nodes, kind))
        return self.outbox

    def by_site(self, replies) -> list[tuple[int, object]]:
        """(site, reply) for each reply. Flower's own error replies (a site that stopped sending heartbeats)
        come from the SuperLink, node 1, and name only the instruction they answer: the grid wrote that
        instruction's id into the message we sent."""
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self.outbox if m.metadata.message_id}
        # Messages that never passed a SuperLink (the benchmark's in-process rounds) have no id: the sender
        # then names itself.
        return [(sent.get(r.metadata.reply_to_message_id) or int(r.metadata.src_node_id), r) for r in replies]

    def wait_for_sites(self, grid: Grid, round_no: int) -> list[int]:
        need = int(self.s["min_sites"])
        if round_no == 1:  # a new federation waits for everyone; a restarted one needs min_sites
            need = max(need, int(self.s.get("start_sites", 0)))
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= need:
                return nodes
            self.status(state="waiting", round=round_no, connected=len(nodes), needed=need)
            time.sleep(1.0)

    def round_config(self, round_no: int, sites: int) -> ConfigRecord:
        t = dict(self.s["train"], joint=self.s["aggregation"] == "fedavg", gate_weight=self.s["gate"]["weight"],
                 gate_method=self.gate_method, domain_lr_scale=site_domain_lr_scale(self.s))
        return ConfigRecord({"global-round": round_no, "num-rounds": int(self.s["rounds"]), "num-sites": sites,
                             "arch": M.encode_json(self.arch), "classes": M.encode_json(self.classes),
                             "train": M.encode_json(t)})

    # -- training ----------------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        round_no = self.offset + server_round
        nodes = self.wait_for_sites(grid, round_no)
        self.t_round = time.time()
        self.t_eval = None
        self.status(state="training", round=round_no, connected=len(nodes), needed=int(self.s["min_sites"]))
        self.entry = {"round": round_no, "run_round": server_round, "sent_to": len(nodes), "participants": [],
                      "rejected": [], "failures": [],
                      "bytes": {"down_per_site": int(sum(a.nbytes for a in self.global_np.values()))}}
        if server_round == 1:
            self.entry["start"] = self.start_info
        record = RecordDict({M.ARRAYS: arrays, M.CONFIG: self.round_config(round_no, len(nodes))})
        return self._outgoing(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        e = self.entry
        e["seconds"] = {"train_phase": round(time.time() - self.t_round, 2)}
        updates: list[A.Update] = []
        answered = set()
        for node, msg in self.by_site(replies):
            answered.add(node)
            if msg.has_error():
                e["failures"].append({"site": str(node), "reason": str(msg.error.reason)[:500]})
                continue
            try:
                domain = M.check_reply(msg.content, kind="train", expected=self.expected, domains=self.domains,
                                       classes=self.classes[1:], gate_stats_dim=self.stats_dim,
                                       style_dim=self.style_dim)
            except ValueError as err:
                e["rejected"].append({"site": str(node), "reason": f"message outside the whitelist: {err}"})
                continue
            metrics = M.metrics_dict(msg.content[M.METRICS])
            arrays = M.from_arrays(msg.content[M.ARRAYS])
            stats = M.read_gate_stats(msg.content[M.GATE_STATS], self.stats_dim, self.style_dim) \
                if self.stats_dim else None
            sent = int(sum(a.nbytes for a in arrays.values()))
            sent += 0 if stats is None else M.gate_stats_bytes(stats.mean.size, self.style_dim)
            updates.append(A.Update(site=str(node), domain=domain, samples=metrics["samples"], arrays=arrays,
                                    extra={"train": metrics, "bytes_up": sent, "gate_stats": stats}))
        for node in (int(m.metadata.dst_node_id) for m in self.outbox):
            if node not in answered:
                e["failures"].append({"site": str(node), "reason": f"no reply within {self.s['round_timeout_s']:g} s"})
        accepted, rejected = A.screen(self.global_np, updates, self.history, factor=float(self.s["reject_factor"]))
        for u, why in rejected:
            e["rejected"].append({"site": u.site, "domain": u.domain, "reason": why})
        for u in updates:
            e["participants"].append({"site": u.site, "domain": u.domain, "samples": u.samples,
                                      "accepted": any(u is a for a in accepted),
                                      "update_norm": None if not np.isfinite(u.norm) else round(u.norm, 6),
                                      "bytes_up": u.extra["bytes_up"], "train": u.extra["train"]})
        self.responders = [int(u.site) for u in updates]
        e["aggregated"] = len(accepted) >= int(self.s["min_sites"])
        if e["aggregated"]:
            self.global_np = A.aggregate(self.global_np, accepted, self.domains, self.s["aggregation"],
                                         server_lr=float(self.s.get("server_lr", 1.0)))
            self.history += [u.norm for u in accepted]
            if self.stats_dim:
                self.fit_gate(accepted)
        else:
            e["not_aggregated_because"] = (f"{len(accepted)} accepted update(s), fewer than min_sites = "
                                           f"{self.s['min_sites']}; the global model is unchanged")
        losses = [u.extra["train"].get("loss") for u in accepted if u.extra["train"].get("loss") is not None]
        metrics = MetricRecord({"loss": float(np.mean(losses))}) if losses else None
        return M.to_arrays(self.global_np), metrics

    def fit_gate(self, accepted: list[A.Update]) -> None:
        """Negative-free gate: keep each accepted site's latest plausible statistics, pool them per domain,
        LDA on all."""
        measured, refused = {}, []
        for u in accepted:
            why, measures = A.screen_stats(u.extra["gate_stats"], u.samples, self.stats_reference,
                                           float(self.s["gate_stats_limit"]))
            if measures:
                measured[u.site] = measures
            if why:
                refused.append({"site": u.site, "domain": u.domain, "reason": why})
            else:
                self.site_stats[u.site] = (u.domain, u.extra["gate_stats"])
        gate_stats = self.pooled_stats()
        sites = Counter(domain for domain, _ in self.site_stats.values())
        rows, shrinkage = A.fit_gate_lda(gate_stats, self.domains)
        self.global_np.update(rows)
        familiar = self.fit_familiarity(gate_stats)
        save_gate_stats(self.out / GATE_STATS_FILE, self.site_stats)
        fresh = {u.site for u in accepted} - {r["site"] for r in refused}
        self.entry["gate"] = {"fitted_on": {d: gate_stats[d].count for d in self.domains if d in gate_stats},
                              "sites": {d: sites[d] for d in self.domains if d in sites},
                              "from_earlier_rounds": sorted(s for s in self.site_stats if s not in fresh),
                              "never_chosen": [d for d in self.domains if d not in gate_stats],
                              "shrinkage": round(shrinkage, 4), "familiarity_fitted": familiar,
                              "stats_plausibility": measured, "stats_rejected": refused}

    def pooled_stats(self) -> dict[str, A.FeatureStats]:
        """Each domain's gate-feature statistics: the kept statistics of its sites, pooled."""
        by_domain: dict[str, list] = {}
        for domain, st in self.site_stats.values():
            by_domain.setdefault(domain, []).append(st)
        return {d: A.pool(v) for d, v in by_domain.items()}

    def lda_record(self) -> dict | None:
        """The card's ``gate.lda`` (each described domain's pooled count and mean): what the rows in force were
        fitted from, since the kept statistics change only when the rows are refitted. None without any."""
        from uharmony.train.gate import lda_record

        gate_stats = self.pooled_stats()
        if not gate_stats:
            return None
        return lda_record(gate_stats, A.fit_gate_lda(gate_stats, self.domains)[1], self.domains)

    def fit_familiarity(self, gate_stats: dict[str, A.FeatureStats]) -> list[str]:
        """Each described domain's unfamiliar-input Gaussian (``gate.calibration.<d>.*``) from its pooled
        statistics: what `DomainGate.fit_calibration` would fit on the sites' cases. Returns those domains."""
        fitted = []
        for d in (d for d in self.domains if d in gate_stats):
            st = gate_stats[d]
            gaussian = A.familiarity_gaussian(st)
            if gaussian is None:
                continue
            for name, value in (("mean", gaussian[0]), ("var", gaussian[1]), ("count", np.asarray(float(st.count)))):
                key = f"gate.calibration.{d}.{name}"
                self.global_np[key] = np.asarray(value, self.global_np[key].dtype).reshape(self.global_np[key].shape)
            fitted.append(d)
        return fitted

    # -- evaluation --------------------------------------------------------------------------
    def configure_evaluate(self, server_round, arrays, config, grid):
        if not self.s["evaluate"] or not self.responders:
            return []
        self.t_eval = time.time()
        self.status(state="evaluating", round=self.offset + server_round)
        record = RecordDict({M.ARRAYS: arrays, M.CONFIG: self.round_config(self.offset + server_round,
                                                                             len(self.responders))})
        return self._outgoing(record, self.responders, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round, replies):
        e = self.entry
        if self.t_eval is None:  # evaluation off, or no site answered the training phase
            return
        e["seconds"]["evaluate_phase"] = round(time.time() - self.t_eval, 2)
        by_site = {p["site"]: p for p in e["participants"]}
        for site, msg in self.by_site(replies):
            node = str(site)
            if msg.has_error():
                e["failures"].append({"site": node, "phase": "evaluate", "reason": str(msg.error.reason)[:500]})
                continue
            try:
                M.check_reply(msg.content, kind="evaluate", expected=self.expected, domains=self.domains,
                              classes=self.classes[1:])
            except ValueError as err:
                e["rejected"].append({"site": node, "phase": "evaluate", "reason": f"message outside the whitelist: {err}"})
                continue
            if node in by_site:
                by_site[node]["evaluate"] = M.metrics_dict(msg.content[M.METRICS])

    # -- after each round: package + log ---------------------------------------------------
    def after_round(self, server_round: int, arrays: ArrayRecord):
        if server_round == 0:
            return
        import torch

        from uharmony.model.package import load_portable_state_dict, save_package
        from uharmony.model.registry import sha256_file

        e = self.entry
        round_no = self.offset + server_round
        e["domains"] = domain_summary(e["participants"])
        e["metrics"] = overall(e["domains"])
        e["seconds"]["round"] = round(time.time() - self.t_round, 2)
        e["accepted_norms"] = [round(x, 6) for x in self.history]
        fam = familiarity_threshold(e["participants"])
        if fam:
            e["familiarity"] = fam
        load_portable_state_dict(self.model, {k: torch.from_numpy(v.copy()) for k, v in self.global_np.items()})
        card = make_card(self.s, self.arch, round_no, e, self.lda_record())
        (self.out / "rounds").mkdir(parents=True, exist_ok=True)
        save_package(self.model, card, self.out / "rounds" / f"{round_no:04d}", overwrite=True)
        save_package(self.model, card, self.out / GLOBAL, overwrite=True)
        e["model"] = GLOBAL
        e["model_sha256"] = sha256_file(self.out / GLOBAL / "model.safetensors")
        e["time"] = time.time()
        append_jsonl(self.out / ROUND_LOG, e)
        self.status(state="round-done", round=round_no)
        return


def domain_summary(participants: list[dict]) -> dict:
    """Per domain: sites, samples, mean train loss, mean Dice per class and gate accuracy (sites equal)."""
    out: dict = {}
    for p in participants:
        d = out.setdefault(p["domain"], {"sites": 0, "samples": 0, "_loss": [], "_dice": {}, "_gate": []})
        d["sites"] += 1
        d["samples"] += p["samples"]
        if p.get("accepted") and p["train"].get("loss") is not None:
            d["_loss"].append(p["train"]["loss"])
        ev = p.get("evaluate") or {}
        for c, v in ev.get("dice", {}).items():
            d["_dice"].setdefault(c, []).append(v)
        if ev.get("gate_accuracy") is not None:
            d["_gate"].append(ev["gate_accuracy"])
    for d in out.values():
        d["loss"] = round(float(np.mean(d.pop("_loss"))), 5) if d["_loss"] else None
        d["dice"] = {c: round(float(np.mean(v)), 4) for c, v in d.pop("_dice").items()}
        g = d.pop("_gate")
        d["gate_accuracy"] = round(float(np.mean(g)), 4) if g else None
    return out


def overall(domains: dict) -> dict:
    """The round's metrics, each domain weighing the same."""
    losses = [d["loss"] for d in domains.values() if d["loss"] is not None]
    dice: dict[str, list[float]] = {}
    for d in domains.values():
        for c, v in d["dice"].items():
            dice.setdefault(c, []).append(v)
    gates = [d["gate_accuracy"] for d in domains.values() if d["gate_accuracy"] is not None]
    return {"loss": round(float(np.mean(losses)), 5) if losses else None,
            "dice": {c: round(float(np.mean(v)), 4) for c, v in dice.items()},
            "gate_accuracy": round(float(np.mean(gates)), 4) if gates else None}


@app.main()
def main(grid: Grid, context) -> None:
    s = json.loads(str(context.run_config["settings"]))
    model = initial_model(s)
    strategy = UHarmonyStrategy(s, model)
    start = int(s.get("start_round", 1))
    strategy.status(state="starting", round=start)
    strategy.start(grid=grid, initial_arrays=M.to_arrays(strategy.global_np), num_rounds=int(s["rounds"]) - start + 1,
                   timeout=float(s["round_timeout_s"]), evaluate_fn=strategy.after_round)
    strategy.status(state="finished", round=int(s["rounds"]))
