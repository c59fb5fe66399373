"""`uharmony bench generalize --single-source`: the summary, its target line, and a real (tiny) run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from uharmony.bench import generalize as G
from uharmony.bench import single_source as S
from uharmony.data import heads


def _runs(gin_gain: float) -> dict:
    # two sources, two seeds; the own style is high, the others low; GIN moves the others by gin_gain
    runs = {}
    for src in ("mri-t1", "ct"):
        for tag, gain in (("", 0.0), ("+GIN", gin_gain)):
            runs.setdefault(src, {})[tag] = {
                seed: {d: (0.7 if d == src else 0.2 + gain + 0.02 * seed) for d in S.STYLES} for seed in (0, 1)}
    return runs


def test_summary_leaves_the_own_style_out_of_the_never_seen_mean():
    s = S.summarise(_runs(0.1))
    row = s["mri-t1"][""]
    assert row["mri-t1"] == pytest.approx(0.7)
    assert row["unseen"] == pytest.approx(0.21)  # 0.20 and 0.22 over the seeds, the own 0.7 left out
    assert row["unseen_sd"] == pytest.approx(0.02 / 2 ** 0.5)
    assert s["ct"]["+GIN"]["unseen"] == pytest.approx(0.31)


@pytest.mark.parametrize("gain, verdict", [(0.1, "PASS"), (-0.05, "FAIL")])
def test_target_line_follows_the_measured_difference(gain, verdict):
    line = S.check_target(S.summarise(_runs(gain)))
    assert line.startswith(f"- {verdict} GIN raises single-source models")
    assert f"({100 * gain:+.1f};" in line and "mri-t1" in line and "ct" in line


def test_a_tiny_real_run_scores_every_style_and_reprints_from_json(tmp_path):
    out = tmp_path / "single.json"
    cmd = [sys.executable, "-m", "uharmony", "bench", "generalize", "--single-source", "--quick", "--seeds", "0",
           "--steps", "3", "--cases", "2", "--work", str(tmp_path / "work"), "--json", str(out),
           "--gin-option", "gin_kernel_sizes=[1]"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["kind"] == "single-source" and res["seeds"] == [0] and res["config"]["steps"] == 3
    assert set(res["runs"]) == {"mri-t1", "mri-t2", "ct"}
    for arms in res["runs"].values():
        assert set(arms) == {"", "+GIN"}
        scores = arms[""]["0"]
        assert set(scores) == {*S.STYLES, *heads.BENCH_NOVEL_STYLES} and all(0.0 <= v <= 1.0 for v in scores.values())
    # the new-orders column is the mean over the three never-seen tissue orders (one seed here)
    t1 = res["runs"]["mri-t1"]["+GIN"]["0"]
    novel = sum(t1[d] for d in heads.BENCH_NOVEL_STYLES) / 3
    assert abs(S.summarise(res["runs"])["mri-t1"]["+GIN"][G.NEW_ORDERS] - novel) < 1e-9
    assert f"| mean on never-seen styles | {G.NEW_ORDERS} |" in r.stdout
    # one model per source and arm, each trained on its own style only
    card = json.loads((tmp_path / "work/runs/seed0/single-ct+GIN/card.json").read_text())
    assert [d["domain"] for d in card["training"]["datalists"]] == ["ct"]
    assert card["training"]["config"]["augment"]["gin"] is True
    assert card["training"]["config"]["augment"]["gin_kernel_sizes"] == [1]  # the --gin-option, GIN runs only
    plain = json.loads((tmp_path / "work/runs/seed0/single-ct/card.json").read_text())["training"]["config"]["augment"]
    assert plain["gin"] is False and plain["gin_kernel_sizes"] == [1, 3]
    assert res["gin_options"] == {"gin_kernel_sizes": [1]} and "GIN runs with augment.gin_kernel_sizes = [1]" in r.stdout
    assert "| mri-t1+GIN |" in r.stdout and "(own)" in r.stdout and "GIN raises single-source" in r.stdout
    again = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", "--from-json", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    table = lambda s: [ln for ln in s.splitlines() if ln.startswith("| ")]  # noqa: E731
    assert table(again.stdout) == table(r.stdout)


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_from_json_of_a_bad_file_is_one_line_and_bad_input(tmp_path, content):
    from uharmony.errors import ExitCode

    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    for bench in ("generalize", "fed"):
        r = subprocess.run([sys.executable, "-m", "uharmony", "bench", bench, "--from-json", str(path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == int(ExitCode.BAD_INPUT)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.stderr


def _doc(runs: dict, steps: int = 500, seeds=(0, 1)) -> dict:
    return {"kind": "single-source", "runs": runs, "config": {"steps": steps}, "seeds": list(seeds), "minutes": 1.0,
            "gin_options": {}}


def test_results_split_by_arm_merge_into_one_table_and_target():
    runs = _runs(0.1)
    plain = {src: {"": arms[""]} for src, arms in runs.items()}
    gin = {src: {"+GIN": arms["+GIN"]} for src, arms in runs.items()}
    merged = S.merge_results([("a.json", _doc(plain)), ("b.json", _doc(gin))])
    # seeds come back as JSON keys (strings), as from the files
    assert merged["kind"] == "single-source" and merged["runs"] == json.loads(json.dumps(runs))
    assert merged["seeds"] == [0, 1]
    assert S.check_target(S.summarise(merged["runs"])).startswith("- PASS")
    # one arm alone has no target to check
    assert S.check_target(S.summarise(plain)).startswith("- n/a")


@pytest.mark.parametrize("second, problem", [
    (_doc({"ct": {"": {0: {}}}}, steps=1000), "another budget"),
    (_doc({"mri-t1": {"+GIN": {0: {}}}}), "run mri-t1+GIN seed 0 is in another of the files too"),
])
def test_merging_refuses_another_budget_or_a_repeated_run(second, problem):
    first = _doc({"mri-t1": {"+GIN": {0: {}}}})
    with pytest.raises(ValueError, match=re.escape(problem)) as e:
        S.merge_results([("a.json", first), ("b.json", second)])
    assert str(e.value).startswith("b.json: ")


def test_one_source_one_arm_per_command_and_the_parts_print_as_one_table(tmp_path):
    from uharmony.errors import ExitCode

    base = [sys.executable, "-m", "uharmony", "bench", "generalize"]
    common = ["--quick", "--seeds", "0", "--steps", "3", "--cases", "2", "--work", str(tmp_path / "work")]
    parts = []
    for gin in ("off", "on"):
        parts.append(tmp_path / f"{gin}.json")
        r = subprocess.run([*base, "--single-source", "--sources", "ct", "--gin", gin, *common, "--json", str(parts[-1])],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    off, on = (json.loads(p.read_text()) for p in parts)
    assert off["runs"].keys() == on["runs"].keys() == {"ct"}
    assert set(off["runs"]["ct"]) == {""} and set(on["runs"]["ct"]) == {"+GIN"}
    assert sorted(p.name for p in (tmp_path / "work/runs/seed0").iterdir() if p.is_dir()) == ["single-ct", "single-ct+GIN"]
    r = subprocess.run([*base, "--from-json", *map(str, parts)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ct")]
    assert [ln.split(" |")[0] for ln in rows] == ["| ct", "| ct+GIN"]
    assert "GIN raises single-source models" in r.stdout and "n/a" not in r.stdout.split("targets:")[1]
    # a part of the main benchmark does not merge with single-source parts
    main = tmp_path / "main.json"
    main.write_text(json.dumps({"runs": {}, "config": {"steps": 3}, "seeds": [0], "minutes": 0.0}))
    r = subprocess.run([*base, "--from-json", str(parts[0]), str(main)], capture_output=True, text=True, timeout=120)
    assert r.returncode == int(ExitCode.BAD_INPUT) and str(main) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, problem", [
    (["--sources", "ct"], "--sources is for --single-source"),
    (["--single-source", "--sources", "mri-flair"], "mri-flair is not a training style"),
])
def test_sources_outside_single_source_or_unknown_are_usage_errors(tmp_path, args, problem):
    from uharmony.errors import ExitCode

    r = subprocess.run([sys.executable, "-m", "uharmony", "bench", "generalize", *args, "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == int(ExitCode.USAGE) and problem in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()  # refused before any data is made
