"""The maths of U-Harmony: stage 1, stage 2, routing, gradients, AMP safety, the gate."""

import pytest
import torch
from torch import nn

from uharmony.model.harmony import HarmonyNorm, hermite_terms
from uharmony.model.network import ArchConfig, UHarmonyNet, polynomial_penalty

DOMAINS = ["mri-t1", "ct"]


def tiny(domains=DOMAINS, **kw) -> UHarmonyNet:
    cfg = dict(domains=list(domains), filters=[4, 8, 16], strides=[1, 2, 2], gate_filters=[4, 8, 8],
               gate_input_size=[16, 16, 16])
    cfg.update(kw)
    torch.manual_seed(0)
    return UHarmonyNet(ArchConfig(**cfg))


def test_hermite_terms_are_the_centred_polynomials():
    x = torch.linspace(-3, 3, 13)
    he2, he3 = hermite_terms(x, 3)
    assert torch.allclose(he2, x**2 - 1)
    assert torch.allclose(he3, x**3 - 3 * x)
    # centred: zero mean under a standard normal
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    assert abs(float(hermite_terms(z, 3)[0].mean())) < 0.02
    assert abs(float(hermite_terms(z, 3)[1].mean())) < 0.05


def test_stage1_standardises_each_sample_and_channel():
    layer = HarmonyNorm(3, DOMAINS, degree=1)
    x = torch.randn(2, 3, 6, 7, 8) * torch.tensor([1.0, 50.0, 0.5]).view(1, 3, 1, 1, 1) + 7.0
    y = layer(x)  # degree 1, fresh: stage 2 is the identity
    mean = y.mean(dim=(2, 3, 4))
    std = y.std(dim=(2, 3, 4), unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


def test_fresh_layer_equals_instance_norm_with_affine():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, 6, 7) * 3 + 1
    ref = nn.InstanceNorm3d(4, affine=True)
    layer = HarmonyNorm(4, DOMAINS, degree=3)
    layer.set_routing(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(layer(x), ref(x), atol=1e-5)


def _set_domain(layer: HarmonyNorm, name: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.harmony[name].gamma.copy_(torch.randn(layer.harmony[name].gamma.shape, generator=g))
        layer.harmony[name].beta.copy_(torch.randn(layer.harmony[name].beta.shape, generator=g))


def test_one_hot_routing_uses_exactly_that_domains_parameters():
    layer = HarmonyNorm(2, DOMAINS, degree=3, clamp=4.0)
    _set_domain(layer, "mri-t1", 1)
    _set_domain(layer, "ct", 2)
    x = torch.randn(1, 2, 4, 4, 4)
    layer.set_routing(torch.tensor([[0.0, 1.0]]))
    y = layer(x)
    # the formula by hand with the "ct" parameters
    xhat = (x - x.mean(dim=(2, 3, 4), keepdim=True)) / torch.sqrt(x.var(dim=(2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
    xc = xhat.clamp(-4, 4)
    g, b = layer.harmony["ct"].gamma.detach(), layer.harmony["ct"].beta.detach()
    v = lambda t: t.view(1, 2, 1, 1, 1)  # noqa: E731
    expected = v(g[0]) * xhat + v(g[1]) * (xc**2 - 1) + v(g[2]) * (xc**3 - 3 * xc) + v(b)
    assert torch.allclose(y, expected, atol=1e-5)
    layer.set_routing(torch.tensor([[1.0, 0.0]]))
    assert not torch.allclose(layer(x), y, atol=1e-3)


def test_poly_scale_multiplies_only_the_hermite_terms():
    layer = HarmonyNorm(2, DOMAINS, degree=3, clamp=3.0, poly_scale=0.1)
    _set_domain(layer, "ct", 5)
    x = 3 * torch.randn(2, 2, 4, 4, 4)
    layer.set_routing(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    y = layer(x)
    xhat = (x - x.mean(dim=(2, 3, 4), keepdim=True)) / torch.sqrt(x.var(dim=(2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
    xc = xhat.clamp(-3, 3)
    g, b = layer.harmony["ct"].gamma.detach(), layer.harmony["ct"].beta.detach()
    v = lambda t: t.view(1, 2, 1, 1, 1)  # noqa: E731
    expected = v(g[0]) * xhat + 0.1 * (v(g[1]) * (xc**2 - 1) + v(g[2]) * (xc**3 - 3 * xc)) + v(b)
    assert torch.allclose(y, expected, atol=1e-5)
    with pytest.raises(ValueError, match="poly_scale"):
        HarmonyNorm(2, DOMAINS, poly_scale=0.0)


def test_an_architecture_without_poly_scale_rebuilds_the_unscaled_network():
    """Cards written before `poly_scale` existed must rebuild exactly the network they were trained as."""
    arch = ArchConfig(domains=list(DOMAINS), filters=[4, 8, 16], strides=[1, 2, 2], gate_filters=[4, 8, 8],
                      gate_input_size=[16, 16, 16], poly_scale=0.25).to_dict()
    assert arch["poly_scale"] == 0.25
    old = {k: v for k, v in arch.items() if k != "poly_scale"}
    net = UHarmonyNet(ArchConfig.from_dict(old))
    assert {layer.poly_scale for layer in net.harmony_layers()} == {1.0}
    assert {layer.poly_scale for layer in UHarmonyNet(ArchConfig.from_dict(arch)).harmony_layers()} == {0.25}


def test_soft_routing_mixes_linearly():
    layer = HarmonyNorm(2, DOMAINS)
    _set_domain(layer, "mri-t1", 1)
    _set_domain(layer, "ct", 2)
    x = torch.randn(1, 2, 4, 4, 4)
    outs = []
    for w in ([1.0, 0.0], [0.0, 1.0], [0.3, 0.7]):
        layer.set_routing(torch.tensor([w]))
        outs.append(layer(x))
    assert torch.allclose(outs[2], 0.3 * outs[0] + 0.7 * outs[1], atol=1e-5)


def test_network_domains_give_different_outputs_and_backward_reaches_only_the_routed_domain():
    model = tiny()
    for layer in model.harmony_layers():
        _set_domain(layer, "mri-t1", 1)
        _set_domain(layer, "ct", 2)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        a, b = model(x, "mri-t1"), model(x, "ct")
    assert a.shape == (2, 5, 16, 16, 16)
    assert (a - b).abs().max() > 1e-3
    model.zero_grad()
    model(x, "ct").square().mean().backward()
    for name, p in model.named_parameters():
        if ".harmony.mri-t1." in name or name.startswith("heads.mri-t1"):
            assert p.grad is None or not p.grad.any(), name
        if ".harmony.ct." in name or name.startswith("heads.ct"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    harmony_names = [n for n, _ in model.named_parameters() if ".harmony." in n]
    assert harmony_names and all(".harmony.mri-t1." in n or ".harmony.ct." in n for n in harmony_names)


def test_harmony_sits_in_the_first_levels_only():
    model = tiny(harmony_levels=1)
    bb = model.backbone
    assert isinstance(bb.input_block.norm1, HarmonyNorm)
    assert isinstance(bb.upsamples[-1].conv_block.norm1, HarmonyNorm)
    assert isinstance(bb.downsamples[0].norm1, nn.InstanceNorm3d)
    assert isinstance(bb.upsamples[0].conv_block.norm1, nn.InstanceNorm3d)
    assert len(tiny(harmony_levels=2).harmony_layers()) == 8


def test_stage2_stays_finite_on_extreme_inputs_under_autocast():
    layer = HarmonyNorm(2, DOMAINS, degree=3)
    _set_domain(layer, "ct", 5)
    x = torch.randn(1, 2, 32, 32, 32)
    x[0, 0, 0, 0, 0] = 6e4  # one extreme voxel: xhat ~ 180, xhat^3 overflows fp16 unless clamped in fp32
    layer.set_routing(torch.tensor([[0.0, 1.0]]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    layer = layer.to(device)
    with torch.autocast(device_type=device, dtype=dtype):
        y = layer(x.to(device, dtype))
    assert y.dtype == dtype
    assert torch.isfinite(y.float()).all()


def test_polynomial_penalty_covers_only_the_higher_order_gammas():
    model = tiny()
    assert float(polynomial_penalty(model).detach()) == 0.0  # fresh: only the linear gamma is non-zero
    layer = model.harmony_layers()[0]
    with torch.no_grad():
        layer.harmony["ct"].gamma[2, 0] = 2.0
    assert float(polynomial_penalty(model).detach()) == pytest.approx(4.0)


def test_add_domain_copies_the_closest_domain():
    model = tiny()
    for layer in model.harmony_layers():
        _set_domain(layer, "ct", 9)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = model(x, "ct")
        model.add_domain("mri-flair", like="ct")
        after = model(x, "mri-flair")
    assert model.domains == ["mri-t1", "ct", "mri-flair"]
    assert torch.allclose(before, after, atol=1e-5)
    logits, _ = model.gate(model.gate.downsample(x))
    assert logits.shape == (1, 3)


def test_gate_calibration_separates_an_unseen_distribution():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    feats_a = torch.randn(40, model.gate.features, generator=g)
    feats_b = torch.randn(40, model.gate.features, generator=g) + 3.0
    model.gate.fit_calibration(torch.cat([feats_a, feats_b]), torch.tensor([0] * 40 + [1] * 40))
    near = model.gate.unfamiliar_score(torch.randn(10, model.gate.features, generator=g))
    far = model.gate.unfamiliar_score(torch.randn(10, model.gate.features, generator=g) - 6.0)
    assert near.max() < 2.0 < far.min()


def test_unfamiliar_score_leaves_out_domains_without_a_gaussian():
    """A federated domain no site has described yet (count 0, mean 0, variance 1) must not make inputs near
    zero familiar; a model with no Gaussian at all keeps the plain distance (its threshold never fires)."""
    model = tiny()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, model.gate.features, generator=g) + 3.0
    near_zero = 0.1 * torch.randn(5, model.gate.features, generator=g)
    uncalibrated = model.gate.unfamiliar_score(near_zero)
    assert uncalibrated.max() < 0.1  # the default Gaussians sit at zero
    model.gate.fit_calibration(feats, torch.zeros(40, dtype=torch.long))  # the first domain only
    assert float(model.gate.calibration[model.gate.domains[1]].count) == 0
    scores = model.gate.unfamiliar_score(near_zero)
    assert scores.min() > 5.0  # far from the one fitted domain; the unfitted one is not a refuge
    torch.testing.assert_close(scores, model.gate.familiarity_distance(near_zero)[:, 0])


def test_a_card_with_a_bad_poly_scale_is_refused_in_one_line(tmp_path):
    import json
    import shutil

    from uharmony.errors import BadModelError
    from uharmony.model.package import load_model
    from uharmony.model.registry import bundled_model_dir

    folder = tmp_path / "bad"
    shutil.copytree(bundled_model_dir("starter"), folder)
    card = json.loads((folder / "card.json").read_text())
    card["architecture"]["poly_scale"] = -1
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(BadModelError) as e:
        load_model(folder)
    assert "card.json" in str(e.value) and "poly_scale must be > 0" in str(e.value) and "\n" not in str(e.value)
