"""`uharmony bench generalize --single-source`: the summary, its target line, and a real (tiny) run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from uharmony.bench import single_source as S


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
        assert set(scores) == set(S.STYLES) and all(0.0 <= v <= 1.0 for v in scores.values())
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
