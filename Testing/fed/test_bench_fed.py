"""`uharmony bench fed --quick --workers 2`: the real command end to end on a tiny scale (~2.5 minutes).

The centralized and federated models are really trained (a few steps), the federated arm runs the
real ServerApp strategy and ClientApp in-process, and one round runs over a real SuperLink and three
real SuperNodes on 127.0.0.1. Each (arm, GIN setting) runs as its own child process, as the
benchmark does by default. The figures mean nothing at this scale; what is checked is the report's
structure, the budget arithmetic, and that the bytes a site sends per round are exactly the sizes of
the parameter arrays it owns (read back from the global model's safetensors file, not from the code
that chose them), in-process and over real Flower alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SITES = ("mri-t1", "mri-t2", "ct")
UNSEEN = "mri-flair"
NOVEL = ("order-gcw", "order-gwc", "order-wcg")  # the unseen style's heads in tissue orders no site has
LABELS = ("centralized", "federated", "centralized+GIN", "federated+GIN")
ORACLE = ("centralized-oracle", "federated-oracle", "centralized-oracle+GIN", "federated-oracle+GIN")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-fed")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("UHARMONY_FED_FAULT", None)
    done = subprocess.run([sys.executable, "-m", "uharmony", "bench", "fed", "--quick", "--seeds", "0",
                           "--work", str(root / "work"), "--json", str(root / "r.json"), "--workers", "2",
                           "--gin-option", "gin_kernel_sizes=[1]"],
                          env=env, capture_output=True, text=True, encoding="utf-8", timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"root": root, "stdout": done.stdout, "stderr": done.stderr,
            "json": json.loads((root / "r.json").read_text(encoding="utf-8"))}


def owned_bytes(package, domain: str) -> tuple[int, int]:
    """(bytes a `domain` site sends, bytes of all arrays) from the package's safetensors file.

    With the default negative-free gate a site sends none of the gate's arrays but the float64 count,
    mean (F) and scatter (F x F) of the gate's pooled features, F = its classifier's input width, and the mean
    and scatter diagonal of its style features (S each: the gate's features less those F).
    """
    from safetensors.numpy import load_file

    arrays = load_file(str(package / "model.safetensors"))
    others = [d for d in SITES if d != domain]
    mine = [a for k, a in arrays.items() if not k.startswith("gate.")
            and not any(f".harmony.{o}." in k or k.startswith(f"heads.{o}.") for o in others)]
    dim = arrays[f"gate.classifier.{domain}.weight"].shape[1]
    style = arrays[f"gate.calibration.{domain}.mean"].shape[0] - dim
    return (sum(a.nbytes for a in mine) + 8 * (1 + dim + dim * dim + 2 * style),
            sum(a.nbytes for a in arrays.values()))


def test_report_table_and_targets(bench):
    out = bench["stdout"]
    header = next(x for x in out.splitlines() if x.startswith("| arm |"))
    assert all(d in header for d in (*SITES, UNSEEN)) and "(unseen)" in header
    assert "| new tissue orders (unseen, mean of 3) |" in header
    rows = {x.split("|")[1].strip(): x for x in out.splitlines() if x.startswith("| ")}
    for label in (*LABELS, "**fed/central**", "**fed/central+GIN**"):
        assert label in rows, out
        assert rows[label].count("|") == 8  # arm + 4 domains + the new tissue orders + mean of trained
        assert label.startswith("**") or "n/a" not in rows[label]  # (a ratio over a zero Dice is n/a)
    for label in (*ORACLE, "**fed/central-oracle**", "**fed/central-oracle+GIN**"):
        assert rows[label].count("|") == 6  # arm + 3 trained domains + mean of trained
    targets = out[out.index("targets:"):].splitlines()[1:]
    verdicts = [x.split()[1] for x in targets if x.startswith("- ")]
    assert len(verdicts) == 8 and [v in ("PASS", "FAIL") for v in verdicts] == [True] * 3 + [False, True] + [False] * 3
    assert set(verdicts[i] for i in (3, 5, 6, 7)) == {"info:"}
    assert "95 %" in targets[0] and "unseen mri-flair (federated)" in targets[2]
    assert "never-seen tissue orders (federated)" in targets[4] and "(centralized)" in targets[5]
    assert "oracle" in targets[6]


def test_a_ratio_just_under_the_target_is_never_printed_as_the_target():
    from uharmony.bench.fed import check_targets, ratio_cells, ratio_summary, ratio_text

    assert [ratio_text(r) for r in (0.9488, 0.94999, 0.95, 0.9449, 1.2)] == ["94.9 %", "94.9 %", "95 %", "94 %", "120 %"]
    # the rounded means of the 3000-step run of 2026-12-05, whose T1 ratio (94.8 %) printed as a failing "95 %"
    central = {d: {"mean": m} for d, m in zip(SITES, (0.801, 0.820, 0.546))}
    fed = {d: {"mean": m} for d, m in zip(SITES, (0.760, 0.790, 0.523))}
    line = check_targets({"centralized": central, "federated": fed})[1]
    assert line.startswith("- FAIL") and "mri-t1 94.9 %, mri-t2 96 %, ct 96 %" in line, line
    # the unseen style's ratio (no criterion) in the same words as its table column: 4500 steps, 34.4 / 36.3
    central[UNSEEN], fed[UNSEEN] = {"mean": 0.363}, {"mean": 0.344}
    line = check_targets({"centralized": central, "federated": fed})[1]
    assert f"unseen {UNSEEN} 94.8 %, not a criterion" in line, line
    # the table's cells, the mean of the trained domains included, use the same wording
    assert ratio_cells({"mri-t1": 0.9488, "mean of trained": 0.947}, SITES) == ["94.9 %", "n/a", "n/a", "94.7 %"]
    # a target line's ratios: the mean and any note in one pair of parentheses, none without them
    assert ratio_summary({"mri-t1": 0.9488, "ct": 1.02, "mean of trained": 0.947}, "mean") == "mri-t1 94.9 %, ct 102 % (mean 94.7 %)"
    assert ratio_summary({"mri-t2": 0.99}, "mean of trained", "a note") == "mri-t2 99 % (a note)"
    assert ratio_summary({"mri-t2": 0.99}, "mean") == "mri-t2 99 %"


def test_json_scores_ratios_and_budget(bench):
    r = bench["json"]
    assert r["partial"] is False and r["quick"] is True and r["seeds"] == [0]
    assert set(r["runs"]) == set(LABELS) | set(ORACLE)
    for label in (*LABELS, *ORACLE):
        scores = r["runs"][label]["0"]
        assert set(scores) == ({*SITES, UNSEEN, *NOVEL} if label in LABELS else set(SITES))  # no true domain for unseen
        for d in scores:
            assert 0.0 <= scores[d]["score"] <= 1.0
    for tag, key, doms in (("", "no-gin", (*SITES, UNSEEN)), ("+GIN", "gin", (*SITES, UNSEEN)),
                           ("-oracle", "oracle-no-gin", SITES), ("-oracle+GIN", "oracle-gin", SITES)):
        for d in doms:
            want = r["runs"]["federated" + tag]["0"][d]["score"] / r["runs"]["centralized" + tag]["0"][d]["score"]
            assert r["ratios"][key][d] == pytest.approx(want)
    for tag, key in (("", "no-gin"), ("+GIN", "gin")):  # the new orders: the ratio of their means (one seed)
        f, c = (np.mean([r["runs"][arm + tag]["0"][o]["score"] for o in NOVEL]) for arm in ("federated", "centralized"))
        assert r["summary"]["federated" + tag]["new tissue orders"]["mean"] == pytest.approx(f)
        assert r["ratios"][key]["new tissue orders"] == pytest.approx(f / c)
    p = r["plan"]
    assert p["steps_per_site"] == p["rounds"] * p["local_steps"]
    assert p["fed_steps_total"] == 3 * p["steps_per_site"]
    # every site trains its domain's centralized patches, at 1 patch per local step (rounding of local steps only)
    assert p["site_batch_size"] == 1 and p["batch_size"] == 2
    assert p["patches_per_domain_fed"] == p["steps_per_site"] * p["site_batch_size"]
    assert abs(p["patches_per_domain_fed"] - p["patches_per_domain_central"]) <= p["rounds"] / 2
    fed = json.loads((bench["root"] / "work" / "fed" / "seed0" / "federated" / "fed.json").read_text())
    assert fed["train"]["batch_size"] == 1 and fed["train"]["local_steps"] == p["local_steps"]
    # the device (cpu unless --device) is recorded and is the one the in-process sites trained on
    assert r["config"]["device"] == "cpu"
    for d in SITES:
        site = json.loads((bench["root"] / "work" / "fed" / "seed0" / "federated" / f"site-{d}.json").read_text())
        assert site["device"] == r["config"]["device"]


def test_each_arm_ran_as_its_own_job_and_the_parts_were_merged(bench):
    """--workers 2: each (arm, GIN setting) is a child `bench fed --arm ... --gin ...` writing a part file; the
    results file holds exactly the parts' rows, and the real Flower run is the parent's alone."""
    r, parts = bench["json"], bench["root"] / "work" / "fed" / "parts"
    jobs = {"seed0-central": "centralized", "seed0-central+GIN": "centralized+GIN",
            "seed0-federated": "federated", "seed0-federated+GIN": "federated+GIN"}
    assert r["workers"] == 2 and set(r["job_minutes"]) == set(jobs)
    for name, label in jobs.items():
        part = json.loads((parts / f"{name}.json").read_text(encoding="utf-8"))
        arm, _, tag = label.partition("+")
        rows = {label, f"{arm}-oracle" + ("+" + tag if tag else "")}
        assert set(part["runs"]) == rows, name  # one arm, one GIN setting per job
        for row in rows:
            assert part["runs"][row]["0"] == r["runs"][row]["0"]
        assert part["flower"] is None and part["partial"] is False
        assert set(part["fed_runs"]) == ({"seed0" + ("+GIN" if tag else "")} if arm == "federated" else set())


def test_a_gin_option_reaches_every_gin_run_of_both_arms_and_the_flower_run(bench):
    """`--gin-option gin_kernel_sizes=[1]` (the fixture's): through the worker processes into the centralized
    config and every federated fed.toml with GIN on, not into the runs without GIN; recorded and printed."""
    r, fed = bench["json"], bench["root"] / "work" / "fed"
    assert r["gin_options"] == {"gin_kernel_sizes": [1]}
    assert "GIN runs with augment.gin_kernel_sizes = [1]" in bench["stdout"]
    assert json.loads((fed / "seed0/central+GIN.json").read_text())["augment"] == {"gin": True, "gin_kernel_sizes": [1]}
    assert json.loads((fed / "seed0/central.json").read_text())["augment"] == {"gin": False}
    for folder, want in (("seed0/federated+GIN", [1]), ("flower-run", [1]), ("seed0/federated", None)):
        train = json.loads((fed / folder / "fed.json").read_text())["train"]
        assert train.get("gin_kernel_sizes") == want and train["gin"] is (want is not None), folder


def test_bytes_per_round_are_the_owned_parameter_arrays(bench):
    r, work = bench["json"], bench["root"] / "work"
    assert set(r["fed_runs"]) == {"seed0", "seed0+GIN"}
    for name, run in r["fed_runs"].items():
        package = work / "fed" / "seed0" / ("federated" + name[len("seed0"):]) / "federation" / "global-model"
        assert len(run["bytes"]) == 3 * r["plan"]["rounds"]
        for row in run["bytes"]:
            owned, everything = owned_bytes(package, row["domain"])
            assert row["up_array_bytes"] > 0
            assert row["up_array_bytes"] == owned == run["expected_up_array_bytes"][row["domain"]]
            assert row["down_array_bytes"] == everything > owned  # a site gets the whole model, sends its part
            assert row["up_message_bytes"] > row["up_array_bytes"]  # serialized: the arrays and a little more
        assert run["rejected"] == []
    per_domain = r["bytes"]
    assert set(per_domain) == set(SITES)
    assert all(len(v["up_array_bytes"]) == 1 for v in per_domain.values())  # the same every round and seed


def test_in_process_rounds_tell_the_sites_apart_and_fit_the_gate_on_every_domain(bench):
    work = bench["root"] / "work"
    for arm in ("federated", "federated+GIN"):
        log = [json.loads(x) for x in (work / "fed" / "seed0" / arm / "federation" / "rounds.jsonl").read_text()
               .splitlines() if x.strip()]
        for e in log:
            sites = {p["site"]: p["domain"] for p in e["participants"]}
            assert sorted(sites.values()) == sorted(SITES), e["participants"]  # one site id per site
            assert e["gate"]["sites"] == {d: 1 for d in SITES} and e["gate"]["never_chosen"] == []


def test_real_flower_round_bytes_and_overhead(bench):
    fl = bench["json"]["flower"]
    assert fl["ok"], fl.get("error")
    assert fl["serve_exit"] == 0 and len(fl["rounds"]) == 1
    x = fl["rounds"][0]
    assert x["accepted"] == 3
    inproc = bench["json"]["bytes"]
    for d in SITES:
        assert x["bytes_up"][d] == inproc[d]["up_array_bytes"][0] > 0
    assert x["bytes_down_per_site"] == inproc[SITES[0]]["down_array_bytes"][0]
    assert set(x["local_train_seconds"]) == set(SITES)
    assert 0 < x["slowest_local_train_seconds"] <= x["train_phase_seconds"] <= x["round_seconds"]
    assert x["overhead_seconds"] == pytest.approx(x["round_seconds"] - x["slowest_local_train_seconds"], abs=0.01)
    assert x["overhead_ratio"] == pytest.approx(x["overhead_seconds"] / x["slowest_local_train_seconds"], rel=1e-2)
    # the split of the overhead around the last site's training adds up to the round (within the rounding)
    assert x["last_site_before_training_seconds"] >= -1.0 and x["after_last_site_trained_seconds"] >= -1.0
    assert (x["until_last_site_trained_seconds"] + x["after_last_site_trained_seconds"]
            == pytest.approx(x["round_seconds"], abs=0.05))
    assert "real Flower run" in bench["stdout"]


def _from_json(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uharmony", "bench", "fed", "--from-json", *map(str, paths)],
                          capture_output=True, text=True, encoding="utf-8", timeout=120, check=False)


def test_from_json_reprints_the_report(bench):
    done = _from_json(bench["root"] / "r.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == bench["stdout"].strip()


def test_from_json_merges_files_of_separate_commands_into_one_table(bench):
    """The four job files, each one arm and GIN setting, print the full run's Dice tables, ratios and
    targets (only the real Flower run, which no job ran, is missing)."""
    parts = bench["root"] / "work" / "fed" / "parts"
    done = _from_json(*(parts / f"seed0-{j}.json" for j in ("federated+GIN", "central", "federated", "central+GIN")))
    assert done.returncode == 0, done.stderr[-2000:]

    def tables(out: str) -> list[str]:
        lines = out.splitlines()
        return lines[lines.index(next(x for x in lines if x.startswith("| arm |"))):
                     lines.index(next(x for x in lines if x.startswith("gate accuracy")))]

    assert tables(done.stdout) == tables(bench["stdout"])
    full = bench["stdout"]
    assert done.stdout[done.stdout.index("targets:"):].strip() == full[full.index("targets:"):].strip()
    assert "real Flower run" not in done.stdout


def test_from_json_refuses_another_budget_a_repeated_run_or_another_benchmark(bench, tmp_path):
    parts = bench["root"] / "work" / "fed" / "parts"
    central = json.loads((parts / "seed0-central.json").read_text(encoding="utf-8"))
    other = tmp_path / "other-budget.json"
    other.write_text(json.dumps({**central, "config": {**central["config"], "steps": 7}}), encoding="utf-8")
    not_fed = tmp_path / "generalize.json"
    not_fed.write_text(json.dumps({k: v for k, v in central.items() if k not in ("plan", "fed_runs")}),
                       encoding="utf-8")
    cases = {(parts / "seed0-federated.json", other): ("other-budget.json: another budget", "steps"),
             (parts / "seed0-central.json", parts / "seed0-central.json"): ("seed0-central.json: run centralized", ""),
             (not_fed,): ("generalize.json: not the --json results of `uharmony bench fed`", "")}
    for paths, (message, detail) in cases.items():
        done = _from_json(*paths)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert message in line and detail in line, line


def test_central_results_are_reused_only_when_they_are_the_same_runs(bench, tmp_path):
    """A generalize JSON with another budget is refused (the centralized arm is not silently mixed in)."""
    from uharmony.bench import generalize as G
    from uharmony.bench.fed import reuse_central

    work = bench["root"] / "work"
    base = G.budget(6, True)
    datalists = {d: work / "data-6mm" / d / "dataset.json" for d in SITES}
    fake = {"config": {**base, "steps": 7}, "seeds": [0], "runs": {"uharmony": {"0": {}}, "uharmony+GIN": {"0": {}}}}
    (tmp_path / "g.json").write_text(json.dumps(fake))
    with pytest.raises(ValueError, match="budget differs"):
        reuse_central(str(tmp_path / "g.json"), work, base, [0], datalists)
    fake["config"] = base  # right budget, but no generalize models in this --work: refused too
    (tmp_path / "g.json").write_text(json.dumps(fake))
    with pytest.raises(ValueError, match="card.json is missing"):
        reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0], datalists)
    # the centralized models this run trained have generalize's config: where generalize keeps them, they are reused
    fake["runs"] = {"uharmony": {"0": {"mri-t1": {"score": 0.5}, "order-gcw": {"score": 0.2}, "order-x": {"score": 0.1}}},
                    "uharmony+GIN": {"0": {"mri-t1": {"score": 0.6}}},
                    "oracle": {"0": {"mri-t1": {"score": 0.7}}}}
    (tmp_path / "g.json").write_text(json.dumps(fake))
    for tag in ("", "+GIN"):
        card = json.loads((work / "fed" / "seed0" / f"central{tag}" / "card.json").read_text())
        (tmp_path / "runs" / "seed0" / f"uharmony{tag}").mkdir(parents=True)
        (tmp_path / "runs" / "seed0" / f"uharmony{tag}" / "card.json").write_text(json.dumps(card))
    opts = bench["json"]["gin_options"]  # the fixture's GIN models were trained with a GIN option
    with pytest.raises(ValueError, match="uharmony\\+GIN/card.json: trained with another config"):
        reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0], datalists)  # without it: other models
    got = reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0], datalists, gin_options=opts)
    assert got == {"centralized": {0: {"mri-t1": {"score": 0.5}, "order-gcw": {"score": 0.2}}},  # what it scores
                   "centralized+GIN": {0: {"mri-t1": {"score": 0.6}}},
                   "centralized-oracle": {0: {"mri-t1": {"score": 0.7}}}}  # the same models routed by the true domain
    assert reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0], datalists, card["architecture"], opts) == got
    with pytest.raises(ValueError, match="another architecture"):
        reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0], datalists,
                      {**card["architecture"], "filters": [8, 8, 8]}, opts)
    with pytest.raises(ValueError, match="no uharmony run of seed 1"):
        reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0, 1], datalists, gin_options=opts)
    card["training"]["datalists"][0]["sha256"] = "0" * 64  # a model trained on other data: refused
    (tmp_path / "runs" / "seed0" / "uharmony+GIN" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="other datalists"):
        reuse_central(str(tmp_path / "g.json"), tmp_path, base, [0], datalists, gin_options=opts)
    assert np.isfinite(bench["json"]["minutes"])


def test_central_batch_trains_the_centralized_arm_at_that_batch_on_equal_patches(bench, tmp_path):
    """--central-batch 1: the centralized models train 1 patch per step for twice the steps (the same
    patches per domain), generalize's models are then not reused, and its files merge with no other plan."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path / "c1.json"
    done = subprocess.run([sys.executable, "-m", "uharmony", "bench", "fed", "--quick", "--seeds", "0", "--arm",
                           "central", "--gin", "off", "--central-batch", "1", "--workers", "1", "--flower-rounds", "0",
                           "--central-json", str(tmp_path / "generalize.json"), "--work", str(tmp_path / "work"),
                           "--json", str(out)], env=env, capture_output=True, text=True, encoding="utf-8",
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "not reusing the centralized results: --central-batch 1: the models of `bench generalize` train 2" \
        in done.stderr
    r = json.loads(out.read_text(encoding="utf-8"))
    p, quick_steps = r["plan"], r["config"]["steps"]
    assert r["config"]["batch_size"] == 2  # the budget is unchanged: it is what --central-json must match
    assert p["central_batch_size"] == 1 and p["central_steps"] == 2 * quick_steps
    assert p["patches_per_domain_central"] == pytest.approx(2 * quick_steps / 3)
    card = json.loads((tmp_path / "work" / "fed" / "seed0" / "central" / "card.json").read_text())
    trained = card["training"]["config"]
    assert trained["batch_size"] == 1 and trained["steps"] == 2 * quick_steps and trained["method"] == "uharmony"
    assert set(r["runs"]) == {"centralized", "centralized-oracle"}
    assert f"centralized: {2 * quick_steps} steps x 1 patch (trained here: generalize's config at 1 patch per step" \
        in done.stdout
    parts = bench["root"] / "work" / "fed" / "parts"
    mixed = _from_json(out, parts / "seed0-federated.json")  # centralized at 1, federated beside centralized at 2
    assert mixed.returncode != 0 and "another federated plan" in mixed.stderr and "central_batch_size" in mixed.stderr
    old = json.loads((parts / "seed0-central.json").read_text(encoding="utf-8"))  # a file from before the option
    old["plan"].pop("central_batch_size")
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    merged = _from_json(tmp_path / "old.json", parts / "seed0-federated.json")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert f"centralized: {quick_steps} steps x 2 patches" in merged.stdout
