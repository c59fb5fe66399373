"""`uharmony bench generalize --gate negative-free --methods uharmony`: a real (tiny) run of the rows the
gate changes, their models' gate method, and the JSON that `--from-json` re-prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tiny_negative_free_run_trains_only_the_uharmony_rows(tmp_path):
    out = tmp_path / "gen.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "UHARMONY_DATA": str(tmp_path / "cache/sources")}
    cmd = [sys.executable, "-m", "uharmony", "bench", "generalize", "--quick", "--seeds", "0", "--steps", "3",
           "--cases", "2", "--gate", "negative-free", "--methods", "uharmony", "--work", str(tmp_path / "work"),
           "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["config"]["gate"]["method"] == "negative-free"
    assert set(res["runs"]) == {"uharmony", "oracle", "uharmony+GIN", "oracle+GIN", "adapted+GIN", "from-start+GIN"}
    runs = tmp_path / "work/runs/seed0"
    assert not (runs / "joint").exists() and not (runs / "separate").exists()
    for name in ("uharmony", "uharmony+GIN", "from-start+GIN", "adapted"):
        card = json.loads((runs / name / "card.json").read_text())
        assert card["gate"]["method"] == "negative-free", name
    adapted = json.loads((runs / "adapted/card.json").read_text())["gate"]["lda"]["domains"]
    assert list(adapted) == ["mri-t1", "mri-t2", "ct", "mri-flair"]
    # the gate routes every case with the same fixed features: the gate accuracy is reported per trained domain
    assert all(res["runs"]["uharmony"]["0"][d]["gate"] is not None for d in ("mri-t1", "mri-t2", "ct"))
    again = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--from-json", str(out)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0
    table = lambda s: [ln for ln in s.splitlines() if ln.startswith("| ")]  # noqa: E731
    assert table(again.stdout) == table(r.stdout) and any(ln.startswith("| oracle |") for ln in table(r.stdout))


def test_gin_off_trains_one_setting_and_from_json_merges_runs_split_over_processes(tmp_path):
    out = tmp_path / "joint.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "UHARMONY_DATA": str(tmp_path / "cache/sources")}
    cmd = [sys.executable, "-m", "uharmony", "bench", "generalize", "--quick", "--seeds", "0", "--steps", "3",
           "--cases", "2", "--methods", "joint", "--gin", "off", "--work", str(tmp_path / "work"), "--json", str(out),
           "--device", "auto"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"joint"} and res["seeds"] == [0]
    # --device auto is resolved before training: the results and the run's own config name the device it used
    from uharmony.device import detect

    assert res["config"]["device"] == detect()["auto"]
    assert json.loads((tmp_path / "work/runs/seed0/joint.json").read_text())["device"] == detect()["auto"]
    # scored on the never-seen tissue orders too (FLAIR's validation anatomy in each), shown as one column
    scores = res["runs"]["joint"]["0"]
    assert all(0 <= scores[d]["score"] <= 1 for d in ("order-gcw", "order-gwc", "order-wcg"))
    assert "| method | mri-t1 | mri-t2 | ct | mri-flair (unseen) | new tissue orders (unseen, mean of 3) |" in r.stdout
    assert "| joint | " in r.stdout.split("| method | order-gcw | order-gwc | order-wcg |")[1]
    assert sorted(p.name for p in (tmp_path / "work/runs/seed0").iterdir() if p.is_dir()) == ["joint"]
    # a second process's file: the same budget, other runs (here: the joint scores relabelled as seed 1's
    # uharmony, with an oracle row two points above it)
    other = {**res, "seeds": [1], "runs": {"uharmony": {"1": res["runs"]["joint"]["0"]},
                                           "oracle": {"1": {d: {**v, "score": v["score"] + 0.02}
                                                            for d, v in res["runs"]["joint"]["0"].items()}}}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--from-json", str(out),
                             str(tmp_path / "other.json")], capture_output=True, text=True, timeout=120, env=env)
    assert merged.returncode == 0, merged.stderr
    rows = {ln.split(" | ")[0][2:] for ln in merged.stdout.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert rows == {"method", "joint", "uharmony", "oracle"}
    assert "seeds 0, 1" in merged.stdout
    # seed 1's uharmony equals seed 0's joint: every difference is 0.0 and the oracle gap is +2.0
    assert "PASS uharmony >= joint on every domain: mri-t1 +0.0, mri-t2 +0.0, ct +0.0" in merged.stdout
    assert "FAIL uharmony within 1.5 Dice points of oracle on average: gap +2.0" in merged.stdout
    # another budget, another model setting (a default changed between versions), or a run in two files:
    # refused in one line naming the file
    assert res["model"]["poly_scale"] == 0.1 and res["model"]["filters"] == res["config"]["model"]["filters"]
    (tmp_path / "budget.json").write_text(json.dumps({**other, "config": {**res["config"], "steps": 4}}))
    (tmp_path / "scale.json").write_text(json.dumps({**other, "model": {**res["model"], "poly_scale": 1.0}}))
    for bad in ("budget.json", "scale.json", "joint.json"):
        r = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--from-json", str(out),
                            str(tmp_path / bad)], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(tmp_path / bad) in r.stderr, r.stderr
        assert bad != "scale.json" or "differs in poly_scale" in r.stderr, r.stderr


def test_gin_options_reach_every_gin_run_through_the_workers_and_are_recorded(tmp_path):
    out = tmp_path / "ipa.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "UHARMONY_DATA": str(tmp_path / "cache/sources")}
    cmd = [sys.executable, "-m", "uharmony", "bench", "generalize", "--quick", "--seeds", "0", "--steps", "3",
           "--cases", "2", "--methods", "joint", "--workers", "2", "--gin-option", "ipa=true",
           "--gin-option", "augment.gin_kernel_sizes=[1]", "--work", str(tmp_path / "work"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = tmp_path / "work/runs/seed0"
    # the config each job trained with: the options with GIN on only
    assert json.loads((runs / "joint+GIN.json").read_text())["augment"] == {"gin": True, "ipa": True,
                                                                            "gin_kernel_sizes": [1]}
    assert json.loads((runs / "joint.json").read_text())["augment"] == {"gin": False}
    res = json.loads(out.read_text())
    assert res["gin_options"] == {"ipa": True, "gin_kernel_sizes": [1]} and set(res["runs"]) == {"joint", "joint+GIN"}
    assert "GIN runs with augment.ipa = true, augment.gin_kernel_sizes = [1]" in r.stdout
    # results of other GIN options do not merge into one table: one line naming the file, exit 2
    (tmp_path / "plain.json").write_text(json.dumps({**res, "gin_options": {}, "seeds": [1],
                                                     "runs": {"joint": {"1": res["runs"]["joint"]["0"]}}}))
    bad = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--from-json", str(out),
                          str(tmp_path / "plain.json")], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "plain.json: other GIN options" in bad.stderr, bad.stderr
    # a bad option is refused before any data is made
    r = subprocess.run(cmd[:-4] + ["--gin-option", "gin_p=2", "--work", str(tmp_path / "w2")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.strip() == "uharmony: error: --gin-option: key 'augment.gin_p' must be in [0, 1]"
    assert not (tmp_path / "w2").exists()


def test_the_new_tissue_orders_column_is_the_per_seed_mean_and_has_its_gin_target():
    from uharmony.bench import generalize as G

    def seed(flair, orders):
        return {"mri-t1": {"score": 0.8}, "mri-t2": {"score": 0.8}, "ct": {"score": 0.6}, "mri-flair": {"score": flair},
                **{d: {"score": v} for d, v in zip(("order-gcw", "order-gwc", "order-wcg"), orders)}}

    runs = {"joint": {"0": seed(0.5, (0.3, 0.2, 0.1)), "1": seed(0.5, (0.5, 0.4, 0.3))},
            "joint+GIN": {"0": seed(0.4, (0.4, 0.3, 0.2)), "1": seed(0.4, (0.6, 0.5, 0.4))},
            "separate": {"0": {"mri-t1": {"score": 0.7}, "mri-flair": {"score": 0.3}}}}  # an older file: no orders
    summary = G.summarise(runs)
    assert summary["joint"][G.NEW_ORDERS]["mean"] == 0.3  # seeds' means 0.2 and 0.4
    assert abs(summary["joint"][G.NEW_ORDERS]["sd"] - 0.1414) < 1e-3 and summary["joint"]["order-gcw"]["mean"] == 0.4
    assert G.NEW_ORDERS not in summary["separate"]
    lines = G.check_targets(summary)
    assert "- FAIL GIN raises joint on the unseen mri-flair: 50.0 -> 40.0 (-10.0)" in lines
    assert "- PASS GIN raises joint on the never-seen tissue orders: 30.0 -> 40.0 (+10.0)" in lines
    table = G.format_table(summary, seeds=[0, 1], steps=10, quick=False, minutes=1.0)
    assert "| joint | 80.0 ± 0.0 | 80.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 30.0 ± 14.1 | 73.3 |" in table
    assert "| separate | 70.0 ± 0.0 | n/a | n/a | 30.0 ± 0.0 | n/a | 70.0 |" in table
    assert "| joint+GIN | 50.0 ± 14.1 | 40.0 ± 14.1 | 30.0 ± 14.1 |" in table
    # a seed of an older file (no orders) merged in: a cell over fewer seeds than its row says how many
    runs["joint"]["2"] = {k: v for k, v in seed(0.5, (0.0, 0.0, 0.0)).items() if not k.startswith("order-")}
    table = G.format_table(G.summarise(runs), seeds=[0, 1, 2], steps=10, quick=False, minutes=1.0)
    assert "| joint | 80.0 ± 0.0 | 80.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 30.0 ± 14.1 (n=2) | 73.3 |" in table
    assert "| joint | 40.0 ± 14.1 (n=2) | 30.0 ± 14.1 (n=2) | 20.0 ± 14.1 (n=2) |" in table
    assert "| joint+GIN | 80.0 ± 0.0 | 80.0 ± 0.0 | 60.0 ± 0.0 | 40.0 ± 0.0 | 40.0 ± 14.1 | 73.3 |" in table


def test_a_device_this_machine_lacks_is_refused_in_one_line_before_any_data_is_made(tmp_path):
    from uharmony.device import detect

    found = detect()
    absent = "cuda" if not found["cuda"] else "mps" if not found["mps"] else None
    if absent is None:
        import pytest

        pytest.skip("this machine has both CUDA and MPS")
    env = {**os.environ, "PYTHONPATH": str(REPO), "UHARMONY_DATA": str(tmp_path / "cache/sources")}
    for extra in ([], ["--single-source"]):
        r = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--quick", "--device", absent,
                            "--work", str(tmp_path / "work"), *extra], capture_output=True, text=True, timeout=120,
                           env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [f"uharmony: error: --device {absent} was asked for, but "
                                                 + ("no CUDA GPU is available" if absent == "cuda"
                                                    else "Apple MPS is not available") + " (try --device auto)"]
        assert not (tmp_path / "work").exists()


def test_the_device_reaches_every_run_and_the_table_names_a_gpu():
    from uharmony.bench.generalize import budget, format_table

    assert budget(1000, False)["device"] == "cpu" and budget(1000, False, device="cuda")["device"] == "cuda"
    assert budget(3, True, device="mps")["device"] == "mps"
    title = lambda **kw: format_table({}, seeds=[0], steps=15000, quick=False, minutes=42.0, **kw).splitlines()[0]  # noqa: E731
    assert title(device="cuda").endswith("15000 steps per model on cuda; 42.0 min in all")
    assert title().endswith("15000 steps per model; 42.0 min in all")  # the CPU tables read as before


def test_a_quick_run_on_a_gpu_trains_and_scores_there(tmp_path):
    """Runs only where CUDA or MPS is present (never in CI): the GPU path of `--device`, end to end."""
    import pytest

    from uharmony.device import detect

    found = detect()
    if found["auto"] == "cpu":
        pytest.skip("no GPU here (CUDA or MPS)")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "UHARMONY_DATA": str(tmp_path / "cache/sources")}
    r = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--quick", "--seeds", "0", "--steps",
                        "3", "--cases", "2", "--methods", "uharmony", "--gin", "off", "--no-adapt", "--workers", "1",
                        "--device", found["auto"], "--work", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["config"]["device"] == found["auto"] and f"on {found['auto']};" in r.stdout
    assert all(0 <= res["runs"]["uharmony"]["0"][d]["score"] <= 1 for d in ("mri-t1", "mri-t2", "ct"))
