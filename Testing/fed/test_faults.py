"""Faults with real processes: a site killed mid-round (the round completes with the others), the
coordinator killed and restarted (a new run continues from the last global model written)."""

from __future__ import annotations

import json

import pytest
from fed_helpers import Procs, join_args, read_rounds, register, wait_for, write_config


@pytest.fixture(scope="module")
def faults(fed_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    # The round waits round_timeout_s for the killed site. 25 s was too short on a loaded CI machine: a live
    # site's first ClientApp (a cold start importing torch and MONAI, three at once on two cores) missed it;
    # 75 s was missed once too, by a site reconnecting to the restarted coordinator while the machine was loaded.
    config, port = write_config(root, fed_data, rounds=2, min_sites=2, start_sites=3, timeout=120, deadline=600,
                                evaluate=False)
    out = root / "federation"
    procs = Procs(root)
    try:
        procs.start("serve", ["fed", "serve", "--config", str(config), "--progress", "jsonl"])
        wait_for(lambda: any(e.get("message", "").startswith("run ") for e in procs.events("serve")), 90,
                 "the coordinator's run", procs)
        register(config, fed_data, ["site-a", "site-b", "site-c"])
        for site in ("site-a", "site-b", "site-c"):
            procs.start(site, join_args(fed_data, site, port))

        def training_round_1():
            try:
                s = json.loads((out / "status.json").read_text())
            except (OSError, ValueError):
                return False
            return s.get("state") == "training" and s.get("round") == 1

        wait_for(training_round_1, 180, "round 1 to start with three sites", procs, poll=0.2)
        procs.kill("site-c")  # SIGKILL the whole site (supervisor, SuperNode, ClientApp) mid-round
        wait_for(lambda: len(read_rounds(out)) >= 1, 240, "round 1 to complete without site C", procs)
        first_log = read_rounds(out)[0]
        procs.kill("serve")  # the coordinator dies (SIGKILL: serve and its SuperLink)
        procs.wait("serve", 30)
        procs.start("serve2", ["fed", "serve", "--config", str(config), "--progress", "jsonl"])
        code = procs.wait("serve2", 500)
        yield {"out": out, "procs": procs, "code": code, "first": first_log}
    finally:
        procs.close()


def test_a_site_killed_mid_round_does_not_stop_the_round(faults):
    first = faults["first"]
    assert first["sent_to"] == 3
    assert sorted(p["domain"] for p in first["participants"]) == ["synth-t1", "synth-t2"]
    assert first["aggregated"] is True
    # One failure, named by site C's node id (Flower's own "Node Unavailable" reply comes from the SuperLink,
    # node 1; it is put down to the site it answers for, so no site is counted twice or as node 1).
    [failure] = first["failures"]
    assert failure["site"] not in {p["site"] for p in first["participants"]} | {"1"}, first["failures"]
    assert "no reply within" in failure["reason"] or "Node Unavailable" in failure["reason"], failure
    assert (faults["out"] / "rounds" / "0001" / "model.safetensors").is_file()


def test_a_restarted_coordinator_continues_from_the_last_global_model(faults):
    procs = faults["procs"]
    assert faults["code"] == 0, procs.err("serve2")[-3000:]
    log = read_rounds(faults["out"])
    why = (f"round log {log}\nserve2 events {procs.out('serve2')[-3000:]}\nserve2 err {procs.err('serve2')[-3000:]}"
           + "".join(f"\n{site} events {procs.out(site)[-1500:]}\n{site} err {_flower_lines(procs.err(site))[-3000:]}"
                     for site in ("site-a", "site-b")))
    assert [e["round"] for e in log] == [1, 2], why
    second = log[1]
    assert second["run_round"] == 1, why  # a new Flower run ...
    assert second["start"]["new_run_from_round"] == 1, why  # ... that started after round 1
    assert second["start"]["model_sha256"] == faults["first"]["model_sha256"], why  # from round 1's global model
    assert second["model_sha256"] != faults["first"]["model_sha256"], why
    assert second["aggregated"] is True, why
    events = procs.events("serve2")
    assert [e["round"] for e in events if e["event"] == "round"] == [2], why
    assert any("continuing after round 1" in e.get("message", "") for e in events), why
    # the restarted coordinator's card keeps the gate's per-domain means (what `uharmony adapt` refits from)
    card = json.loads((faults["out"] / "global-model" / "card.json").read_text())
    lda = card["gate"]["lda"]["domains"]
    assert {d: v["count"] for d, v in lda.items()} == second["gate"]["fitted_on"], why


def _flower_lines(text: str) -> str:
    """A site's log without the SuperNode's per-request access lines."""
    return "\n".join(x for x in text.splitlines() if "uvicorn.access" not in x and "HTTP/1.1" not in x)
