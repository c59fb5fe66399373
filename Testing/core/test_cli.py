"""The `uharmony` command as a user runs it: real processes, exit codes, one-line errors, JSON lines,
cancel by SIGTERM, batch, DICOM, and the model folder."""

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

from uharmony.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]


def run(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "uharmony", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("uharmony: error: "), proc.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def nifti(path: Path, data: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


def test_jsonl_protocol_and_report(tiny_model, phantom, tmp_path):
    src, _ = phantom
    out, rep = tmp_path / "seg.nii.gz", tmp_path / "r.json"
    p = run("segment", src, "-o", out, "--model", tiny_model, "--report", rep, "--progress", "jsonl")
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]  # every stdout line is JSON
    assert events and all(e["v"] == 1 for e in events)
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    for stage in ("read", "preprocess", "gate", "infer", "postprocess", "write"):
        assert stage in stages
    infer = [e for e in events if e["event"] == "progress" and e["stage"] == "infer"]
    assert infer[-1]["done"] == infer[-1]["total"] > 1
    assert all(0 <= e["done"] <= e["total"] for e in infer)
    assert events[-1]["event"] == "result" and events[-1]["outputs"] == [str(out), str(rep)]
    assert events[-1]["report"]["domain"]["chosen"] in ("dom-a", "dom-b")
    assert json.loads(rep.read_text())["model"]["name"] == "tiny-test"


def test_human_summary_names_an_unsure_gate_and_an_unfamiliar_input():
    from uharmony.cli import human_summary

    report = {"outputs": ["s.nii.gz"], "device": "cpu", "timings_s": {"total": 1.0}, "classes": [],
              "domain": {"mode": "auto", "chosen": "mri-t1", "probabilities": {"mri-t1": 0.39, "mri-t2": 0.25,
                                                                              "mri-flair": 0.26, "ct": 0.1},
                         "unsure": True, "unfamiliar": False}}
    line = human_summary(report).splitlines()[1]
    assert line.startswith("domain: mri-t1 (gate, p=0.390)") and "WARNING" not in line
    assert "NOTE: the gate is unsure (mri-t1 p=0.39, mri-flair p=0.26); pass --domain" in line
    report["domain"].update(unsure=False, unfamiliar=True)
    line = human_summary(report).splitlines()[1]
    assert "WARNING: unfamiliar input" in line and "unsure" not in line
    assert not any(ln.startswith("relabelled") for ln in human_summary(report).splitlines())
    report["postprocess"] = {"min_component_ml": {"lesion": 0.5}, "removed_ml": {"lesion": 1.234}}
    assert "relabelled 1.2 mL of lesion in pieces under 0.5 mL (--min-component-ml)" in human_summary(report)


@pytest.mark.parametrize("value", ["lesion", "lesion=", "lesion=-1", "lesion=x", "=0.5"])
def test_min_component_option_is_checked(tiny_model, phantom, tmp_path, value):
    src, _ = phantom
    out = tmp_path / "s.nii.gz"
    p = run("segment", src, "-o", out, "--model", tiny_model, "--min-component-ml", value)
    assert p.returncode == ExitCode.USAGE and "expected CLASS=ML" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()


def test_human_output_and_preview(tiny_model, phantom, tmp_path):
    src, _ = phantom
    png = tmp_path / "p.png"
    p = run("segment", src, "-o", tmp_path / "s.nrrd", "--model", tiny_model, "--preview", png)
    assert p.returncode == 0, p.stderr
    assert "domain: dom-" in p.stdout and "mL" in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["constant", "nan", "2d", "4d", "truncated", "garbage", "missing", "zero-spacing"])
def test_bad_input_one_line_exit_code_no_output(tiny_model, tmp_path, case):
    rng = np.random.default_rng(0)
    good = rng.random((20, 20, 20)).astype(np.float32)
    name = f"{case}.nii" if case == "zero-spacing" else f"{case}.nii.gz"
    path = tmp_path / name
    if case == "constant":
        nifti(path, np.full((20, 20, 20), 5, np.float32))
    elif case == "nan":
        bad = good.copy()
        bad[3, 4, 5] = np.nan
        nifti(path, bad)
    elif case == "2d":
        nifti(path, good[:, :, 0])
    elif case == "4d":
        nifti(path, np.stack([good] * 3, axis=-1))
    elif case == "truncated":
        nifti(path, good)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        path.write_bytes(b"this is not an image" * 100)
    elif case == "zero-spacing":
        nib.save(nib.Nifti1Image(good, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
        raw = bytearray(path.read_bytes())  # nibabel "repairs" a zero pixdim on save; patch the file
        raw[84:88] = np.float32(0.0).tobytes()  # pixdim[2] of the NIfTI-1 header
        raw[252:256] = np.zeros(2, np.int16).tobytes()  # qform_code, sform_code = 0: spacing from pixdim
        path.write_bytes(bytes(raw))
    before = path.read_bytes() if path.exists() else None
    out = tmp_path / "seg.nii.gz"
    p = run("segment", path, "-o", out, "--model", tiny_model)
    assert p.returncode == ExitCode.BAD_INPUT, (p.returncode, p.stderr)
    one_line_error(p, name)
    assert not out.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ([name] if before is not None else [])
    if before is not None:
        assert path.read_bytes() == before


def test_output_exists_unless_overwrite(tiny_model, phantom, tmp_path):
    src, _ = phantom
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"precious")
    p = run("segment", src, "-o", out, "--model", tiny_model)
    assert p.returncode == ExitCode.OUTPUT_ERROR
    one_line_error(p, "seg.nii.gz", "--overwrite")
    assert out.read_bytes() == b"precious"
    p = run("segment", src, "-o", out, "--model", tiny_model, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert nib.load(out).shape == nib.load(src).shape
    p = run("segment", src, "-o", tmp_path / "no" / "such" / "dir" / "seg.nii.gz", "--model", tiny_model)
    assert p.returncode == ExitCode.OUTPUT_ERROR
    one_line_error(p, "seg.nii.gz")


def test_too_large_for_memory_and_wrong_channels(tiny_model, tiny_model_2ch, phantom, tmp_path):
    src, _ = phantom
    p = run("segment", src, "-o", tmp_path / "s.nii.gz", "--model", tiny_model, "--max-memory", "0.001")
    assert p.returncode == ExitCode.OUT_OF_MEMORY
    one_line_error(p, "t1.nii.gz", "GiB")
    p = run("segment", src, "-o", tmp_path / "s.nii.gz", "--model", tiny_model_2ch)
    assert p.returncode == ExitCode.BAD_INPUT
    one_line_error(p, "expects 2 input image")
    assert not (tmp_path / "s.nii.gz").exists()


def test_sigterm_cancels_cleanly(tiny_model, tmp_path):
    from uharmony.data import synth

    case = synth.make_case(70002, "synth-t1", spacing_mm=1.0)  # big enough to still be running
    src = tmp_path / "big.nii.gz"
    synth.write_case(case, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "uharmony", "segment", str(src), "-o", str(out_dir / "seg.nii.gz"),
                             "--model", str(tiny_model), "--report", str(out_dir / "r.json"), "--progress", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = json.loads(proc.stdout.readline())
    assert first["event"] == "progress"
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    code = proc.wait(timeout=60)
    assert code == ExitCode.CANCELLED
    last = json.loads(rest.strip().splitlines()[-1])
    assert last["event"] == "error" and last["code"] == ExitCode.CANCELLED
    assert list(out_dir.iterdir()) == []  # no partial output, no temporary file


def test_batch_goes_on_past_a_bad_file(tiny_model, phantom, tmp_path):
    src, case = phantom
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(src.read_bytes())
    from uharmony.data.io import write_volume

    write_volume(folder / "b.nrrd", case.image, case.affine)
    nifti(folder / "bad.nii.gz", np.zeros((10, 10, 10), np.float32))
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "out"
    p = run("segment", "--batch", folder, "-o", out, "--model", tiny_model)
    assert p.returncode == ExitCode.PARTIAL, p.stderr
    assert "2 of 3 scans segmented, 1 failed" in p.stdout
    assert "bad.nii.gz" in p.stdout and "constant" in p.stdout.lower()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (2, 1)
    assert nib.load(out / "a_seg.nii.gz").shape == case.image.shape
    assert (out / "b_seg.nrrd").exists() and (out / "b_seg.json").exists()
    assert not (out / "bad_seg.nii.gz").exists()


def test_dicom_series_folder(tiny_model, phantom, tmp_path):
    import SimpleITK as sitk

    _, case = phantom
    img = sitk.GetImageFromArray(np.ascontiguousarray(case.image[::2, ::2, ::2].transpose(2, 1, 0)).astype(np.int16))
    img.SetSpacing((4.0, 4.0, 4.0))
    img.SetOrigin((-90.0, -100.0, -80.0))
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in {"0008|0060": "MR", "0020|000e": uid, "0020|000d": uid + ".1",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "4.0", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k)))}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    out = tmp_path / "seg.nii.gz"
    p = run("segment", folder, "-o", out, "--model", tiny_model)
    assert p.returncode == 0, p.stderr
    seg = nib.load(out)
    assert seg.shape == tuple(img.GetSize())
    # DICOM is LPS: voxel (0,0,0) is at (-90,-100,-80) LPS = (90,100,-80) RAS
    np.testing.assert_allclose(seg.affine[:3, 3], [90.0, 100.0, -80.0], atol=1e-3)
    np.testing.assert_allclose(np.abs(np.diag(seg.affine)[:3]), [4.0, 4.0, 4.0], atol=1e-4)


def test_models_add_list_remove_and_tamper(tiny_model, isolated_model_folder, phantom, tmp_path):
    p = run("models", "add", tiny_model, "--name", "mine", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["trusted"] is True
    listing = json.loads(run("models", "list", "--json").stdout)
    names = {e["name"]: e for e in listing}
    assert names["mine"]["trusted"] and names["starter"]["bundled"]
    src, _ = phantom
    assert run("segment", src, "-o", tmp_path / "s.nii.gz", "--model", "mine").returncode == 0
    # tamper with the copy in the model folder: it must be refused from now on
    card_path = isolated_model_folder / "mine" / "card.json"
    card = json.loads(card_path.read_text())
    card["gate"]["unfamiliar_threshold"] = 1e9
    card_path.write_text(json.dumps(card))
    p = run("segment", src, "-o", tmp_path / "s2.nii.gz", "--model", "mine")
    assert p.returncode == ExitCode.BAD_MODEL
    one_line_error(p, "changed since it was added")
    listing = {e["name"]: e for e in json.loads(run("models", "list", "--json").stdout)}
    assert listing["mine"]["trusted"] is False and "changed" in listing["mine"]["problem"]
    assert run("models", "remove", "mine").returncode == 0
    assert "mine" not in {e["name"] for e in json.loads(run("models", "list", "--json").stdout)}


def test_info_prints_the_card(starter_dir):
    p = run("info", "--model", "starter")
    assert p.returncode == 0, p.stderr
    for needle in ("synth-t1", "synth-t2", "white matter", "intended use", "sha256", "2 x 2 x 2 mm"):
        assert needle in p.stdout
    card = json.loads(run("info", "--model", "starter", "--json").stdout)
    assert card["name"] == "uharmony-starter"
    default = json.loads(run("info", "--json").stdout)  # no --model: the bundled default, the brain model
    assert default["name"] == "brain" and [d["name"] for d in default["domains"]] == [
        "mri-t1", "mri-t2", "mri-flair", "ct"]
    assert "clean-up" not in p.stdout  # the starter card has no postprocess
    assert "clean-up:  lesion pieces under 0.5 mL go to the next likely class" in run("info").stdout


def test_every_subcommand_has_help():
    for args in (["--help"], ["segment", "--help"], ["info", "--help"], ["models", "--help"], ["models", "add", "--help"],
                 ["demo", "--help"], ["bench", "segment", "--help"], ["devices", "--help"]):
        p = run(*args)
        assert p.returncode == 0 and "usage: uharmony" in p.stdout, args
    p = run("segment")
    assert p.returncode == ExitCode.USAGE


def test_demo_segments_the_real_sample_with_the_default_model(tmp_path):
    """`make demo`'s job: the ITK example's real T1 (fetched from Debian's index), the bundled brain model."""
    from uharmony.bench.real import itk_reference

    src, ref, mask = itk_reference()
    out = tmp_path / "demo"
    p = run("demo", "--out", str(out), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    seg = nib.load(out / "sample_t1_seg.nii.gz")
    image = nib.load(src)
    assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)  # the input's own grid
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    report = json.loads((out / "sample_t1_report.json").read_text())
    assert report["model"]["name"] == "brain" and report["domain"]["chosen"] in ("mri-t1", "mri-t2", "mri-flair", "ct")
    assert (out / "sample_t1_preview.png").stat().st_size > 10_000
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("Agreement (Dice)"))
    figures = [float(x.split()[-1]) for x in line.split(":", 1)[1].split(",")]
    assert len(figures) == 3 and all(0.0 <= f <= 1.0 for f in figures)
    # the brain is found inside the reference brain mask: white matter agrees well with k-means
    assert figures[2] > 0.6
    assert nib.load(src).get_fdata().sum() == image.get_fdata().sum()  # input untouched


def test_the_command_line_starts_without_loading_torch():
    """`uharmony --help` and the option parsing stay fast: the device choices come from uharmony.device, whose
    functions import torch only when they run."""
    code = ("import sys, uharmony.cli, uharmony.fed.cli; from uharmony.device import DEVICE_CHOICES; "
            "uharmony.cli.build_parser(); print('torch' in sys.modules, DEVICE_CHOICES)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False ('auto', 'cpu', 'cuda', 'mps')"
