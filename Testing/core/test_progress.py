"""The progress reporter's log mode (what a run under nohup or a scheduler writes) and its auto choice."""

from __future__ import annotations

import subprocess
import sys

from uharmony.progress import LOG_EVERY_S, Reporter


class FakeClock:
    """Seconds we set by hand, so the test does not depend on how fast this machine is."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_mode_writes_a_line_per_interval_with_time_left(capsys):
    clock = FakeClock()
    r = Reporter("log", clock=clock)
    r.progress("train", 0, 100)
    clock.now += 10
    r.progress("train", 5, 100)
    assert capsys.readouterr().err == ""  # under a minute: nothing yet
    clock.now += LOG_EVERY_S - 10  # 60 s after the start, 50 steps done -> 60 s left
    r.progress("train", 50, 100)
    err = capsys.readouterr().err
    assert err == "train: 50/100 (50 %), 1:00 elapsed, ~1:00 left\n"
    clock.now += 1
    r.progress("train", 51, 100)
    assert capsys.readouterr().err == ""  # at most one line per interval
    clock.now += 59
    r.progress("train", 100, 100)
    assert capsys.readouterr().err == "train: 100/100 (100 %), 2:00 elapsed\n"


def test_log_mode_is_silent_for_short_stages_and_restarts_after_a_finish(capsys):
    clock = FakeClock()
    r = Reporter("log", clock=clock)
    for done in range(11):
        clock.now += 1
        r.progress("infer", done, 10)
    assert capsys.readouterr().err == ""
    # a resumed run starts at step 40: the time left counts only the steps done in this run
    r.progress("infer", 40, 100)
    clock.now += 3600 + 20 * 60
    r.progress("infer", 70, 100)
    assert capsys.readouterr().err == "infer: 70/100 (70 %), 1:20:00 elapsed, ~1:20:00 left\n"


def test_log_mode_sends_nothing_to_stdout(capsys):
    clock = FakeClock()
    r = Reporter("log", clock=clock)
    r.progress("train", 0, 10)
    clock.now += 2 * LOG_EVERY_S
    r.progress("train", 1, 10)
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("train: 1/10 (10 %), 2:00 elapsed, ~18:00 left")


def test_auto_is_log_off_a_terminal():
    code = "from uharmony.progress import Reporter; print(Reporter('auto').mode)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "log"
