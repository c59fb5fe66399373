"""Shared fixtures: an isolated user model folder, the bundled model, tiny random models, phantoms."""

from __future__ import annotations

import locale
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


_STARTUP_LC_CTYPE = locale.setlocale(locale.LC_CTYPE)


@pytest.fixture(autouse=True)
def keep_text_locale():
    """Something in the session (an import of a Qt/VTK extension, at collection or in a test) switches
    LC_CTYPE to "C", which makes every later `subprocess.run(text=True)` decode as ASCII: put back the
    interpreter's start-up value before and after each test."""
    def restore():
        if locale.setlocale(locale.LC_CTYPE) != _STARTUP_LC_CTYPE:
            locale.setlocale(locale.LC_CTYPE, _STARTUP_LC_CTYPE)

    restore()
    yield
    restore()


@pytest.fixture(autouse=True)
def isolated_model_folder(tmp_path_factory, monkeypatch):
    """Never touch the developer's own model folder."""
    folder = tmp_path_factory.mktemp("user-models")
    monkeypatch.setenv("UHARMONY_MODELS", str(folder))
    return folder


@pytest.fixture(scope="session")
def starter_dir() -> Path:
    from uharmony.model.registry import bundled_model_dir

    path = bundled_model_dir("starter")  # the small bundled model: fast; the default is the brain model
    assert (path / "card.json").is_file(), "the bundled starter model is missing"
    return path


def make_tiny_package(out: Path, channels: int = 1, domains=("dom-a", "dom-b"), seed: int = 0) -> Path:
    """A small random-weight model package with a complete, valid card (pipeline tests only)."""
    import torch

    from uharmony.model.network import ArchConfig, UHarmonyNet
    from uharmony.model.package import save_package
    from uharmony.train.starter import class_table

    torch.manual_seed(seed)
    model = UHarmonyNet(ArchConfig(in_channels=channels, domains=list(domains), filters=[4, 8, 16],
                                   strides=[1, 2, 2], gate_filters=[4, 8, 8], gate_input_size=[16, 16, 16]))
    card = {
        "name": "tiny-test", "version": "0.0.1",
        "input": {"channels": [{"name": f"ch{i}"} for i in range(channels)],
                  "normalization": {"rule": "foreground-zscore", "lower_percentile": 0.5, "upper_percentile": 99.5,
                                    "foreground_fraction": 0.1},
                  "spacing_mm": [4.0, 4.0, 4.0], "orientation": "RAS", "patch_size": [32, 32, 32], "overlap": 0.25,
                  "sw_batch_size": 2},
        "domains": [{"name": d, "modality": "MR"} for d in domains],
        "classes": class_table(),
        "gate": {"unfamiliar_threshold": 1e6, "routing": "argmax"},
        "intended_use": "tests only", "limitations": ["random weights"], "training": {"none": True},
    }
    save_package(model, card, out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_2ch(tmp_path_factory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("tiny2") / "tiny2", channels=2)


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """A fresh T1-like phantom at 2 mm (seed 70001, never used in training) written as NIfTI."""
    from uharmony.data import synth

    case = synth.make_case(70001, "synth-t1", spacing_mm=2.0)
    folder = tmp_path_factory.mktemp("phantom")
    path = folder / "t1.nii.gz"
    synth.write_case(case, path, folder / "t1_labels.nii.gz")
    return path, case


def world_centroid(labels: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    idx = np.argwhere(labels == value).mean(0)
    return (affine @ np.append(idx, 1.0))[:3]
