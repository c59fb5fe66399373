"""The federated gate's contrast encoder: random-contrast views, its pretraining, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uharmony.data import heads
from uharmony.data.preprocess import normalize_intensity
from uharmony.model.gate import DomainGate
from uharmony.train import contrast


@pytest.fixture(scope="module")
def views():
    return contrast.contrast_views(12, (8, 8, 8))


def test_views_are_normalised_gate_views_with_a_tissue_description(views):
    x, y = views
    assert x.shape == (12, 1, 8, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.shape == (12, 7)
    assert torch.isfinite(y[:, :3]).all()  # CSF, grey and white matter are in every head
    again = contrast.contrast_views(12, (8, 8, 8))
    assert torch.equal(again[0], x) and torch.equal(again[1].nan_to_num(99), y.nan_to_num(99))  # deterministic


def test_random_contrast_draws_every_tissue_order(views):
    _, y = views
    csf, grey, white = y[:, 0], y[:, 1], y[:, 2]
    # not one domain's order: grey above white in some views and below in others, CSF brightest in some
    assert bool((grey > white).any()) and bool((grey < white).any())
    assert bool(((csf > grey) & (csf > white)).any()) and bool(((csf < grey) & (csf < white)).any())


def test_random_contrast_is_not_a_domain_and_leaves_the_domains_alone():
    assert heads.RANDOM_CONTRAST not in heads.DOMAINS
    head = heads.make_head(5, spacing=6.0)
    a, _ = heads.render(head, heads.RANDOM_CONTRAST, 1, spacing=6.0)
    b, _ = heads.render(head, heads.RANDOM_CONTRAST, 2, spacing=6.0)
    assert a.shape == head.tissue.shape and not np.allclose(a, b)  # each seed its own contrast


def _convs(gate):
    return {k: v.clone() for k, v in gate.convs.state_dict().items()}


def test_pretraining_learns_the_description_and_touches_only_the_convolutions():
    gate = DomainGate(1, ["a", "b"], (8, 8, 8), (4, 8))
    classifier = {k: v.clone() for k, v in gate.classifier.state_dict().items()}
    info = contrast.pretrain_gate_features(gate, steps=60, views=30, seed=3)
    assert info["held_loss_after"] < 0.9 * info["held_loss_before"], info
    assert all(torch.equal(v, gate.classifier.state_dict()[k]) for k, v in classifier.items())
    assert all(p.grad is None for p in gate.parameters())
    # the result depends on the pretraining seed, not on torch's global RNG state
    torch.manual_seed(123)
    other = DomainGate(1, ["c"], (8, 8, 8), (4, 8))
    contrast.pretrain_gate_features(other, steps=60, views=30, seed=3)
    assert all(torch.equal(v, _convs(other)[k]) for k, v in _convs(gate).items())


def test_encoder_is_cached_per_gate_shape_and_refused_by_another(tmp_path, monkeypatch):
    monkeypatch.setenv("UHARMONY_DATA", str(tmp_path / "sources"))
    calls = []
    path = contrast.ensure_encoder(1, (8, 8, 8), (4, 8), steps=5, views=12, progress=lambda *a: calls.append(a))
    assert path.parent == tmp_path / "contrast-encoder" and path.suffix == ".safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written via a temporary name, renamed
    assert ("steps", 5, 5) in calls
    n = len(calls)
    assert contrast.ensure_encoder(1, (8, 8, 8), (4, 8), steps=5, views=12, progress=lambda *a: calls.append(a)) == path
    assert len(calls) == n  # cached: not pretrained again
    assert contrast.encoder_file(1, (8, 8, 8), (4, 8), steps=6, views=12) != path  # other settings, other file
    gate = DomainGate(1, ["a"], (8, 8, 8), (4, 8))
    info = contrast.load_encoder(gate, path)
    assert info["steps"] == 5 and info["format"] == contrast.FORMAT
    with pytest.raises(ValueError, match="does not fit this gate"):
        contrast.load_encoder(DomainGate(1, ["a"], (8, 8, 8), (4, 16)), path)


def test_fed_toml_refuses_an_unknown_gate_feature_kind(tmp_path):
    from uharmony.errors import UHarmonyError
    from uharmony.fed.config import load_fed_config

    (tmp_path / "fed.toml").write_text('domains = ["a"]\ngate_features = "learned"\n')
    with pytest.raises(UHarmonyError, match="gate_features"):
        load_fed_config(tmp_path / "fed.toml")
    (tmp_path / "fed.toml").write_text('domains = ["a"]\ngate_features = "random"\n')
    assert load_fed_config(tmp_path / "fed.toml").gate_features == "random"


def test_reference_features_are_deterministic_and_their_views_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("UHARMONY_DATA", str(tmp_path / "sources"))
    torch.manual_seed(0)
    gate = DomainGate(1, ["a"], (8, 8, 8), (4, 8))
    first = contrast.reference_features(gate, views=12)
    assert first.shape == (12, 8) and first.dtype == np.float64 and np.isfinite(first).all()
    assert len({tuple(np.round(f, 6)) for f in first}) == 12  # twelve different heads and contrasts
    cached = list((tmp_path / "contrast-encoder").iterdir())
    assert [p.name.startswith("reference-1-8x8x8-12-") for p in cached] == [True]
    monkeypatch.setattr(contrast, "contrast_views", lambda *a, **k: pytest.fail("views not taken from the cache"))
    np.testing.assert_array_equal(contrast.reference_features(gate, views=12), first)
    assert gate.training  # the gate's mode is left as it was


def test_the_default_gate_shape_uses_the_encoder_shipped_in_the_package(tmp_path, monkeypatch):
    """A first `uharmony fed serve` with the default gate does not pretrain (an hour on a CPU); the shipped
    encoder's features tell the benchmark's modalities apart by LDA on fresh heads."""
    from uharmony.fed.aggregate import FeatureStats, fit_gate_lda
    from uharmony.fed.config import FedConfig

    monkeypatch.setenv("UHARMONY_DATA", str(tmp_path / "sources"))
    monkeypatch.setattr(contrast, "pretrain_gate_features", lambda *a, **k: pytest.fail("pretrained again"))
    cfg = FedConfig()
    path = contrast.ensure_encoder(len(cfg.channels), cfg.gate.input_size, cfg.gate.filters,
                                   steps=cfg.gate_pretrain_steps, views=cfg.gate_pretrain_views)
    assert path.parent == contrast.SHIPPED_DIR and not (tmp_path / "contrast-encoder").exists()
    gate = DomainGate(1, ["a"], cfg.gate.input_size, cfg.gate.filters)
    info = contrast.load_encoder(gate, path)
    assert info["steps"] == cfg.gate_pretrain_steps and str(cfg.gate_pretrain_views) in info["data"]
    assert info["held_loss_after"] < 0.5 * info["held_loss_before"]
    gate.eval()
    feats, atlas = {}, heads.build_atlas()
    for d in heads.BENCH_TRAIN_DOMAINS:  # 12 heads per domain to fit on (as a benchmark site has), 4 to route
        views = []
        for k in range(16):
            head = heads.make_head(70000 + k, atlas=atlas, spacing=4.0)
            img, _ = heads.render(head, d, 70000 + k, spacing=4.0)
            views.append(torch.nn.functional.interpolate(normalize_intensity(torch.from_numpy(img)[None])[None],
                                                         size=tuple(cfg.gate.input_size), mode="trilinear")[0])
        with torch.no_grad():
            feats[d] = gate(torch.stack(views))[1][:, -gate.pooled_dim:].double().numpy()
    domains = list(heads.BENCH_TRAIN_DOMAINS)
    rows, _ = fit_gate_lda({d: FeatureStats.of(f[:12]) for d, f in feats.items()}, domains)
    for i, d in enumerate(domains):
        logits = np.stack([feats[d][12:] @ rows[f"gate.classifier.{e}.weight"][0] + rows[f"gate.classifier.{e}.bias"][0]
                           for e in domains], 1)
        assert list(logits.argmax(1)) == [i] * 4, d
