"""End to end: a real SuperLink (`uharmony fed serve`, TLS + site authentication) and three real
SuperNodes (`uharmony fed join`) on 127.0.0.1, two rounds on tiny phantoms.

Site C (a second synth-t1 site) scales its update x100 in round 2 (fault injection of its own
settings): the coordinator must reject it. After each round the global model package must exist,
load and segment.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fed_helpers import Procs, join_args, read_rounds, register, wait_for, write_config


@pytest.fixture(scope="module")
def federation(fed_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    config, port = write_config(root, fed_data, rounds=2, min_sites=2, start_sites=3, timeout=90,
                                  deadline=400)
    procs = Procs(root)
    try:
        procs.start("serve", ["fed", "serve", "--config", str(config), "--progress", "jsonl"])
        wait_for(lambda: any(e.get("message", "").startswith("run ") for e in procs.events("serve")), 90,
                 "the coordinator's run", procs)
        register(config, fed_data, ["site-a", "site-b", "site-c"])
        for site in ("site-a", "site-b"):
            procs.start(site, join_args(fed_data, site, port))
        procs.start("site-c", join_args(fed_data, "site-c", port),
                    extra_env={"UHARMONY_FED_FAULT": json.dumps({"scale": 100, "round": 2})})
        code = procs.wait("serve", 420)
        yield {"root": root, "out": root / "federation", "procs": procs, "code": code}
    finally:
        procs.close()


def test_serve_finishes_and_reports_rounds(federation):
    procs = federation["procs"]
    assert federation["code"] == 0, procs.err("serve")[-3000:]
    rounds = [e for e in procs.events("serve") if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2]
    assert all(e["v"] == 1 and e["total"] == 2 for e in rounds)
    assert rounds[0]["sites"] == 3 and rounds[1]["sites"] == 2
    assert {"cerebrospinal fluid", "grey matter", "white matter"} <= set(rounds[0]["metrics"]["dice"])


def test_each_round_wrote_a_model_that_segments(federation, tmp_path):
    from uharmony.data import synth
    from uharmony.infer.segment import Segmenter
    from uharmony.model.package import load_model

    out = federation["out"]
    log = read_rounds(out)
    assert [e["round"] for e in log] == [1, 2]
    hashes = set()
    for e in log:
        _model, card = load_model(out / "rounds" / f"{e['round']:04d}")
        assert card["training"]["round"] == e["round"] and card["domains"][0]["name"] == "synth-t1"
        hashes.add(card["weights"]["sha256"])
    assert len(hashes) == 2  # round 2 changed the model
    assert load_model(out / "global-model")[1]["weights"]["sha256"] == log[-1]["model_sha256"]
    case = synth.make_case(80001, "synth-t2", spacing_mm=6.0)
    synth.write_case(case, tmp_path / "t2.nii.gz")
    report = Segmenter(out / "global-model", "cpu").segment_files([tmp_path / "t2.nii.gz"], tmp_path / "seg.nii.gz")
    import nibabel as nib

    seg = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert seg.shape == case.image.shape[-3:] if case.image.ndim > 3 else seg.shape == case.image.shape
    assert report["domain"]["chosen"] in ("synth-t1", "synth-t2")


def test_round_log_has_participants_domains_and_metrics(federation):
    first = read_rounds(federation["out"])[0]
    parts = first["participants"]
    assert sorted(p["domain"] for p in parts) == ["synth-t1", "synth-t1", "synth-t2"]
    assert sorted(p["samples"] for p in parts) == [2, 2, 3]
    assert all(p["accepted"] for p in parts) and first["rejected"] == [] and first["failures"] == []
    assert set(first["domains"]) == {"synth-t1", "synth-t2"}
    assert first["domains"]["synth-t1"]["sites"] == 2 and first["domains"]["synth-t1"]["samples"] == 5
    for p in parts:  # what the sites sent: whitelisted metrics only
        assert set(p["train"]) <= {"samples", "loss", "dice"}
        assert set(p["evaluate"]) <= {"samples", "loss", "dice", "gate_accuracy", "unfamiliar_max"}
        assert p["bytes_up"] < first["bytes"]["down_per_site"]  # a site sends less than the whole model


def test_update_scaled_x100_in_round_2_is_rejected(federation):
    second = read_rounds(federation["out"])[1]
    assert len(second["rejected"]) == 1, second
    bad = second["rejected"][0]
    assert bad["domain"] == "synth-t1" and bad["reason"].startswith("update norm")
    accepted = [p for p in second["participants"] if p["accepted"]]
    assert sorted(p["domain"] for p in accepted) == ["synth-t1", "synth-t2"]
    norms = [p["update_norm"] for p in second["participants"]]
    assert max(norms) > 50 * min(norms)
    assert second["aggregated"] is True


def test_negative_free_gate_is_fitted_from_the_accepted_sites_statistics(federation):
    from safetensors.numpy import load_file

    out = federation["out"]
    first, second = read_rounds(out)
    # round 1: sites A (synth-t1, 2 cases) and C (synth-t1, 3) pooled, B (synth-t2, 2)
    assert first["gate"]["fitted_on"] == {"synth-t1": 5, "synth-t2": 2} and first["gate"]["never_chosen"] == []
    assert first["gate"]["sites"] == {"synth-t1": 2, "synth-t2": 1} and first["gate"]["from_earlier_rounds"] == []
    # every site's statistics were plausible: within the spread of synthetic heads in every contrast
    assert first["gate"]["stats_rejected"] == [] and second["gate"]["stats_rejected"] == []
    assert len(first["gate"]["stats_plausibility"]) == 3
    assert all(0 <= m["spread"] < 10 and 0 < m["offset"] < 10 for m in first["gate"]["stats_plausibility"].values())
    # round 2: C's update was rejected, but its round-1 statistics (of the same fixed features) still count
    site_c = second["rejected"][0]["site"]
    assert site_c in {p["site"] for p in first["participants"] if p["samples"] == 3}  # the same node id
    assert second["gate"]["fitted_on"] == {"synth-t1": 5, "synth-t2": 2}
    assert second["gate"]["from_earlier_rounds"] == [site_c]
    assert 0 < second["gate"]["shrinkage"] <= 1  # OAS: 5 cases for the gate's features
    w1, w2 = (load_file(str(out / "rounds" / f"{r:04d}" / "model.safetensors")) for r in (1, 2))
    convs = [k for k in w1 if k.startswith("gate.convs.")]
    assert convs and all(np.array_equal(w1[k], w2[k]) for k in convs)  # the gate's features stay fixed ...
    from uharmony.train.contrast import encoder_file

    encoder = load_file(str(encoder_file(1, [8, 8, 8], [4, 8], steps=10, views=12)))  # ... the pretrained encoder's
    assert sorted(f"gate.convs.{k}" for k in encoder) == sorted(convs)
    assert all(np.array_equal(w1[f"gate.convs.{k}"], v) for k, v in encoder.items())
    # the classifier rows are fitted, not averaged: LDA of the kept per-site statistics, the same in both rounds
    from uharmony.fed.aggregate import fit_gate_lda, pool
    from uharmony.fed.server_app import GATE_STATS_FILE, load_gate_stats

    kept = load_gate_stats(out / GATE_STATS_FILE, ["synth-t1", "synth-t2"])
    by_domain = {d: pool([st for dom, st in kept.values() if dom == d]) for d in ("synth-t1", "synth-t2")}
    rows, _ = fit_gate_lda(by_domain, ["synth-t1", "synth-t2"])
    assert sorted(rows) == sorted(k for k in w2 if k.startswith("gate.classifier."))
    for k, v in rows.items():
        np.testing.assert_allclose(w2[k], v, rtol=1e-5, atol=1e-6)
        assert np.array_equal(w1[k], w2[k])
    stats = load_file(str(out / "gate-stats.safetensors"))  # kept for a restarted coordinator: per site
    counts = sorted(int(stats[f"{p['site']}.count"][0]) for p in first["participants"])
    assert counts == [2, 2, 3]
    card = json.loads((out / "global-model" / "card.json").read_text())
    assert card["gate"]["calibration"]["routing_fit"].startswith("negative-free")
    assert card["training"]["domain_lr_scale"] == float(len(card["domains"]))  # the default factor, resolved
    # what `uharmony adapt` refits the rows from later: each domain's pooled count and mean, as `train` writes
    assert card["gate"]["method"] == "negative-free" and set(card["gate"]["lda"]["domains"]) == set(by_domain)
    for d, st in by_domain.items():
        assert card["gate"]["lda"]["domains"][d]["count"] == st.count
        np.testing.assert_allclose(card["gate"]["lda"]["domains"][d]["mean"], st.mean, rtol=1e-6, atol=1e-9)
    assert card["gate"]["lda"]["shrinkage"] == pytest.approx(second["gate"]["shrinkage"], abs=1e-4)
    assert card["gate"]["calibration"]["features"]["kind"] == "contrast encoder"
    assert card["gate"]["calibration"]["features"]["steps"] == 10
    assert card["gate"]["calibration"]["fitted_on"] == {"synth-t1": 5, "synth-t2": 2}
    # the unfamiliar-input flag: each domain's Gaussian from its sites' statistics, the threshold 1.25 x the
    # largest validation score the sites reported under that round's model
    from uharmony.fed.aggregate import familiarity_gaussian

    for d, st in by_domain.items():
        mean, var = familiarity_gaussian(st)
        np.testing.assert_allclose(w2[f"gate.calibration.{d}.mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w2[f"gate.calibration.{d}.var"], var, rtol=1e-5, atol=1e-6)
        assert float(w2[f"gate.calibration.{d}.count"]) == st.count
    for e in (first, second):
        assert e["gate"]["familiarity_fitted"] == ["synth-t1", "synth-t2"]
        held = e["familiarity"]["held_max"]
        assert set(held) == {p["site"] for p in e["participants"]} and all(v >= 0 for v in held.values())
        assert e["familiarity"]["threshold"] == pytest.approx(1.25 * max(held.values()), rel=1e-5)
    assert card["gate"]["unfamiliar_threshold"] == second["familiarity"]["threshold"] < 1e6
    assert card["gate"]["calibration"]["held_max_by_site"] == second["familiarity"]["held_max"]


def test_sites_emit_round_events(federation):
    procs = federation["procs"]
    for site in ("site-a", "site-b"):
        rounds = [e for e in procs.events(site) if e["event"] == "round"]
        assert [e["round"] for e in rounds] == [1, 2], procs.err(site)[-2000:]
        m = rounds[0]["metrics"]
        assert rounds[0]["total"] == 2 and rounds[0]["sites"] == 3
        assert isinstance(m["loss"], float) and isinstance(m["gate_accuracy"], float)
        assert {"cerebrospinal fluid", "grey matter", "white matter"} <= set(m["dice"])


def test_sigterm_ends_a_site_cleanly_with_exit_8(federation):
    import signal

    procs = federation["procs"]
    procs.kill("site-a", signal.SIGTERM)
    assert procs.wait("site-a", 30) == 8
    last = procs.events("site-a")[-1]
    assert last["event"] == "error" and last["code"] == 8


def test_adapting_the_federated_model_refits_its_gate_from_the_remembered_means(federation, tmp_path):
    """A site adapts the federation's model to a new contrast with its own cases only (no --keep): the old
    domains' routing comes from the means the coordinator recorded, the fixed features stay fixed."""
    import subprocess

    from fed_helpers import UHARMONY, env
    from safetensors.numpy import load_file

    from uharmony.train.data import write_synth_datalist

    base = federation["out"] / "global-model"
    new = write_synth_datalist(tmp_path / "flair", "synth-flair", domain="flair", name="flair",
                               training_seeds=(81, 82, 83), spacing_mm=6.0)
    (tmp_path / "adapt.toml").write_text("steps = 2\ncheckpoint_every = 0\n")
    p = subprocess.run([*UHARMONY, "adapt", "--model", str(base), "--data", str(new), "--out", str(tmp_path / "adapted"),
                        "--config", str(tmp_path / "adapt.toml")], env=env(), capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "remembered means of synth-t1, synth-t2" in p.stderr
    old = json.loads((base / "card.json").read_text())["gate"]["lda"]["domains"]
    card = json.loads((tmp_path / "adapted" / "card.json").read_text())
    assert card["gate"]["method"] == "negative-free"
    lda = card["gate"]["lda"]["domains"]
    assert lda["synth-t1"] == old["synth-t1"] and lda["synth-t2"] == old["synth-t2"] and lda["flair"]["count"] == 3
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "adapted" / "model.safetensors"))
    convs = [k for k in before if k.startswith("gate.convs.")]
    assert convs and all(np.array_equal(before[k], after[k]) for k in convs)
    assert "gate.classifier.flair.weight" in after
