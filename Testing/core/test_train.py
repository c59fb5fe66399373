"""`uharmony train` as a user runs it: real datalists of synthetic phantoms at 4 mm, real processes.

A tiny network (filters 4-8-16, 24^3 patches) keeps each run to seconds. Subprocesses run with one
thread (OMP_NUM_THREADS=1): on a busy 2-core machine that is much faster than two, and the
bit-exact resume comparison needs the same thread count in every run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uharmony.errors import ExitCode
from uharmony.train.config import TrainConfig, config_table_markdown, load_config
from uharmony.train.data import write_synth_datalist

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
TINY = f"""
steps = {STEPS}
batch_size = 2
patch_size = [24, 24, 24]
spacing_mm = [4.0, 4.0, 4.0]
lr = 0.01
val_every = 15
val_cases = 1
checkpoint_every = 10
seed = 3
[augment]
gin = true
gin_p = 0.5
[model]
filters = [4, 8, 16]
strides = [1, 2, 2]
poly_scale = 0.5
[gate]
input_size = [16, 16, 16]
filters = [4, 8, 8]
method = "trained"  # these tests check the trained gate (accuracy during training, framing, resume)
"""
CLASSES_A = ["cerebrospinal fluid", "grey matter", "white matter"]
CLASSES_B = ["grey matter", "white matter", "lesion"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uharmony", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env())


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI in this process (for quick refusals that never reach training): same code, no start-up cost."""
    from uharmony.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def last_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("uharmony: error: ")]
    assert starts, proc.stderr
    return "\n".join(lines[starts[-1]:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train-data")
    a = write_synth_datalist(root / "a", "synth-t1", name="set-a", training_seeds=(71001, 71002, 71003),
                             validation_seeds=(71004,), classes=CLASSES_A)
    b = write_synth_datalist(root / "b", "synth-t2", name="set-b", training_seeds=(71011, 71012, 71013),
                             validation_seeds=(71014,), classes=CLASSES_B)
    config = root / "tiny.toml"
    config.write_text(TINY)
    return {"root": root, "a": a, "b": b, "config": config}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """One uninterrupted tiny run with --progress jsonl (shared by several tests)."""
    out = tmp_path_factory.mktemp("trained") / "mine"
    p = run("train", "--data", data["a"], data["b"], "--out", out, "--config", data["config"], "--progress", "jsonl")
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    return {"out": out, "events": events, "proc": p}


def test_train_writes_a_valid_package_and_reduces_the_loss(trained, data):
    from uharmony.model.card import card_summary
    from uharmony.model.package import load_model

    model, card = load_model(trained["out"])
    names = [c["name"] for c in sorted(card["classes"], key=lambda c: c["value"])]
    assert names == ["background", *CLASSES_A, "lesion"]  # the union, in datalist order
    assert [d["name"] for d in card["domains"]] == ["synth-t1", "synth-t2"] == model.domains
    assert card["domains"][0]["annotated_classes"] == CLASSES_A
    assert card["domains"][1]["annotated_classes"] == CLASSES_B
    grey = card["classes"][2]
    assert grey["terminology"]["type"]["code"] == "389081007" and len(grey["color"]) == 3
    assert card["input"]["spacing_mm"] == [4.0, 4.0, 4.0] and card["input"]["patch_size"] == [24, 24, 24]
    t = card["training"]
    assert t["steps"] == STEPS and t["method"] == "uharmony" and t["config"]["model"]["filters"] == [4, 8, 16]
    # the Hermite terms' factor is part of the network: in the card's architecture and in every loaded layer
    assert card["architecture"]["poly_scale"] == 0.5 and {h.poly_scale for h in model.harmony_layers()} == {0.5}
    assert "polynomial degree 3 (terms x 0.5)" in card_summary(card)
    # the factor in effect: the config's 0 resolved to the number of domains trained together
    assert t["config"]["domain_lr_scale"] == 0 and t["domain_lr_scale"] == 2.0
    assert [d["sha256"] for d in t["datalists"]] == [
        __import__("hashlib").sha256(Path(p).read_bytes()).hexdigest() for p in (data["a"], data["b"])]
    assert card["gate"]["unfamiliar_threshold"] > 0
    assert set(card["evaluation"]["dice"]) == {"synth-t1", "synth-t2"}
    assert set(card["evaluation"]["dice"]["synth-t2"]) == set(CLASSES_B)  # Dice only over annotated classes
    metrics = [e for e in trained["events"] if e["event"] == "metric"]
    assert [m["step"] for m in metrics] == [15, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"], metrics  # mean loss of steps 16-30 below that of 1-15
    # the checkpoint folder is removed after a finished run
    assert not Path(str(trained["out"]) + ".checkpoint").exists()


def test_jsonl_events_are_well_formed(trained):
    events = trained["events"]
    assert events and all(e["v"] == 1 for e in events)
    train = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert [e["done"] for e in train] == list(range(0, STEPS + 1))
    assert all(e["total"] == STEPS for e in train)
    for m in (e for e in events if e["event"] == "metric"):
        assert set(m) >= {"step", "loss", "dice", "gate_accuracy"}
        assert set(m["dice"]) == {"synth-t1", "synth-t2"} and set(m["gate_accuracy"]) == {"synth-t1", "synth-t2"}
        for per_class in m["dice"].values():
            assert all(v is None or 0.0 <= v <= 1.0 for v in per_class.values())
    assert events[-1]["event"] == "result" and events[-1]["outputs"] == [str(trained["out"])]
    assert "Traceback" not in trained["proc"].stderr


def test_segment_uses_the_trained_package(trained, tmp_path):
    from uharmony.data import synth

    case = synth.make_case(79001, "synth-t2", spacing_mm=4.0)
    src = tmp_path / "fresh.nii.gz"
    synth.write_case(case, src)
    out, report = tmp_path / "seg.nii.gz", tmp_path / "seg.json"
    p = run("segment", src, "-o", out, "--model", trained["out"], "--report", report)
    assert p.returncode == 0, p.stderr
    seg = nib.load(str(out))
    assert seg.shape == case.image.shape and np.allclose(seg.affine, case.affine)
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["domain"]["chosen"] in ("synth-t1", "synth-t2")
    assert [c["name"] for c in r["classes"]] == [*CLASSES_A, "lesion"]


def test_resume_after_sigkill_equals_uninterrupted(trained, data, tmp_path):
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "uharmony", "train", "--data", str(data["a"]), str(data["b"]), "--out", str(out),
           "--config", str(data["config"]), "--progress", "jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
    try:
        for line in proc.stdout:
            e = json.loads(line)
            if e["event"] == "progress" and e["stage"] == "train" and e["done"] == 13:  # checkpoint 10 is written
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    latest = json.loads((tmp_path / "resumed.checkpoint" / "latest.json").read_text(encoding="utf-8"))
    assert 10 <= latest["step"] < STEPS

    p = run("train", "--data", data["a"], data["b"], "--out", out, "--config", data["config"], "--resume")
    assert p.returncode == 0, p.stderr
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    assert card["training"]["resumed_from_step"] == latest["step"]
    resumed = load_file(str(out / "model.safetensors"))
    straight = load_file(str(trained["out"] / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    different = [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert not different, different[:5]
    full = json.loads((trained["out"] / "card.json").read_text(encoding="utf-8"))
    assert card["evaluation"]["dice"] == full["evaluation"]["dice"]
    assert card["gate"]["unfamiliar_threshold"] == full["gate"]["unfamiliar_threshold"]


def test_resume_refuses_another_config_and_a_missing_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "m"
    p = cli(capsys, "train", "--data", data["a"], "--out", out, "--config", data["config"], "--resume")
    assert p.returncode == ExitCode.USAGE and "no checkpoint to resume from" in last_error(p)
    # a checkpoint of the `short` config and datalist a, then resumes with another config / datalist
    short = tmp_path / "short.toml"
    short.write_text(TINY.replace(f"steps = {STEPS}", "steps = 2").replace("checkpoint_every = 10",
                                                                        "checkpoint_every = 1"))
    ckpt = tmp_path / "m.checkpoint"
    from uharmony.train.checkpoint import save_checkpoint

    from uharmony.model.network import ArchConfig, UHarmonyNet
    from uharmony.train.config import config_hash
    from uharmony.train.data import datalist_sha256
    from uharmony.train.trainer import make_optimizer

    cfg, _ = load_config(short)
    model = UHarmonyNet(ArchConfig(num_classes=4, domains=["synth-t1"], filters=[4, 8, 16], strides=[1, 2, 2]))
    save_checkpoint(ckpt, step=1, model=model, optimizer=make_optimizer(model, cfg),
                    meta={"kind": "train", "config_hash": config_hash(cfg), "datalists": [datalist_sha256(data["a"])]})
    p = cli(capsys, "train", "--data", data["a"], "--out", out, "--config", data["config"], "--resume")
    assert p.returncode == ExitCode.USAGE and "different config" in last_error(p)
    p = cli(capsys, "train", "--data", data["b"], "--out", out, "--config", short, "--resume")
    assert p.returncode == ExitCode.USAGE and "other datalists" in last_error(p)
    # without --resume, an existing checkpoint is not silently replaced
    p = cli(capsys, "train", "--data", data["a"], "--out", out, "--config", short)
    assert p.returncode == ExitCode.OUTPUT_ERROR and "--resume" in last_error(p)


def test_config_unknown_key_wrong_type_and_output_exists(data, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = 5\n[augment]\ngin = true\nginp = 0.3\n")
    p = run("train", "--data", data["a"], "--out", tmp_path / "x", "--config", bad)
    assert p.returncode == ExitCode.USAGE
    msg = last_error(p)
    assert "'augment.ginp'" in msg and "gin_p" in msg and len(msg.splitlines()) == 1
    bad.write_text("steps = 5\n[augment]\ngin_kernel_sizes = [1, 2]\n")
    p = cli(capsys, "train", "--data", data["a"], "--out", tmp_path / "x", "--config", bad)
    assert p.returncode == ExitCode.USAGE and "'augment.gin_kernel_sizes'" in last_error(p)
    assert "odd positive" in last_error(p)
    bad.write_text('{"steps": "many"}')
    bad = bad.rename(tmp_path / "bad.json")
    p = cli(capsys, "train", "--data", data["a"], "--out", tmp_path / "x", "--config", bad)
    assert p.returncode == ExitCode.USAGE and "'steps' must be an integer" in last_error(p)
    exists = tmp_path / "exists"
    exists.mkdir()
    p = cli(capsys, "train", "--data", data["a"], "--out", exists, "--config", data["config"])
    assert p.returncode == ExitCode.OUTPUT_ERROR and "exists already" in last_error(p)
    bad.write_text('{"method": "separated"}')
    p = cli(capsys, "train", "--data", data["a"], "--out", tmp_path / "x", "--config", bad)
    assert p.returncode == ExitCode.USAGE and "'method' must be one of" in last_error(p)


def test_bad_datalists_are_refused_before_training_with_every_problem(data, tmp_path):
    """Missing file, image/label shape and affine mismatch, label value outside the table, empty
    training split: all reported, one line each, across two datalists, exit 5, nothing written."""
    root = tmp_path / "bad1"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    img = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr/a.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 7), np.uint8), aff), str(root / "labelsTr/a.nii.gz"))  # shape
    nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr/b.nii.gz"))
    shifted = aff.copy()
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), shifted), str(root / "labelsTr/b.nii.gz"))  # affine
    nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr/c.nii.gz"))
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2, 2, 2] = 7
    nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr/c.nii.gz"))  # value 7 not in the table
    doc = {"name": "bad1", "domain": "mri-t1", "modality": {"0": "image"},
           "labels": {"0": "background", "1": "grey matter"},
           "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"},
                        {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"},
                        {"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"},
                        {"image": "imagesTr/missing.nii.gz", "label": "labelsTr/a.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(doc))
    empty = tmp_path / "bad2" / "dataset.json"
    empty.parent.mkdir()
    empty.write_text(json.dumps({**doc, "name": "bad2", "training": []}))
    out = tmp_path / "never"
    p = run("train", "--data", root / "dataset.json", empty, "--out", out, "--config", data["config"])
    assert p.returncode == ExitCode.BAD_DATALIST, p.stderr
    msg = last_error(p)
    lines = msg.splitlines()
    assert lines[0].endswith("5 problems in the datalists")
    assert len(lines) == 6
    assert any("missing.nii.gz" in ln for ln in lines)
    assert any("has shape 8x8x7" in ln for ln in lines)
    assert any("voxel-to-world" in ln for ln in lines)
    assert any("label value 7 not in the label table" in ln for ln in lines)
    assert any(str(empty) in ln and "training split is empty" in ln for ln in lines)
    assert not out.exists() and not Path(str(out) + ".checkpoint").exists()
    assert "train" not in p.stdout


def test_gate_framing_in_the_config_reaches_the_gate_and_the_card(data, tmp_path):
    from uharmony.augment.views import FOV_VIEWS

    config = tmp_path / "framed.toml"
    config.write_text(TINY.replace(f"steps = {STEPS}", "steps = 6").replace("val_every = 15", "val_every = 6")
                      + "framing = 0.2\n")  # the last table is [gate]
    out = tmp_path / "framed"
    p = run("train", "--data", data["a"], data["b"], "--out", out, "--config", config, "--progress", "none")
    assert p.returncode == 0, p.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["config"]["gate"]["framing"] == 0.2
    assert card["gate"]["fov_views"] == list(FOV_VIEWS)
    assert card["gate"]["calibration"]["framing"]["max_fraction_per_side"] == 0.2
    assert "99th percentile" in card["gate"]["calibration"]["threshold_rule"]
    # the trained package segments with its five views
    case = data["a"].parent / "imagesTr" / "set-a_71004.nii.gz"
    seg = run("segment", case, "-o", tmp_path / "s.nii.gz", "--model", out, "--report", tmp_path / "r.json",
              "--progress", "none")
    assert seg.returncode == 0, seg.stderr
    assert set(json.loads((tmp_path / "r.json").read_text())["domain"]["probabilities"]) == {"synth-t1", "synth-t2"}
    config.write_text(TINY + "framing = 0.7\n")
    p = run("train", "--data", data["a"], "--out", tmp_path / "x", "--config", config)
    assert p.returncode == ExitCode.USAGE and "'gate.framing'" in last_error(p) and "[0, 0.5)" in last_error(p)
    assert not (tmp_path / "x").exists()


def test_config_table_in_docs_matches_the_code():
    for name in ("docs/training.md", "README.md"):  # README documents every key (DESIGN.md, "Configs")
        doc = (REPO / name).read_text(encoding="utf-8")
        assert config_table_markdown() in doc, name
    keys = [f.name for f in __import__("dataclasses").fields(TrainConfig)]
    for key in ("method", "steps", "poly_weight_decay", "checkpoint_every", "amp"):
        assert key in keys


def test_config_defaults_and_adapt_rules(tmp_path):
    cfg, given = load_config(None)
    assert cfg.method == "uharmony" and cfg.augment.gin and not given
    assert cfg.gate.method == "negative-free"  # the default gate: fixed contrast encoder + LDA routing
    path = tmp_path / "a.toml"
    path.write_text("steps = 7\n[model]\nfilters = [4, 8, 16]\nstrides = [1, 2, 2]\n")
    cfg, given = load_config(path)
    assert cfg.steps == 7 and given == {"steps", "model.filters", "model.strides"}
    from uharmony.errors import UHarmonyError

    with pytest.raises(UHarmonyError) as e:
        load_config(path, kind="adapt")
    assert e.value.code == ExitCode.USAGE and "'model.filters' is fixed by the base model" in str(e.value)
    path.write_text("patch_size = [20, 20, 20]\n")
    with pytest.raises(UHarmonyError) as e:
        load_config(path)
    assert "divisible" in str(e.value)
    for bad in ("0", "1.5"):
        path.write_text(f"[model]\npoly_scale = {bad}\n")
        with pytest.raises(UHarmonyError) as e:
            load_config(path)
        assert e.value.code == ExitCode.USAGE and "'model.poly_scale' must be in (0, 1]" in str(e.value)
    path.write_text("[model]\npoly_scale = 0.5\n")
    assert load_config(path)[0].model.poly_scale == 0.5
    with pytest.raises(UHarmonyError) as e:  # the base model's stage 2 is what adaptation trains
        load_config(path, kind="adapt")
    assert "'model.poly_scale' is fixed by the base model" in str(e.value)
    cfg, _ = load_config(None, kind="adapt")
    assert cfg.steps == 300 and cfg.lr == 1e-3


@pytest.fixture
def one_thread():
    """In-process training runs with one thread, like the subprocesses (much faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_baselines_joint_with_ipa_oracle_and_separate(data, tmp_path, capsys, one_thread):
    """The baselines in the same trainer: joint (plain InstanceNorm, one head, IPA on), the oracle, and a
    separate model per datalist (the last two in this process, to save the start-up time)."""
    from uharmony.model.harmony import HarmonyNorm
    from uharmony.model.package import load_model

    short = TINY.replace(f"steps = {STEPS}", "steps = 4").replace("val_every = 15", "val_every = 0")
    joint = tmp_path / "joint.toml"
    joint.write_text('method = "joint"\n' + short.replace("gin = true", "gin = true\nipa = true"))
    p = run("train", "--data", data["a"], data["b"], "--out", tmp_path / "j", "--config", joint)
    assert p.returncode == 0, p.stderr
    model, card = load_model(tmp_path / "j")
    assert model.domains == ["joint"] and card["architecture"]["harmony_levels"] == 0
    assert not any(isinstance(m, HarmonyNorm) for m in model.modules())
    assert card["training"]["domains"] == ["synth-t1", "synth-t2"] and card["training"]["config"]["augment"]["ipa"]
    assert set(card["evaluation"]["dice"]) == {"synth-t1", "synth-t2"}  # still evaluated per datalist domain
    assert card["evaluation"]["gate_accuracy"] == {"synth-t1": None, "synth-t2": None}

    oracle = tmp_path / "oracle.toml"
    oracle.write_text('method = "oracle"\n' + short.replace("gin = true", "gin = false"))
    p = cli(capsys, "train", "--data", data["a"], data["b"], "--out", tmp_path / "o", "--config", oracle)
    assert p.returncode == 0, p.stderr
    assert "routing: the true domain (oracle)" in p.stderr
    card = json.loads((tmp_path / "o" / "card.json").read_text(encoding="utf-8"))
    assert card["evaluation"]["routing"] == "oracle" and "oracle" in card["gate"]
    assert card["gate"]["routing"] == "argmax" and [d["name"] for d in card["domains"]] == ["synth-t1", "synth-t2"]

    separate = tmp_path / "separate.toml"
    separate.write_text('method = "separate"\n' + short.replace("steps = 4", "steps = 2"))
    p = cli(capsys, "train", "--data", data["a"], data["b"], "--out", tmp_path / "s", "--config", separate)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (tmp_path / "s").iterdir()) == ["set-a", "set-b"]  # one package per datalist
    for name, domain, classes in (("set-a", "synth-t1", CLASSES_A), ("set-b", "synth-t2", CLASSES_B)):
        model, card = load_model(tmp_path / "s" / name)
        assert model.domains == [domain] and card["architecture"]["harmony_levels"] == 0
        assert [c["name"] for c in card["classes"]] == ["background", *classes]


def test_class_balanced_patches_centre_a_small_class_as_often_as_a_large_one():
    from uharmony.train.data import Prepared, random_patch

    labels = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    labels[0, 5:35, 5:35, 5:35] = 3  # a large class (27 000 voxels)
    labels[0, 20:22, 20:22, 20:22] = 4  # a small one (8 voxels)
    item = Prepared(image=torch.randn(1, 40, 40, 40), labels=labels, small=torch.zeros(1, 4, 4, 4), domain="d",
                    dataset="x", annotated=[3, 4], source="none", fg=torch.nonzero(labels[0] > 0))

    def small_class_share(balance: bool) -> float:
        rng = np.random.default_rng(0)
        hits = [int(random_patch(item, rng, (8, 8, 8), 1.0, balance)[1][0, 4, 4, 4]) == 4 for _ in range(400)]
        return float(np.mean(hits))

    assert small_class_share(False) < 0.02  # 8 of 27 008 foreground voxels
    assert 0.4 < small_class_share(True) < 0.6  # one of the two classes present
    assert len(item.fg_by_class) == 2 and sum(len(v) for v in item.fg_by_class) == len(item.fg)


def test_gin_kernel_sizes_reach_the_augmentation(data, tmp_path, capsys, monkeypatch):
    """`augment.gin_kernel_sizes` is what the trainer's GIN draws its kernels from (default [1, 3])."""
    import uharmony.augment.gin as gin

    seen = []
    real = gin.GIN.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.kernel_sizes)

    monkeypatch.setattr(gin.GIN, "__init__", spy)
    cfg = tmp_path / "k1.toml"
    cfg.write_text(TINY.replace(f"steps = {STEPS}", "steps = 2").replace("val_every = 15", "val_every = 0")
                   .replace("checkpoint_every = 10", "checkpoint_every = 0")
                   .replace("gin_p = 0.5", "gin_p = 1.0\ngin_kernel_sizes = [1]"))
    p = cli(capsys, "train", "--data", data["a"], "--out", tmp_path / "k1", "--config", cfg)
    assert p.returncode == 0, p.stderr
    assert seen == [(1,), (1,)]  # one GIN per step
    card = json.loads((tmp_path / "k1" / "card.json").read_text())
    assert card["training"]["config"]["augment"]["gin_kernel_sizes"] == [1]


@pytest.mark.parametrize("setting, own_scale", [(0.0, 2.0), (1.0, 1.0)])
def test_each_domains_own_parameters_step_at_domain_lr_scale_times_the_rate(data, setting, own_scale):
    """Adam's first step moves every parameter with a gradient by about its group's learning rate: the
    domains' own parameters (stage 2, heads) by domain_lr_scale x the schedule's (0: the 2 domains)."""
    from uharmony.data.datalist import union_label_space
    from uharmony.model.network import ArchConfig, UHarmonyNet
    from uharmony.progress import Reporter
    from uharmony.train.data import BalancedSampler, load_datasets
    from uharmony.train.losses import MarginalDiceCELoss
    from uharmony.train.trainer import LoopState, lr_at, make_optimizer, prepare_items, train_step

    torch.manual_seed(0)
    datasets = load_datasets([str(data["a"]), str(data["b"])])
    union, maps = union_label_space(datasets)
    cfg = TrainConfig(steps=10, patch_size=[16, 16, 16], spacing_mm=[6.0] * 3, lr=1e-3, domain_lr_scale=setting,
                      amp=False)
    cfg.augment.gin = False
    model = UHarmonyNet(ArchConfig(num_classes=len(union), domains=["synth-t1", "synth-t2"], filters=[4, 8, 16],
                                   strides=[1, 2, 2], gate_input_size=[8, 8, 8], gate_filters=[4, 8]))
    items = prepare_items(datasets, maps, union, cfg.spacing_mm, model.gate.downsample, Reporter("none"),
                          split="training")
    route = {"synth-t1": 0, "synth-t2": 1}
    optimizer = make_optimizer(model, cfg, len(route))
    own = {n for n, _ in model.named_parameters() if ".harmony." in n or n.startswith("heads.")}
    names = {id(p): n for n, p in model.named_parameters()}
    assert own and {names[id(p)] for g in optimizer.param_groups if g["lr_scale"] == own_scale for p in g["params"]} \
        >= own
    assert all(g["lr_scale"] == 1.0 for g in optimizer.param_groups if any(names[id(p)] not in own for p in g["params"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = LoopState(model=model, config=cfg, items=items, route=route, device=torch.device("cpu"), patch=(16, 16, 16),
                      sampler=BalancedSampler([{d: [i for i, it in enumerate(items) if it.domain == d]} for d in route]),
                      train_gate=False)
    train_step(state, 1, optimizer, torch.amp.GradScaler("cpu", enabled=False), MarginalDiceCELoss(len(union)))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    step = lr_at(cfg, 1)
    assert max(moved[n] for n in own) == pytest.approx(own_scale * step, rel=0.02)
    shared = [n for n in moved if n not in own and not n.startswith("gate.")]
    assert max(moved[n] for n in shared) == pytest.approx(step, rel=0.02)


def test_domain_lr_scale_out_of_range_is_one_line_exit_2(tmp_path):
    from uharmony.errors import UHarmonyError

    path = tmp_path / "bad.toml"
    path.write_text("domain_lr_scale = -1\n")
    with pytest.raises(UHarmonyError) as e:
        load_config(path)
    assert e.value.code == ExitCode.USAGE and "'domain_lr_scale'" in str(e.value)
