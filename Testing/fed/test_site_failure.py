"""A site whose ClientApp fails answers every round with an error at once, stays in the federation, and
sends no file name; a site whose images do not read is refused by `fed join` before it starts.

Flower's SuperNode handles one message at a time and waits for its reply; a ClientApp failure without an
error reply would leave the site silent until each round's timeout, for the rest of the federation.
Here the failing site joined with a domain the federation does not have (fed.toml's `domains`), which
only its ClientApp can find out. Real SuperLink and SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess

import pytest
from fed_helpers import UHARMONY, Procs, env, join_args, read_rounds, register, wait_for, write_config

TIMEOUT_S = 90  # per round; a reply that does not come shows up as "no reply within 90 s"


@pytest.fixture(scope="module")
def failing_site(fed_data, tmp_path_factory):
    from uharmony.train.data import write_synth_datalist

    root = tmp_path_factory.mktemp("site-failure")
    datalist = write_synth_datalist(root / "flair-site", "synth-flair", name="flair", training_seeds=(20, 21),
                                    validation_seeds=(22,), spacing_mm=6.0)
    config, port = write_config(root, fed_data, rounds=2, min_sites=1, start_sites=2, timeout=TIMEOUT_S,
                                deadline=400, evaluate=False)
    data = {**fed_data, "data": {**fed_data["data"], "site-b": datalist}}
    procs = Procs(root)
    try:
        procs.start("serve", ["fed", "serve", "--config", str(config), "--progress", "jsonl"])
        wait_for(lambda: any(e.get("message", "").startswith("run ") for e in procs.events("serve")), 90,
                 "the coordinator's run", procs)
        register(config, data, ["site-a", "site-b"])
        procs.start("site-a", join_args(data, "site-a", port))
        procs.start("site-b", join_args(data, "site-b", port))
        code = procs.wait("serve", 360)
        yield {"out": root / "federation", "procs": procs, "code": code, "datalist": datalist}
    finally:
        procs.close()


def test_each_round_gets_the_sites_error_at_once_and_goes_on_with_the_others(failing_site):
    procs = failing_site["procs"]
    assert failing_site["code"] == 0, procs.err("serve")[-3000:]
    log = read_rounds(failing_site["out"])
    why = f"rounds {log}\nsite-b err {procs.err('site-b')[-3000:]}"
    assert [e["round"] for e in log] == [1, 2], why
    for entry in log:
        assert [p["domain"] for p in entry["participants"]] == ["synth-t1"], why
        assert entry["aggregated"] is True, why
        [failure] = entry["failures"]
        # an error reply, not a timeout: in round 2 too, so the site's SuperNode took the next message
        assert failure["reason"] == "the site's ClientApp failed (BadDatalistError); the details are in the site's log", why
        assert entry["seconds"]["round"] < TIMEOUT_S, why
    assert len({e["failures"][0]["site"] for e in log}) == 1, why


def test_the_failing_site_says_why_locally_only_and_stays_joined(failing_site):
    procs, datalist = failing_site["procs"], failing_site["datalist"]
    log_text = (failing_site["out"] / "rounds.jsonl").read_text(encoding="utf-8")
    assert "flair-site" not in log_text and "synth-flair" not in log_text  # nothing of the site's data
    # the site's own log (what `fed join` prints, and the Slicer module shows) says why, per round
    failed = [e["message"] for e in procs.events("site-b") if "failed here" in e.get("message", "")]
    assert [m.split(" (")[0] for m in failed] == ["round 1", "round 2"], procs.out("site-b")
    assert all(f"BadDatalistError: {datalist}: domain 'synth-flair' is not one of the federation's domains" in m
               for m in failed), failed
    assert procs.procs["site-b"].poll() is None  # still in the federation after two failed rounds


def test_join_refuses_a_site_whose_images_do_not_read_listing_each(fed_data, tmp_path):
    from uharmony.train.data import write_synth_datalist

    datalist = write_synth_datalist(tmp_path / "t2", "synth-t2", name="t2", training_seeds=(3, 4),
                                    validation_seeds=(5,), spacing_mm=6.0)
    cases = json.loads(datalist.read_text(encoding="utf-8"))
    broken = [datalist.parent / c["image"] for c in (cases["training"][1], cases["validation"][0])]
    for image in broken:  # the header still reads, so the datalist check passes; the voxels end halfway
        raw = image.read_bytes()
        image.write_bytes(raw[: len(raw) // 2])
    p = subprocess.run([*UHARMONY, "fed", "join", "--server", "127.0.0.1:9", "--data", str(datalist),
                        "--ca", str(fed_data["ca"]), "--key", str(fed_data["keys"]["site-b"]), "--progress", "none"],
                       env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 5, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0] == "uharmony: error: 2 of the site's 3 images cannot be used"
    assert lines[1:] == [f"{image}: is truncated or corrupt (Compressed file ended before the end-of-stream marker "
                         "was reached)" for image in broken]
