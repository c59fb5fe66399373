"""A site whose ClientApp fails (here: a truncated training image, whose header still reads) answers every
round with an error at once, stays in the federation, and sends no file name.

Flower's SuperNode handles one message at a time and waits for its reply; a ClientApp failure without an
error reply would leave the site silent until each round's timeout, for the rest of the federation.
Real SuperLink and SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fed_helpers import Procs, join_args, read_rounds, register, wait_for, write_config

TIMEOUT_S = 90  # per round; a reply that does not come shows up as "no reply within 90 s"


@pytest.fixture(scope="module")
def broken_site(fed_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("site-failure")
    src = Path(fed_data["data"]["site-b"])
    shutil.copytree(src.parent, root / "t2-broken")
    datalist = root / "t2-broken" / src.name
    image = datalist.parent / json.loads(datalist.read_text(encoding="utf-8"))["training"][0]["image"]
    config, port = write_config(root, fed_data, rounds=2, min_sites=1, start_sites=2, timeout=TIMEOUT_S,
                                deadline=400, evaluate=False)
    data = {**fed_data, "data": {**fed_data["data"], "site-b": datalist}}
    procs = Procs(root)
    try:
        procs.start("serve", ["fed", "serve", "--config", str(config), "--progress", "jsonl"])
        wait_for(lambda: any(e.get("message", "").startswith("run ") for e in procs.events("serve")), 90,
                 "the coordinator's run", procs)
        register(config, data, ["site-a", "site-b"])
        # The header still reads, so join's datalist check passes; the voxel data ends halfway.
        raw = image.read_bytes()
        image.write_bytes(raw[: len(raw) // 2])
        procs.start("site-a", join_args(data, "site-a", port))
        procs.start("site-b", join_args(data, "site-b", port))
        code = procs.wait("serve", 360)
        yield {"out": root / "federation", "procs": procs, "code": code, "image": image}
    finally:
        procs.close()


def test_each_round_gets_the_sites_error_at_once_and_goes_on_with_the_others(broken_site):
    procs = broken_site["procs"]
    assert broken_site["code"] == 0, procs.err("serve")[-3000:]
    assert "connected to the coordinator" in procs.out("site-b")  # join accepted the datalist
    log = read_rounds(broken_site["out"])
    why = f"rounds {log}\nsite-b err {procs.err('site-b')[-3000:]}"
    assert [e["round"] for e in log] == [1, 2], why
    for entry in log:
        assert [p["domain"] for p in entry["participants"]] == ["synth-t1"], why
        assert entry["aggregated"] is True, why
        [failure] = entry["failures"]
        # an error reply, not a timeout: in round 2 too, so the site's SuperNode took the next message
        assert failure["reason"] == "the site's ClientApp failed (BadInputError); the details are in the site's log", why
        assert entry["seconds"]["round"] < TIMEOUT_S, why
    assert len({e["failures"][0]["site"] for e in log}) == 1, why


def test_the_failing_site_names_its_file_locally_only_and_stays_joined(broken_site):
    procs, image = broken_site["procs"], broken_site["image"]
    log_text = (broken_site["out"] / "rounds.jsonl").read_text(encoding="utf-8")
    assert image.name not in log_text and "t2-broken" not in log_text
    # the site's own log (what `fed join` prints, and the Slicer module shows) says which file, per round
    failed = [e["message"] for e in procs.events("site-b") if "failed here" in e.get("message", "")]
    assert [m.split(" (")[0] for m in failed] == ["round 1", "round 2"], procs.out("site-b")
    assert all(f"BadInputError: {image}: is truncated or corrupt" in m for m in failed), failed
    assert procs.procs["site-b"].poll() is None  # still in the federation after two failed rounds
