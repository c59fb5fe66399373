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


def test_reframe_crops_and_pads_each_side_with_air_and_is_reproducible():
    from uharmony.augment.views import framed_views, reframe

    image = torch.arange(2 * 20 * 30 * 40, dtype=torch.float32).reshape(2, 20, 30, 40) + 5.0
    image[:, 10, 15, 20] = -1.0  # the minimum (air), in the centre that no crop removes
    shapes, cropped, padded = set(), 0, 0
    for seed in range(40):
        out = reframe(image, np.random.default_rng(seed), 0.25)
        assert torch.equal(out, reframe(image, np.random.default_rng(seed), 0.25))
        assert out.shape[0] == 2 and out.dtype == torch.float32
        shapes.add(tuple(out.shape))
        # the scan is an unmoved block of the original (a crop, never a resample) inside padding of air
        kept = torch.nonzero(out[0] != -1)
        lo, hi = kept.min(0).values, kept.max(0).values + 1
        block = out[(slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))]
        first = np.unravel_index(int(block[0, 0, 0, 0]) - 5, image.shape)
        src = image[(slice(None), *(slice(int(f), int(f) + int(n)) for f, n in zip(first[1:], block.shape[1:])))]
        assert torch.equal(block, src)
        outside = torch.ones(out.shape[1:], dtype=torch.bool)
        outside[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = False
        assert bool((out[:, outside] == -1).all())
        for n, m, f, pad_lo in zip(image.shape[1:], block.shape[1:], first[1:], lo):
            assert f <= round(0.25 * n) and n - f - m <= round(0.25 * n)  # at most a quarter cut per side
            assert pad_lo <= round(0.25 * n)  # at most a quarter added per side
            cropped += int(m < n)
        padded += int(out[0].numel() > block[0].numel())
    assert len(shapes) > 30 and cropped > 20 and padded > 20  # sides are drawn independently
    assert torch.equal(reframe(image, np.random.default_rng(1), 0.0), image)
    views = framed_views([image, image[:, :10]], np.random.default_rng(3), 0.15,
                         lambda x: torch.nn.functional.interpolate(x, size=(8, 8, 8), mode="trilinear"))
    assert views.shape == (2, 2, 8, 8, 8)


def test_fov_view_is_a_centred_crop_or_air_padding():
    from uharmony.augment.views import fov_view

    image = torch.rand(1, 20, 60, 40) + 1.0
    image[0, 0, 0, 0] = 0.5  # the minimum
    crop = fov_view(image, 0.8)
    assert crop.shape == (1, 16, 48, 32) and torch.equal(crop, image[:, 2:18, 6:54, 4:36])
    pad = fov_view(image, 1.3)
    assert pad.shape == (1, 26, 78, 52)
    assert torch.equal(pad[:, 3:23, 9:69, 6:46], image)
    inner = torch.zeros(pad.shape[1:], dtype=torch.bool)
    inner[3:23, 9:69, 6:46] = True
    assert bool((pad[0][~inner] == 0.5).all())
    assert fov_view(image, 1.0) is image


def test_segment_averages_the_gate_over_the_cards_fields_of_view(tiny_model):
    """`uharmony segment`'s routing and unfamiliar score with and without the card's `gate.fov_views` (a
    random gate: unsure)."""
    from uharmony.augment.views import fov_view
    from uharmony.infer.segment import Segmenter

    seg = Segmenter(tiny_model, device="cpu")
    gate = seg.model.gate
    x = torch.rand(1, 40, 36, 30) * torch.linspace(0, 2, 30)  # an image whose framing matters to the gate
    with torch.no_grad():
        gate.classifier[gate.domains[0]].weight.mul_(300.0)  # a random gate barely notices framing otherwise
        single = seg.run_gate(x)
        seg.card["gate"]["fov_views"] = [0.8, 1.3]  # 1.0, the scan as it is, is always added
        averaged = seg.run_gate(x)
        views = [torch.softmax(gate(gate.downsample(fov_view(x, s)[None]))[0], 1)[0] for s in (0.8, 1.3, 1.0)]
        view_scores = [float(gate.unfamiliar_score(gate(gate.downsample(fov_view(x, s)[None]))[1])[0])
                       for s in (0.8, 1.3, 1.0)]
    want = torch.stack(views).mean(0)
    assert [averaged.probabilities[d] for d in gate.domains] == pytest.approx(want.tolist(), abs=1e-5)
    assert [single.probabilities[d] for d in gate.domains] == pytest.approx(views[2].tolist(), abs=1e-5)
    assert abs(averaged.probabilities[gate.domains[0]] - single.probabilities[gate.domains[0]]) > 1e-3
    # the score: the plain view's alone, and with several views the lowest (a scan is familiar when some
    # framing of it is); this image's framings score apart, so taking any other view would show
    assert single.score == pytest.approx(view_scores[2], abs=1e-3)
    assert averaged.score == pytest.approx(min(view_scores), abs=1e-3)
    assert min(view_scores) < view_scores[2] - 0.05  # this image: the plain view is not the lowest


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
    assert refit["framing"] == 0 and "fov_views" not in card["gate"] and "framing" not in card["gate"]["calibration"]
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


def test_refit_gate_with_framing_trains_on_reframed_scans_and_asks_segment_for_several_views(
        misrouting, style_lists, tmp_path):
    from uharmony.augment.views import FOV_VIEWS

    out = tmp_path / "framed"
    p = run("refit-gate", "--model", misrouting, "--data", *style_lists, "--out", out, "--steps", 120,
            "--batch-size", 8, "--lr", 3e-3, "--framing", 0.15, "--progress", "none")
    assert p.returncode == 0, p.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["gate"]["refit"]["framing"] == 0.15
    assert card["gate"]["refit"]["accuracy_after"] == {"synth-t1": 1.0, "synth-t2": 1.0}
    assert card["gate"]["fov_views"] == list(FOV_VIEWS) and 1.0 in FOV_VIEWS
    # the familiar-input Gaussians were fit on the plain view and four reframed ones per case
    assert card["gate"]["calibration"]["framing"] == {"max_fraction_per_side": 0.15, "reframed_views_per_case": 4,
                                                      "seed": 0}
    # the training differed from the unframed refit's: the same seed, other gate weights
    plain = tmp_path / "plain"
    assert run("refit-gate", "--model", misrouting, "--data", *style_lists, "--out", plain, "--steps", 120,
               "--batch-size", 8, "--lr", 3e-3, "--progress", "none").returncode == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert not torch.equal(a["gate.convs.0.weight"], b["gate.convs.0.weight"])
    # the package works: a fresh synth-t1 case is routed to synth-t1, by the average over the five views
    case = style_lists[0].parent / "imagesTr" / "synth-t1_00013.nii.gz"
    seg = run("segment", case, "-o", tmp_path / "seg.nii.gz", "--model", out, "--report", tmp_path / "r.json",
              "--progress", "none")
    assert seg.returncode == 0, seg.stderr
    assert json.loads((tmp_path / "r.json").read_text())["domain"]["chosen"] == "synth-t1"
    bad = run("refit-gate", "--model", misrouting, "--data", *style_lists, "--out", tmp_path / "bad",
              "--framing", 0.6, "--progress", "none")
    assert bad.returncode == ExitCode.USAGE and "--framing" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


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
