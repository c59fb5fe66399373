"""Unit tests of UHarmonySegmentLib's plain-Python parts: signal, protocol parser, runners,
library location, presentation, dependencies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from mrml_testing import REPO
from UHarmonySegmentLib import Dependencies, Library
from UHarmonySegmentLib.JsonLines import SEGMENT_STAGES, ProgressParser, overall_fraction
from UHarmonySegmentLib.Presentation import device_choices, model_choices, normalise_color, summarize_report
from UHarmonySegmentLib.ProcessRunner import QtProcessRunner, SubprocessRunner, descendant_pids, pid_alive
from UHarmonySegmentLib.Signal import Signal

# -- Signal -------------------------------------------------------------------------------------


def test_signal_connect_emit_disconnect_block_and_errors():
    s = Signal("x")
    got = []
    first = s.connect(lambda x: got.append(("a", x)))
    s.connect(lambda x: got.append(("b", x)))
    s.emit(1)
    assert got == [("a", 1), ("b", 1)]
    assert s.disconnect(first) and not s.disconnect(first)
    s.block(True)
    s.emit(2)
    s.block(False)
    s(3)
    assert got == [("a", 1), ("b", 1), ("b", 3)]

    def broken(x):
        raise ValueError("boom")

    s.connect(broken)
    s.connect(lambda x: got.append(("c", x)))
    s.emit(4)  # a broken slot does not stop the others
    assert ("c", 4) in got
    s.raise_errors = True
    with pytest.raises(ValueError):
        s.emit(5)
    with pytest.raises(TypeError):
        s.connect("not callable")


# -- protocol parser ----------------------------------------------------------------------------


def test_parser_dispatches_each_event_and_keeps_last_error_and_result():
    p = ProgressParser()
    seen = []
    p.progress.connect(lambda *a: seen.append(("progress",) + a))
    p.log.connect(lambda m: seen.append(("log", m)))
    p.metric.connect(lambda d: seen.append(("metric", d)))
    p.round.connect(lambda d: seen.append(("round", d)))
    p.result.connect(lambda o, r: seen.append(("result", o, r)))
    p.error.connect(lambda c, m: seen.append(("error", c, m)))
    p.unparsed.connect(lambda line: seen.append(("unparsed", line)))
    lines = [
        '{"v":1,"event":"progress","stage":"infer","done":3,"total":12}',
        b'{"v":1,"event":"log","message":"hello"}',
        '{"v":1,"event":"metric","epoch":3,"loss":0.41,"dice":{"grey matter":0.8}}',
        '{"v":1,"event":"round","round":2,"total":10,"sites":3,"metrics":{}}',
        '{"v":1,"event":"error","code":3,"message":"scan.nrrd: contains 12 NaN/Inf voxels"}',
        '{"v":1,"event":"result","outputs":["a.nrrd","r.json"],"report":{"device":"cpu"}}',
        "Loading weights...",  # not JSON
        '{"v":2,"event":"progress","stage":"infer","done":1,"total":2}',  # another protocol version
        '["v",1]',
        '{"v":1,"event":"progress","stage":"infer","done":"x","total":2}',
        '{"v":1,"event":"something-new"}',  # unknown event: ignored
        "   ",
    ]
    for line in lines:
        p.feed(line)
    assert seen[0] == ("progress", "infer", 3, 12)
    assert seen[1] == ("log", "hello")
    assert seen[2] == ("metric", {"epoch": 3, "loss": 0.41, "dice": {"grey matter": 0.8}})
    assert seen[3][0] == "round" and seen[3][1]["round"] == 2
    assert seen[4] == ("error", 3, "scan.nrrd: contains 12 NaN/Inf voxels")
    assert seen[5] == ("result", ["a.nrrd", "r.json"], {"device": "cpu"})
    assert [s[0] for s in seen[6:]] == ["unparsed"] * 4
    assert p.last_error == (3, "scan.nrrd: contains 12 NaN/Inf voxels")
    assert p.last_result == {"outputs": ["a.nrrd", "r.json"], "report": {"device": "cpu"}}
    assert p.events == 7
    p.reset()
    assert p.last_error is None and p.last_result is None


def test_overall_fraction_is_monotonic_across_stages():
    points = []
    for stage in SEGMENT_STAGES:
        for done in range(0, 5):
            points.append(overall_fraction(stage, done, 4))
    assert points == sorted(points)
    assert points[0] == 0.0 and points[-1] == pytest.approx(1.0)
    assert overall_fraction("unknown", 1, 2) == 0.0
    assert overall_fraction("infer", 5, 0) == overall_fraction("infer", 0, 4)  # total 0: no division


# -- runners ------------------------------------------------------------------------------------

TREE_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(60)
""")


def test_subprocess_runner_lines_exit_code_and_callbacks_on_caller_thread():
    import threading

    runner = SubprocessRunner()
    out, err, done, threads = [], [], [], set()
    runner.on_line = lambda line: (out.append(line), threads.add(threading.get_ident()))
    runner.on_stderr = err.append
    runner.on_finished = done.append
    runner.start([sys.executable, "-c", "import sys; print('a'); print('b'); print('e', file=sys.stderr); sys.exit(6)"])
    assert runner.running
    assert runner.wait(30)
    assert out == ["a", "b"] and err == ["e"] and done == [6]
    assert threads == {threading.get_ident()}
    assert not runner.running
    runner.start([sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(RuntimeError, match="already running"):
        runner.start([sys.executable, "-c", "pass"])
    runner.stop()
    assert runner.wait(10) and done[-1] != 0


def test_subprocess_runner_stop_ends_the_whole_tree():
    runner = SubprocessRunner(grace_period_s=2.0)
    lines, done = [], []
    runner.on_line = lines.append
    runner.on_finished = done.append
    runner.start([sys.executable, "-c", TREE_SCRIPT])
    deadline = time.monotonic() + 20
    while not lines and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.02)
    grandchild = int(lines[0])
    assert pid_alive(grandchild) and grandchild in descendant_pids(runner.pid)
    started = time.monotonic()
    runner.stop()
    assert runner.wait(20)
    assert time.monotonic() - started < 5
    assert done and done[0] != 0
    assert not pid_alive(runner.pid) and not pid_alive(grandchild)


def test_subprocess_runner_kills_a_process_that_ignores_sigterm():
    runner = SubprocessRunner(grace_period_s=0.5)
    lines, done = [], []
    runner.on_line = lines.append
    runner.on_finished = done.append
    runner.start([sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"])
    while not lines:
        runner.wait(0.05)
    runner.stop()
    assert runner.wait(10)
    assert done == [-9]


def test_qt_process_runner_with_pyside6_event_loop():
    QtCore = pytest.importorskip("PySide6.QtCore")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    # a QApplication (not a QCoreApplication): the .ui tests in the same session need widgets
    app = QtCore.QCoreApplication.instance() or QtWidgets.QApplication(["uharmony-test"])
    assert app is not None
    runner = QtProcessRunner(QtCore, grace_period_s=2.0)
    out, err, done = [], [], []
    runner.on_line = out.append
    runner.on_stderr = err.append
    runner.on_finished = done.append
    runner.start([sys.executable, "-c", "import os, sys; print('x' * 70000); print(os.environ['UH_TEST']); "
                  "sys.stdout.write('no newline'); print('e', file=sys.stderr); sys.exit(3)"],
                 env={**os.environ, "UH_TEST": "env passed"})
    assert runner.wait(30)
    assert out == ["x" * 70000, "env passed", "no newline"] and err == ["e"] and done == [3]

    # stop: SIGTERM reaches the tree, finished arrives through the event loop
    out.clear()
    done.clear()
    runner.start([sys.executable, "-c", TREE_SCRIPT])
    deadline = time.monotonic() + 20
    while not out and time.monotonic() < deadline:
        app.processEvents(QtCore.QEventLoop.AllEvents, 50)
        runner.wait(0.05)
    grandchild = int(out[0])
    assert pid_alive(grandchild)
    runner.stop()
    assert runner.wait(20)
    assert done and done[0] != 0 and not pid_alive(grandchild)

    # a program that does not exist finishes (with an unknown code) instead of hanging
    done.clear()
    runner.start(["/nonexistent/python-xyz", "-c", "pass"])
    assert runner.wait(10)
    assert done == [-1]

    # close(): the process is ended, no callback runs, the runner can start again
    done.clear()
    out.clear()
    runner.start([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    while not out:
        runner.wait(0.05)
        app.processEvents(QtCore.QEventLoop.AllEvents, 50)
    pid = runner.pid
    runner.close()
    assert not runner.running and not pid_alive(pid)
    for _ in range(20):
        app.processEvents(QtCore.QEventLoop.AllEvents, 10)
    assert done == []


# -- library location and commands ---------------------------------------------------------------


def test_exit_code_table_matches_the_library():
    from uharmony.errors import EXIT_CODE_HELP, ExitCode

    assert {int(c): text for c, text in EXIT_CODE_HELP.items()} == Library.EXIT_CODE_TEXT
    assert Library.EXIT_CANCELLED == int(ExitCode.CANCELLED)
    assert Library.exit_code_text(-15) == "ended by signal 15"
    assert Library.exit_code_text(None) == "did not run"


def test_library_root_environment_and_light_imports(monkeypatch, tmp_path):
    assert Library.find_library_root() == REPO  # source tree: the folder above the module
    fake = tmp_path / "lib"
    (fake / "uharmony").mkdir(parents=True)
    (fake / "uharmony" / "__init__.py").write_text("")
    monkeypatch.setenv("UHARMONY_LIBRARY_PATH", str(fake))
    assert Library.find_library_root() == str(fake)
    env = Library.process_environment(str(fake), base={"PYTHONPATH": os.pathsep.join(["/a", str(fake)]), "KEEP": "1"},
                                      extra={"PYTHONPATH": "/b", "UHARMONY_MODELS": "/m"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(fake), "/b", "/a"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["KEEP"] == "1" and env["UHARMONY_MODELS"] == "/m"
    monkeypatch.setenv("UH_INHERITED", "yes")
    assert Library.process_environment(None, extra={"X": "1"})["UH_INHERITED"] == "yes"  # ours + extra
    # the parts of the library Slicer's own process imports must not pull torch in
    code = ("import sys, uharmony.errors, uharmony.model.terminology; "
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_commands_sync_and_async_error_paths(tmp_path):
    module_dir = tmp_path / "cmds"
    module_dir.mkdir()
    (module_dir / "fakecli.py").write_text(textwrap.dedent("""
        import json, sys
        if sys.argv[1:3] == ["models", "list"]:
            print("a log line before"); print(json.dumps([{"name": "m", "bundled": True, "trusted": True}]))
        elif sys.argv[1] == "devices":
            print(json.dumps({"cuda": False, "mps": False, "auto": "cpu"}))
        elif sys.argv[1] == "info":
            print(json.dumps({"v": 1, "event": "error", "code": 4, "message": "no model named x"}))
            sys.exit(4)
        else:
            print("uharmony: error: folder/card.json: missing", file=sys.stderr); sys.exit(4)
    """))
    commands = Library.LibraryCommands(python_executable=sys.executable, module="fakecli",
                                       environment={"PYTHONPATH": str(module_dir)}, runner_factory=SubprocessRunner)
    assert commands.list_models() == [{"name": "m", "bundled": True, "trusted": True}]
    assert commands.devices()["auto"] == "cpu"
    with pytest.raises(Library.CommandError) as info:
        commands.model_info("x")
    assert info.value.code == 4 and info.value.message == "no model named x"
    with pytest.raises(Library.CommandError) as info:
        commands.add_model("folder")
    assert info.value.message == "uharmony: error: folder/card.json: missing"
    assert "bad or untrusted model package" in str(info.value)
    got = []
    runner = commands.call_async(["devices", "--json"], lambda data, error: got.append((data, error)))
    runner.wait(30)
    assert got == [({"cuda": False, "mps": False, "auto": "cpu"}, None)]
    runner = commands.call_async(["info", "--model", "x", "--json"], lambda data, error: got.append((data, error)))
    runner.wait(30)
    assert got[1][0] is None and got[1][1].code == 4


# -- presentation -------------------------------------------------------------------------------


def test_device_choices_show_what_was_detected():
    unknown = device_choices(None)
    assert [c.value for c in unknown] == ["auto", "cuda", "cpu"]
    gpu = device_choices({"cuda": True, "cuda_name": "NVIDIA H100", "mps": False, "auto": "cuda"})
    assert [(c.label, c.value, c.enabled) for c in gpu] == [
        ("Auto (GPU: NVIDIA H100)", "auto", True), ("GPU: NVIDIA H100", "cuda", True), ("CPU", "cpu", True)]
    cpu = device_choices({"cuda": False, "cuda_name": None, "mps": False, "auto": "cpu"})
    assert cpu[0].label == "Auto (CPU)"
    gpu_entry = [c for c in cpu if c.value == "cuda"][0]
    assert not gpu_entry.enabled and "none found" in gpu_entry.label
    mac = device_choices({"cuda": False, "mps": True, "auto": "mps"})
    assert [c.value for c in mac] == ["auto", "mps", "cpu"] and mac[0].label == "Auto (GPU: Apple (MPS))"


def test_model_choices_order_and_disable_unusable():
    models = [
        {"name": "zeta", "path": "/u/zeta", "sha256": "ab" * 32, "bundled": False, "trusted": True, "problem": None},
        {"name": "broken", "path": "/u/broken", "bundled": False, "trusted": True, "problem": "weights changed since added"},
        {"name": "starter", "path": "/lib/starter", "bundled": True, "trusted": True, "problem": None},
        {"name": "alien", "path": "/u/alien", "bundled": False, "trusted": False, "problem": None},
    ]
    choices = model_choices(models)
    assert [c.value for c in choices] == ["starter", "zeta", "alien", "broken"]
    assert choices[0].label == "starter (bundled)" and choices[0].enabled
    assert not choices[2].enabled and "untrusted" in choices[2].label
    assert not choices[3].enabled and "weights changed since added" in choices[3].tooltip
    assert "sha256 abababababababab" in choices[1].tooltip


def test_summarize_report_texts_rows_and_warning():
    report = {
        "model": {"name": "starter", "version": "1.0", "sha256": "0123456789abcdef" * 4, "path": "/m"},
        "device": "cpu",
        "domain": {"mode": "auto", "chosen": "synth-t1", "probabilities": {"synth-t2": 0.03, "synth-t1": 0.97},
                   "unfamiliar": True, "unfamiliar_score": 7.25, "unfamiliar_threshold": 6.0},
        "classes": [{"value": 3, "name": "white matter", "voxels": 10, "volume_ml": 1.25, "color": [250, 250, 210]},
                    {"value": 0, "name": "background"},
                    {"value": 1, "name": "cerebrospinal fluid", "voxels": 5, "volume_ml": 0.04, "color": [0.3, 0.7, 1.0]}],
        "intended_use": "Research only.",
        "limitations": ["Adult brains", "T1/T2 only"],
    }
    s = summarize_report(report)
    assert s.domain_text == "synth-t1 (97%)" and s.domain_probability == pytest.approx(0.97)
    assert s.probabilities_text == "synth-t1 97%, synth-t2 3%"
    assert s.unfamiliar and "score 7.2" in s.warning_text and "threshold 6.0" in s.warning_text
    assert [r.name for r in s.rows] == ["cerebrospinal fluid", "white matter"]
    assert s.rows[1].color == pytest.approx((250 / 255, 250 / 255, 210 / 255))
    assert s.rows[0].volume_text == "0.0" and s.rows[1].volume_text == "1.2"
    assert s.limitations_text == "\u2022 Adult brains\n\u2022 T1/T2 only"
    assert s.model_text == "starter v1.0 sha256 0123456789ab" and s.device_text == "cpu"
    familiar = summarize_report({"domain": {"mode": "synth-t2", "chosen": "synth-t2", "probabilities": {},
                                            "unfamiliar": False}})
    assert familiar.domain_text == "synth-t2 (chosen by the user)" and not familiar.unfamiliar and familiar.warning_text == ""
    assert summarize_report(None).rows == []
    assert not s.unsure and s.warned and "unsure" not in s.warning_text
    unsure = summarize_report({"domain": {"mode": "auto", "chosen": "mri-t1", "unsure": True, "unfamiliar": False,
                                          "probabilities": {"mri-t2": 0.25, "mri-t1": 0.39, "mri-flair": 0.26}}})
    assert unsure.unsure and unsure.warned and not unsure.unfamiliar
    assert unsure.warning_text == ("The domain gate is unsure (mri-t1 39%, mri-flair 26%): if you know the contrast, "
                                   "choose it under Domain and segment again.")
    both = summarize_report(dict(report, domain=dict(report["domain"], unsure=True)))
    assert both.warning_text.startswith("Unfamiliar input") and both.warning_text.endswith("segment again.")
    assert not familiar.warned
    assert s.cleanup_text == "" and familiar.cleanup_text == ""
    cleaned = summarize_report(dict(report, postprocess={"min_component_ml": {"lesion": 0.5},
                                                         "removed_ml": {"lesion": 1.33}}))
    assert cleaned.cleanup_text == "lesion pieces under 0.5 mL relabelled (1.3 mL)"
    assert normalise_color("bad") is None and normalise_color([1, 2]) is None


# -- dependencies -------------------------------------------------------------------------------


def test_dependency_checks_constraints_and_offline_arguments(tmp_path):
    versions = {"monai": "1.2.0", "nibabel": "5.2.0", "numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": None}
    version_of = versions.get
    reqs = ["monai>=1.3", "nibabel>=5.0", "safetensors>=0.4"]
    assert Dependencies.missing_requirements(reqs, version_of) == ["monai>=1.3", "safetensors>=0.4"]
    assert Dependencies.torch_missing(version_of)
    status = Dependencies.dependency_status(reqs, version_of)
    assert status == {"torch": False, "missing": ["monai>=1.3", "safetensors>=0.4"], "ok": False}
    text = Dependencies.constraints_text(version_of=version_of)
    assert "numpy==1.26.4" in text.splitlines() and "SimpleITK==2.4.0" in text.splitlines()
    args = Dependencies.pip_arguments(["monai>=1.3"], "/c.txt", wheel_dir="/wheels")
    assert args == ["--constraint", "/c.txt", "--no-index", "--find-links", "/wheels", "monai>=1.3"]
    assert Dependencies.pip_arguments(["x"], "/c.txt") == ["--constraint", "/c.txt", "x"]
    listed = Dependencies.load_requirements()
    assert listed and not any(Dependencies.requirement_name(r).lower() in ("torch", "numpy", "simpleitk") for r in listed)


def test_requirements_file_covers_the_library_dependencies():
    """Resources/requirements.txt must list what pyproject.toml requires (minus Slicer's own)."""
    pyproject = os.path.join(REPO, "pyproject.toml")
    if not os.path.isfile(pyproject):
        pytest.skip("no pyproject.toml yet (written by the core library's engineer)")
    import tomllib

    with open(pyproject, "rb") as f:
        deps = tomllib.load(f).get("project", {}).get("dependencies", [])
    needed = {Dependencies.requirement_name(d).lower() for d in deps} - {"torch", "numpy", "simpleitk"}
    listed = {Dependencies.requirement_name(r).lower() for r in Dependencies.load_requirements()}
    assert needed <= listed, f"add to UHarmonySegment/Resources/requirements.txt: {sorted(needed - listed)}"
