"""`gate.method = "negative-free"` in `uharmony train` and `uharmony adapt`, as a user runs them.

The gate's convolutions are the contrast encoder (pretrained here with a tiny budget, cached in a
temporary folder) and are never trained; its routing rows are LDA of each domain's pooled features.
An adaptation refits the rows with the new domain's mean and keeps the old domains' features.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uharmony.errors import ExitCode
from uharmony.train.data import write_synth_datalist

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
steps = 6
batch_size = 2
patch_size = [24, 24, 24]
spacing_mm = [4.0, 4.0, 4.0]
val_every = 0
checkpoint_every = 0
seed = 5
[model]
filters = [4, 8, 16]
strides = [1, 2, 2]
[gate]
input_size = [16, 16, 16]
filters = [4, 8, 8]
method = "negative-free"
pretrain_steps = 5
pretrain_views = 12
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("negative-free")
    a = write_synth_datalist(root / "a", "synth-t1", domain="dom-a", name="set-a", training_seeds=(73001, 73002, 73003),
                             validation_seeds=(73004,))
    b = write_synth_datalist(root / "b", "synth-t2", domain="dom-b", name="set-b", training_seeds=(73011, 73012, 73013))
    new = write_synth_datalist(root / "new", "synth-flair", domain="flair", name="new-flair",
                               training_seeds=(73021, 73022, 73023))
    config = root / "nf.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "UHARMONY_DATA": str(root / "cache" / "sources")}
    return {"root": root, "a": a, "b": b, "new": new, "config": config, "env": env}


def run(work: dict, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uharmony", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=work["env"])


@pytest.fixture(scope="module")
def base(work) -> Path:
    out = work["root"] / "base"
    p = run(work, "train", "--data", work["a"], work["b"], "--out", out, "--config", work["config"])
    assert p.returncode == 0, p.stderr
    assert "routes by LDA" in p.stderr
    return out


def training_items(model, datalists):
    from uharmony.data.datalist import union_label_space
    from uharmony.progress import Reporter
    from uharmony.train.data import load_datasets
    from uharmony.train.trainer import prepare_items

    datasets = load_datasets([str(d) for d in datalists])
    union, maps = union_label_space(datasets)
    return prepare_items(datasets, maps, union, [4.0] * 3, model.gate.downsample, Reporter("none"), split="training")


def test_train_keeps_the_encoder_and_routes_by_lda_of_the_training_cases(work, base):
    from uharmony.fed.aggregate import fit_gate_lda
    from uharmony.model.package import load_model
    from uharmony.train.contrast import encoder_file
    from uharmony.train.gate import domain_feature_stats

    model, card = load_model(base)
    gate = card["gate"]
    assert gate["method"] == "negative-free"
    assert card["training"]["config"]["gate"]["method"] == "negative-free"
    expected = encoder_file(1, [16, 16, 16], [4, 8, 8], steps=5, views=12)
    assert gate["encoder"] == expected.name and gate["pretraining"]["steps"] == 5
    cached = Path(work["env"]["UHARMONY_DATA"]).parent / "contrast-encoder" / expected.name
    encoder = load_file(str(cached))
    weights = load_file(str(base / "model.safetensors"))
    assert encoder and all(torch.equal(weights[f"gate.convs.{k}"], v) for k, v in encoder.items())  # never trained

    items = training_items(model, [work["a"], work["b"]])
    stats = domain_feature_stats(model, items)
    assert {d: s.count for d, s in stats.items()} == {"dom-a": 3, "dom-b": 3}
    for d in ("dom-a", "dom-b"):
        assert gate["lda"]["domains"][d]["count"] == 3
        np.testing.assert_allclose(gate["lda"]["domains"][d]["mean"], stats[d].mean, rtol=1e-5, atol=1e-7)
    rows, shrinkage = fit_gate_lda(stats, model.domains)
    assert shrinkage == pytest.approx(gate["lda"]["shrinkage"], abs=1e-5)
    for k, v in rows.items():
        np.testing.assert_allclose(weights[k].numpy(), v, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # every training case routed to its own domain
        chosen = [model.domains[int(model.gate(it.small[None])[0].argmax(1))] for it in items]
    assert chosen == [it.domain for it in items]


def test_adapt_refits_the_routing_and_keeps_the_old_domains_features(work, base):
    from uharmony.fed.aggregate import FeatureStats, fit_gate_lda
    from uharmony.model.package import load_model
    from uharmony.train.gate import domain_feature_stats

    out = work["root"] / "adapted"
    config = work["root"] / "adapt.toml"
    config.write_text("steps = 3\ncheckpoint_every = 0\n")
    p = run(work, "adapt", "--model", base, "--data", work["new"], "--keep", work["a"], "--out", out,
            "--config", config)
    assert p.returncode == 0, p.stderr
    assert "remembered means of dom-b" in p.stderr
    old_card = json.loads((base / "card.json").read_text())
    model, card = load_model(out)
    assert model.domains == ["dom-a", "dom-b", "flair"]
    assert card["gate"]["method"] == "negative-free" and card["training"]["config"]["gate"]["method"] == "negative-free"
    lda, old = card["gate"]["lda"]["domains"], old_card["gate"]["lda"]["domains"]
    assert lda["dom-b"] == old["dom-b"]  # no cases given: the remembered mean and count
    np.testing.assert_allclose(lda["dom-a"]["mean"], old["dom-a"]["mean"], rtol=1e-5, atol=1e-7)  # same cases
    assert lda["flair"]["count"] == 3
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    convs = [k for k in before if k.startswith("gate.convs.")]
    assert convs and all(torch.equal(before[k], after[k]) for k in convs)
    assert "gate.classifier.flair.weight" in after
    assert not torch.equal(before["gate.classifier.dom-a.weight"], after["gate.classifier.dom-a.weight"])  # refitted
    # the rows are LDA over the given cases' statistics plus dom-b's remembered mean (count 1, no scatter, so
    # the pooled covariance comes from the cases); the tiny encoder's routing itself is not judged here
    stats = domain_feature_stats(model, training_items(model, [work["a"], work["new"]]))
    stats["dom-b"] = FeatureStats(1, np.asarray(old["dom-b"]["mean"]), np.zeros((len(old["dom-b"]["mean"]),) * 2))
    rows, shrinkage = fit_gate_lda(stats, model.domains)
    assert shrinkage == pytest.approx(card["gate"]["lda"]["shrinkage"], abs=1e-5)
    for k, v in rows.items():
        np.testing.assert_allclose(after[k].numpy(), v, rtol=1e-4, atol=1e-5)


def test_adapt_without_cases_or_remembered_mean_of_a_domain_is_refused(work, base, tmp_path):
    forgetful = tmp_path / "forgetful"
    shutil.copytree(base, forgetful)
    card = json.loads((forgetful / "card.json").read_text())
    del card["gate"]["lda"]
    (forgetful / "card.json").write_text(json.dumps(card))
    out = tmp_path / "adapted"
    p = run(work, "adapt", "--model", forgetful, "--data", work["new"], "--keep", work["a"], "--out", out)
    assert p.returncode == ExitCode.BAD_DATALIST, p.stderr
    assert "Traceback" not in p.stderr
    assert "no cases and no remembered mean for domain(s) dom-b" in p.stderr
    assert not out.exists()


def test_negative_free_config_keys_are_checked(work, tmp_path):
    for text, key in (('[gate]\nmethod = "lda"\n', "gate.method"),
                      ('[gate]\nmethod = "negative-free"\nframing = 0.1\n', "gate.framing"),
                      ('[gate]\nframing = 0.1\n', "gate.framing"),  # the default gate is negative-free
                      ('[gate]\npretrain_views = 3\n', "gate.pretrain_views")):
        config = tmp_path / "bad.toml"
        config.write_text(text)
        p = run(work, "train", "--data", work["a"], "--out", tmp_path / "never", "--config", config, timeout=60)
        assert p.returncode == ExitCode.USAGE and repr(key) in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "never").exists()
    config = tmp_path / "adapt.toml"
    config.write_text('[gate]\nmethod = "negative-free"\n')
    p = run(work, "adapt", "--model", tmp_path / "none", "--data", work["new"], "--out", tmp_path / "never",
            "--config", config, timeout=60)
    assert p.returncode == ExitCode.USAGE and "'gate.method' is fixed by the base model" in p.stderr, p.stderr


def test_refit_gate_turns_a_negative_free_gate_into_a_trained_one(work, base, tmp_path):
    out = tmp_path / "regated"
    p = run(work, "refit-gate", "--model", base, "--data", work["a"], work["b"], "--out", out, "--steps", 3,
            "--batch-size", 4)
    assert p.returncode == 0, p.stderr
    assert "now a trained gate" in p.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["gate"]["method"] == "trained" and "lda" not in card["gate"]
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["gate.convs.0.weight"], after["gate.convs.0.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("gate."))
    # adapting it now treats the gate as trained (no LDA refit, no remembered means needed)
    cfg = tmp_path / "adapt.toml"
    cfg.write_text("steps = 2\nbatch_size = 2\ncheckpoint_every = 0\n[augment]\ngin = false\n")
    p = run(work, "adapt", "--model", out, "--data", work["new"], "--out", tmp_path / "adapted", "--config", cfg)
    assert p.returncode == 0, p.stderr
    assert "refitted by LDA" not in p.stderr
    assert json.loads((tmp_path / "adapted" / "card.json").read_text())["gate"]["method"] == "trained"


@pytest.mark.parametrize("shape", ["default", "bench"])
def test_the_default_and_the_bench_gate_shapes_ship_their_contrast_encoder(shape, monkeypatch, tmp_path):
    """`uharmony train` with the default config and `uharmony bench generalize` never pretrain an encoder:
    the file for their gate shape and pretraining settings is in the package and fits the gate."""
    from uharmony.bench.generalize import budget
    from uharmony.model.gate import DomainGate
    from uharmony.train import contrast
    from uharmony.train.config import GateConfig

    monkeypatch.setenv("UHARMONY_DATA", str(tmp_path / "empty-cache" / "sources"))
    monkeypatch.setattr(contrast, "pretrain_gate_features", lambda *a, **k: pytest.fail("pretrained an encoder"))
    gate = {**GateConfig().__dict__, **(budget(500, False)["gate"] if shape == "bench" else {})}
    assert gate["method"] == "negative-free"
    path = contrast.ensure_encoder(1, gate["input_size"], gate["filters"], steps=gate["pretrain_steps"],
                                   views=gate["pretrain_views"])
    assert path.parent == contrast.SHIPPED_DIR
    net = DomainGate(1, ["a", "b"], gate["input_size"], gate["filters"])
    info = contrast.load_encoder(net, path)
    assert info["steps"] == gate["pretrain_steps"] and info["held_loss_after"] < info["held_loss_before"]
