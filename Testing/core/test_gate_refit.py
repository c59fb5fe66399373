"""The gate's view jitter and `uharmony refit-gate`: only the gate changes, a misrouting gate is fixed
from unlabelled-style datalists, and bad requests are refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uharmony.augment.views import jitter_views
from uharmony.errors import ExitCode
from uharmony.train.data import write_synth_datalist

REPO = Path(__file__).resolve().parents[2]


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "uharmony", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_view_jitter_keeps_shape_and_intensity_order_and_is_reproducible():
    x = torch.randn(4, 1, 16, 16, 16)
    a = jitter_views(x, np.random.default_rng(7))
    b = jitter_views(x, np.random.default_rng(7))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)  # a function of the RNG: resumed runs repeat it
    assert not torch.equal(a, jitter_views(x, np.random.default_rng(8)))
    assert not torch.allclose(a, x)
    # the intensity part is monotone: tissue order (what tells the domains apart) is never inverted,
    # unlike GIN; checked on many draws of a random image
    from uharmony.augment.views import intensity_jitter

    jitter = intensity_jitter()
    img = torch.randn(1, 10, 10, 10)
    order = torch.argsort(img.flatten())
    for seed in range(20):
        jitter.set_random_state(seed=seed)
        out = torch.as_tensor(jitter(img.clone())).flatten()[order]
        assert bool((out[1:] - out[:-1] >= -1e-5).all()), seed


@pytest.fixture(scope="module")
def misrouting(tmp_path_factory, starter_dir) -> Path:
    """The starter model with its gate pushed to answer synth-t2 for everything."""
    from uharmony.model.package import load_model, save_package

    model, card = load_model(starter_dir)
    with torch.no_grad():
        model.gate.classifier["synth-t2"].bias.add_(50.0)
    out = tmp_path_factory.mktemp("gate") / "misrouting"
    save_package(model, card, out)
    return out


@pytest.fixture(scope="module")
def style_lists(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("styles")
    return [write_synth_datalist(root / s, s, training_seeds=(10, 11, 12), validation_seeds=(13, 14))
            for s in ("synth-t1", "synth-t2")]


def test_refit_gate_fixes_a_misrouting_gate_and_changes_nothing_else(misrouting, style_lists, tmp_path):
    out = tmp_path / "refit"
    p = run("refit-gate", "--model", misrouting, "--data", *style_lists, "--out", out, "--steps", 60,
            "--batch-size", 8, "--lr", 3e-3, "--progress", "none")
    assert p.returncode == 0, p.stderr
    card = json.loads((out / "card.json").read_text())
    refit = card["gate"]["refit"]
    assert refit["accuracy_before"] == {"synth-t1": 0.0, "synth-t2": 1.0}
    assert refit["accuracy_after"] == {"synth-t1": 1.0, "synth-t2": 1.0}
    assert refit["confusion_after"]["synth-t1"] == {"synth-t1": 2, "synth-t2": 0}
    assert refit["training_views"] == 6 and refit["split"] == "validation"
    table = [line.split() for line in p.stderr.splitlines() if line.strip().startswith("synth-t1")]
    assert table == [["synth-t1", "0%", "->", "100%"]]
    base, new = load_file(str(misrouting / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(base) == set(new)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all(k.startswith("gate.") for k in changed)
    assert any(k.startswith("gate.convs") for k in changed)  # the CNN learnt, not only the biases
    # the result is a working package: a fresh synth-t1 case is now routed to synth-t1
    case = style_lists[0].parent / "imagesTr" / "synth-t1_00013.nii.gz"
    seg = run("segment", case, "-o", tmp_path / "seg.nii.gz", "--model", out, "--report", tmp_path / "r.json",
              "--progress", "none")
    assert seg.returncode == 0, seg.stderr
    assert json.loads((tmp_path / "r.json").read_text())["domain"]["chosen"] == "synth-t1"


def test_refit_gate_refuses_unknown_domains_and_an_existing_output(misrouting, style_lists, tmp_path):
    other = write_synth_datalist(tmp_path / "flair", "synth-flair", training_seeds=(1,))
    out = tmp_path / "refit"
    p = run("refit-gate", "--model", misrouting, "--data", style_lists[0], other, "--out", out, "--steps", 1)
    assert p.returncode == ExitCode.BAD_DATALIST
    assert "synth-flair" in p.stderr and "uharmony adapt" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run("refit-gate", "--model", misrouting, "--data", *style_lists, "--out", out, "--steps", 1)
    assert p.returncode == ExitCode.OUTPUT_ERROR and "exists already" in p.stderr
    assert (out / "keep.txt").read_text() == "mine" and not (out / "card.json").exists()


def test_a_card_records_the_command_it_was_called_with_not_the_callers_argv(misrouting, style_lists, tmp_path):
    # `python -m uharmony.train.brain train` calls the CLI in-process; the card must name the
    # `uharmony refit-gate ...` it ran, not the wrapper's (or here pytest's) sys.argv
    from uharmony.cli import main as cli_main

    out = tmp_path / "refit"
    argv = ["refit-gate", "--model", str(misrouting), "--data", *map(str, style_lists), "--out", str(out),
            "--steps", "1", "--batch-size", "2", "--progress", "none"]
    assert cli_main(argv) == 0
    command = json.loads((out / "card.json").read_text())["gate"]["refit"]["command"]
    assert command == "uharmony " + " ".join(argv)
