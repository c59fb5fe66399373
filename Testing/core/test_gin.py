"""The GIN contract of DESIGN.md ("GIN augmentation"), plus IPA and its consistency loss."""

from __future__ import annotations

import pytest
import torch

from uharmony.augment.gin import (
    GIN,
    IPA,
    consistency_kl,
    gin_net_apply,
    sample_gin_nets,
    smooth_blend_mask,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(b=2, c=1, shape=(12, 14, 10), seed=0) -> torch.Tensor:
    return torch.randn((b, c, *shape), generator=_gen(seed)) * 3 + 1


def _norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.double().flatten(1), dim=1)


@pytest.mark.parametrize("channels", [1, 2])
def test_shape_dtype_and_frobenius_norm_per_sample(channels):
    x = _image(b=3, c=channels)
    x[1] *= 40  # samples of very different scale keep their own norm
    out = GIN(p=1.0, generator=_gen())(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(_norms(out), _norms(x), rtol=1e-4, atol=0)
    assert not torch.allclose(out, x)


def test_channels_keep_per_sample_norm_with_wider_nets():
    x = _image(b=2, c=2)
    out = GIN(p=1.0, interm_channels=5, layers=3, generator=_gen(3))(x)
    assert out.shape == x.shape
    torch.testing.assert_close(_norms(out), _norms(x), rtol=1e-4, atol=0)


def test_different_net_per_sample_and_per_call():
    one = _image(b=1)
    x = torch.cat([one, one])  # the same image twice in a batch
    gin = GIN(p=1.0, generator=_gen(1))
    first = gin(x)
    assert not torch.allclose(first[0], first[1]), "both samples got the same net"
    second = gin(x)
    assert not torch.allclose(first, second), "two calls drew the same nets"


def test_alpha_zero_is_identity():
    x = _image(b=3, c=2)
    out = GIN(p=1.0, alpha_range=(0.0, 0.0), generator=_gen())(x)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


def test_alpha_one_is_pure_gin_output():
    """out = alpha*GIN(x) + (1-alpha)*x: at alpha=1 the output is the net's output, norm-matched."""
    x = _image(b=2)
    out = GIN(p=1.0, alpha_range=(1.0, 1.0), generator=_gen(5))(x)
    # Replay the same random stream: the probability draw, then the nets (alpha is fixed at 1).
    g = _gen(5)
    torch.rand(2, generator=g)
    weights, biases = sample_gin_nets(2, 1, 2, 4, generator=g)
    raw = gin_net_apply(x, weights, biases)
    expected = raw * (_norms(x) / _norms(raw)).float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_probability_zero_and_one():
    x = _image(b=4)
    out0 = GIN(p=0.0, generator=_gen())(x)
    assert torch.equal(out0, x) and out0.data_ptr() != x.data_ptr()  # a copy, bit-identical
    out1 = GIN(p=1.0, generator=_gen())(x)
    assert all(not torch.allclose(out1[i], x[i]) for i in range(4))


def test_untouched_samples_are_bit_identical():
    x = _image(b=16, shape=(6, 6, 6))
    out = GIN(p=0.5, generator=_gen(2))(x)
    same = [torch.equal(out[i], x[i]) for i in range(16)]
    assert 0 < sum(same) < 16  # some kept, some changed, at p=0.5 with this seed
    for i in range(16):
        if not same[i]:
            assert not torch.allclose(out[i], x[i])


def test_fixed_generator_is_reproducible():
    x = _image(b=3, c=2)
    a = GIN(p=0.7, generator=_gen(11))(x)
    b = GIN(p=0.7, generator=_gen(11))(x)
    assert torch.equal(a, b)
    c = GIN(p=0.7, generator=_gen(12))(x)
    assert not torch.equal(a, c)


def test_both_kernel_sizes_occur_and_mixed_batches_match_per_sample_nets():
    seen = set()
    g = _gen(4)
    for _ in range(8):
        weights, _ = sample_gin_nets(4, 1, 2, 4, generator=g)
        for w in weights:
            for s in range(4):
                nz = w[s].abs().sum(dim=(0, 1)) > 0  # (k, k, k) footprint of this sample's kernel
                seen.add(int(nz.sum() ** (1 / 3) + 0.5))
    assert seen == {1, 3}
    # A mixed batch gives each sample what its own net gives it alone.
    weights, biases = sample_gin_nets(3, 1, 2, 4, generator=_gen(9))
    x = _image(b=3)
    together = gin_net_apply(x, weights, biases)
    for s in range(3):
        alone = gin_net_apply(x[s:s + 1], [w[s:s + 1] for w in weights], [b[s:s + 1] for b in biases])
        torch.testing.assert_close(together[s:s + 1], alone, rtol=1e-4, atol=1e-3)


def test_fp32_output_for_bf16_input_under_autocast():
    x = _image(b=2).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GIN(p=1.0, generator=_gen())(x)
        a, b = IPA(p=1.0, generator=_gen())(x)
    assert out.dtype == a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(_norms(out), _norms(x.float()), rtol=1e-4, atol=0)


def test_no_gradient_into_nets_or_input():
    x = _image(b=2).requires_grad_(True)
    out = GIN(p=1.0, generator=_gen())(x)
    assert out.grad_fn is None and not out.requires_grad
    a, b = IPA(p=1.0, generator=_gen())(x)
    assert a.grad_fn is None and b.grad_fn is None


def test_edges_stay_where_the_tissues_meet():
    """Two tissues split at x = 12: GIN changes their contrast, never where the edge is."""
    size, edge, reach = 24, 12, 4  # 4 layers of kernels <= 3 see at most 4 voxels away
    x = torch.full((1, 1, size, size, size), 1.0)
    x[:, :, edge:] = 3.0
    contrasts = []
    for seed in range(12):
        out = GIN(p=1.0, generator=_gen(seed))(x)[0, 0]
        scale = out.abs().max()
        # No structure across the other axes (replicate padding: no false edges at the borders).
        assert (out - out[:, :1, :1]).abs().max() <= 1e-5 * scale
        grad = (out[1:] - out[:-1]).abs()[:, size // 2, size // 2]  # |d/dx| between x=i and x=i+1
        band = torch.zeros(size - 1, dtype=torch.bool)
        band[edge - reach:edge + reach] = True
        assert grad[~band].max() <= 1e-5 * scale, f"seed {seed}: intensity changes away from the edge"
        assert band[int(grad.argmax())], f"seed {seed}: the strongest gradient is not on the edge"
        contrasts.append(float((out[-1, 0, 0] - out[0, 0, 0]) / scale))
    # The contrast itself does change (here: its size or its sign), which is the point of GIN.
    base = float((x[0, 0, -1, 0, 0] - x[0, 0, 0, 0, 0]) / x.abs().max())
    assert max(abs(c - base) for c in contrasts) > 0.1


def test_rejects_non_3d_and_bad_arguments():
    with pytest.raises(ValueError):
        GIN()(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError):
        GIN()(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        GIN(p=1.5)
    with pytest.raises(ValueError):
        GIN(alpha_range=(0.5, 0.2))


def test_zero_image_stays_zero():
    x = torch.zeros(2, 1, 6, 6, 6)
    out = GIN(p=1.0, generator=_gen())(x)
    assert torch.equal(out, x)


# -------------------------------------------------------------------------------------------- IPA


def test_ipa_views_differ_keep_norm_and_respect_p():
    x = _image(b=2, c=2, shape=(16, 16, 16))
    a, b = IPA(p=1.0, control_spacing=8, generator=_gen(3))(x)
    assert a.shape == b.shape == x.shape
    assert not torch.allclose(a, b)
    torch.testing.assert_close(_norms(a), _norms(x), rtol=1e-4, atol=0)
    torch.testing.assert_close(_norms(b), _norms(x), rtol=1e-4, atol=0)
    a0, b0 = IPA(p=0.0, generator=_gen())(x)
    assert torch.equal(a0, x) and torch.equal(b0, x)
    r1 = IPA(p=0.6, generator=_gen(8))(x)
    r2 = IPA(p=0.6, generator=_gen(8))(x)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])


def test_blend_mask_is_smooth_and_spans_unit_range():
    m = smooth_blend_mask((3, 1, 32, 32, 32), control_spacing=16, generator=_gen(1))
    assert m.shape == (3, 1, 32, 32, 32)
    flat = m.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(3))
    torch.testing.assert_close(flat.max(1).values, torch.ones(3))
    # Smooth: neighbouring voxels differ by at most one control cell's range spread over ~16 voxels.
    step = max(float((m[..., 1:, :, :] - m[..., :-1, :, :]).abs().max()),
               float((m[..., 1:] - m[..., :-1]).abs().max()))
    assert step < 0.25


def test_consistency_kl():
    g = _gen(0)
    la = torch.randn(2, 4, 5, 5, 5, generator=g, requires_grad=True)
    lb = torch.randn(2, 4, 5, 5, 5, generator=g)
    assert float(consistency_kl(la, la.detach()).detach()) == pytest.approx(0.0, abs=1e-7)
    assert float(consistency_kl(la, la.detach() + 7.0).detach()) == pytest.approx(0.0, abs=1e-6)  # softmax-invariant
    kl = consistency_kl(la, lb)
    assert kl > 0
    torch.testing.assert_close(kl, consistency_kl(lb, la))
    pa, pb = la.softmax(1), lb.softmax(1)
    manual = 0.5 * ((pa * (pa / pb).log()).sum(1) + (pb * (pb / pa).log()).sum(1)).mean()
    torch.testing.assert_close(kl, manual, rtol=1e-5, atol=1e-6)
    kl.backward()
    assert torch.isfinite(la.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert consistency_kl(la.bfloat16(), lb.bfloat16()).dtype == torch.float32


def test_kernel_one_gin_is_a_voxelwise_intensity_map():
    """With kernel_sizes (1,) every sample's net maps equal intensities to equal intensities (tissue
    contrast is remapped, nothing is blurred or sharpened); with 3x3x3 kernels voxels of one tissue differ
    near another tissue."""
    tissues = torch.zeros(4, 1, 12, 12, 12)
    tissues[:, :, 3:9, 3:9, 3:9] = 1.0
    tissues[:, :, 5:7, 5:7, 5:7] = 2.0
    x = tissues * 1.5 - 0.7  # three intensities
    out = GIN(p=1.0, generator=_gen(2), kernel_sizes=(1,))(x)
    for s in range(4):
        for t in range(3):
            values = out[s, 0][tissues[s, 0] == t]
            assert float(values.max() - values.min()) < 1e-5, (s, t)
    wide = GIN(p=1.0, generator=_gen(2), kernel_sizes=(3,))(x)
    spread = [float(wide[s, 0][tissues[s, 0] == 1].max() - wide[s, 0][tissues[s, 0] == 1].min()) for s in range(4)]
    assert max(spread) > 1e-2
    assert IPA(p=1.0, kernel_sizes=(1,)).gin.kernel_sizes == (1,)
