"""`uharmony bench generalize --workers`: jobs as single-threaded child processes, a few at a time.

The pool runs real processes (here tiny Python programs, then the real benchmark in quick mode); the
merged table of a run split over workers must equal the one-process run's to the last digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uharmony.bench.workers import Job, JobFailed, run_jobs
from uharmony.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
# a job: record start time, pid and OMP threads, sleep, record the end
RECORD = ("import json, os, sys, time; t = time.time(); time.sleep(float(sys.argv[2])); "
          "open(sys.argv[1], 'w').write(json.dumps([t, time.time(), os.environ.get('OMP_NUM_THREADS')]))")


def test_jobs_run_longest_first_at_most_workers_at_a_time_single_threaded(tmp_path):
    # (cost, seconds): j1 and j2 start first; j0 takes j1's slot when it ends, j3 takes j0's before j2 ends
    plan = ((1, 0.35), (3, 0.35), (2, 1.4), (0.5, 0.35))
    jobs = [Job(f"j{i}", [str(tmp_path / f"j{i}.json"), str(d)], cost=c) for i, (c, d) in enumerate(plan)]
    done = []
    seconds = run_jobs(jobs, 2, tmp_path / "logs", poll_s=0.05, on_done=lambda n, s: done.append(n),
                       program=(sys.executable, "-c", RECORD))
    rec = {j.name: json.loads((tmp_path / f"{j.name}.json").read_text()) for j in jobs}
    assert set(seconds) == set(done) == {"j0", "j1", "j2", "j3"} and all(s >= 0.35 for s in seconds.values())
    assert all(r[2] == "1" for r in rec.values())  # OMP_NUM_THREADS=1 in every job
    # never more than 2 at once: at every job's start, fewer than 2 others are running
    for name, (start, _, _) in rec.items():
        assert sum(1 for o, (s, e, _) in rec.items() if o != name and s <= start < e) <= 1, rec
    # the two costliest start first; the cheapest starts last
    order = sorted(rec, key=lambda n: rec[n][0])
    assert set(order[:2]) == {"j1", "j2"} and order[2:] == ["j0", "j3"], order
    assert (tmp_path / "logs" / "j0.log").is_file()


def test_a_failed_job_ends_the_others_and_names_its_log(tmp_path):
    jobs = [Job("slow", ["import time; time.sleep(60)"], cost=2),
            Job("bad", ["import sys; print('no such datalist'); sys.exit(5)"], cost=1)]
    t = time.time()
    with pytest.raises(JobFailed) as e:
        run_jobs(jobs, 2, tmp_path / "logs", poll_s=0.05, program=(sys.executable, "-c"))
    assert time.time() - t < 30  # the slow job was ended, not waited for
    assert e.value.code == ExitCode.BAD_DATALIST and e.value.path == str(tmp_path / "logs" / "bad.log")
    assert "bad" in str(e.value) and "code 5" in str(e.value)
    assert "no such datalist" in (tmp_path / "logs" / "bad.log").read_text()
    with pytest.raises(ValueError):
        run_jobs(jobs, 0, tmp_path / "logs")


def test_workers_give_the_one_process_table_to_the_digit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "UHARMONY_DATA": str(tmp_path / "cache")}
    common = [sys.executable, "-m", "uharmony", "bench", "generalize", "--quick", "--seeds", "0", "1", "--steps", "3",
              "--cases", "2", "--methods", "uharmony", "joint", "--gin", "off", "--work", str(tmp_path / "work")]
    one = subprocess.run([*common, "--workers", "1", "--json", str(tmp_path / "one.json")], capture_output=True, text=True,
                         timeout=900, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*common, "--workers", "2", "--json", str(tmp_path / "two.json")], capture_output=True,
                         text=True, timeout=900, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert set(b["runs"]) == {"uharmony", "oracle", "joint"} and b["seeds"] == [0, 1] and b["workers"] == 2
    assert "workers" not in a and (tmp_path / "work/parts/seed1-joint.log").is_file()
    assert b["runs"] == a["runs"] and b["config"] == a["config"]
    assert sorted(b["job_minutes"]) == ["seed0-joint", "seed0-uharmony", "seed1-joint", "seed1-uharmony"]
    table = lambda s: [ln for ln in s.splitlines() if ln.startswith("| ")]  # noqa: E731
    # header + 3 rows, then the per-order table: header + the 2 rows that score the unseen styles (no oracle)
    assert table(two.stdout) == table(one.stdout) and len(table(one.stdout)) == 7
    bad = subprocess.run([*common, "--workers", "-1"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == ExitCode.USAGE and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_each_job_runs_in_one_process_and_adaptation_goes_with_its_model(tmp_path):
    from uharmony.bench.generalize import worker_jobs

    jobs = worker_jobs(tmp_path, seeds=(0, 1), steps=10, train_cases=2, quick=True, methods=("uharmony", "joint"),
                       adapt=True, gate="negative-free", gin=(False, True), parts=tmp_path / "parts")
    assert len(jobs) == 8 and len({j.name for j in jobs}) == 8
    for j in jobs:
        i = j.args.index("--workers")
        assert j.args[i + 1] == "1"  # a job must not spawn workers of its own (the default is one per core)
        assert ("--no-adapt" not in j.args) == (j.name.endswith("uharmony+GIN")), j.name
    assert max(jobs, key=lambda j: j.cost).name.endswith("uharmony+GIN")
    # each job trains and scores on the command line's device (cpu unless told)
    assert all(j.args[j.args.index("--device") + 1] == "cpu" for j in jobs)
    gpu = worker_jobs(tmp_path, seeds=(0,), steps=10, train_cases=2, quick=True, methods=("joint",), adapt=False,
                      gate="negative-free", gin=(True,), parts=tmp_path / "parts", device="cuda")
    assert [j.args[j.args.index("--device") + 1] for j in gpu] == ["cuda"]


def test_bench_fed_jobs_one_per_arm_seed_and_gin_setting(tmp_path):
    """`bench fed --workers N`: each job runs one arm of one seed and GIN setting in one process, and none runs
    the real Flower run (the parent runs it once, alone, so that its round timings are not of a loaded machine)."""
    from uharmony.bench.fed import arm_jobs

    todo = [(arm, seed, gin) for arm in ("central", "federated") for seed in (0, 1) for gin in (False, True)]
    jobs = arm_jobs(tmp_path, todo, steps=500, rounds=12, site_batch=1, train_cases=12, quick=False,
                    parts=tmp_path / "parts")
    assert len({j.name for j in jobs}) == 8
    for j, (arm, seed, gin) in zip(jobs, todo):
        a = j.args
        assert a[:2] == ["bench", "fed"] and a[a.index("--workers") + 1] == "1"
        assert a[a.index("--flower-rounds") + 1] == "0" and a[a.index("--arm") + 1] == arm
        assert a[a.index("--seeds") + 1] == str(seed) and a[a.index("--gin") + 1] == ("on" if gin else "off")
        assert a[a.index("--rounds") + 1] == "12" and a[a.index("--site-batch") + 1] == "1"  # the parent's plan
        assert a[a.index("--json") + 1] == str(tmp_path / "parts" / f"{j.name}.json")
    first = max(jobs, key=lambda j: j.cost)  # `run_jobs` starts the costliest first
    assert first.args[first.args.index("--arm") + 1] == "federated"
    assert all("--central-batch" not in j.args for j in jobs)  # the budget's batch: the flag is left out
    jobs = arm_jobs(tmp_path, todo, steps=500, rounds=12, site_batch=1, train_cases=12, quick=False,
                    parts=tmp_path / "parts", central_batch=1)
    for j in jobs:  # the parent's centralized batch reaches every job; at 1 a centralized job weighs a federated one
        assert j.args[j.args.index("--central-batch") + 1] == "1" and j.cost == 2.0
    # the parent's device reaches every job (cpu unless told)
    assert {j.args[j.args.index("--device") + 1] for j in jobs} == {"cpu"}
    jobs = arm_jobs(tmp_path, todo[:2], steps=500, rounds=12, site_batch=1, train_cases=12, quick=False,
                    parts=tmp_path / "parts", device="cuda")
    assert [j.args[j.args.index("--device") + 1] for j in jobs] == ["cuda", "cuda"]


def test_bench_fed_central_config_keeps_the_patches_at_another_batch():
    from uharmony.bench.fed import central_config
    from uharmony.bench.generalize import budget

    base = budget(1000, False)
    assert central_config(base, 3, False) == central_config(base, 3, False, batch=base["batch_size"])
    plain = central_config(base, 3, False)
    assert plain["steps"] == 1000 and plain["batch_size"] == 2 and plain["seed"] == 3
    one = central_config(base, 3, False, batch=1)
    assert (one["steps"], one["batch_size"]) == (2000, 1)
    assert {k: v for k, v in one.items() if k not in ("steps", "batch_size")} == \
        {k: v for k, v in plain.items() if k not in ("steps", "batch_size")}
    four = central_config(base, 3, True, batch=4)
    assert (four["steps"], four["batch_size"]) == (500, 4) and four["augment"]["gin"] is True


def test_bench_fed_refuses_negative_workers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "uharmony", "bench", "fed", "--quick", "--workers", "-1", "--work",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == ExitCode.USAGE and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--workers" in bad.stderr and not (tmp_path / "work").exists()
    for flag in ("--site-batch", "--rounds", "--central-batch"):
        bad = subprocess.run([sys.executable, "-m", "uharmony", "bench", "fed", "--quick", flag, "0", "--work",
                              str(tmp_path / "work")], capture_output=True, text=True, timeout=120, env=env)
        assert bad.returncode == ExitCode.USAGE and bad.stderr.strip() == f"uharmony: error: {flag} must be >= 1"
        assert not (tmp_path / "work").exists()


def test_bench_fed_refuses_a_device_this_machine_lacks(tmp_path):
    from uharmony.device import detect

    found = detect()
    absent = "cuda" if not found["cuda"] else "mps" if not found["mps"] else None
    if absent is None:
        pytest.skip("this machine has both CUDA and MPS")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "uharmony", "bench", "fed", "--quick", "--device", absent, "--work",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == ExitCode.USAGE and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert f"--device {absent} was asked for" in bad.stderr and not (tmp_path / "work").exists()
