"""GIN (global intensity non-linear) augmentation and IPA, batched on the training device.

GIN (Ouyang et al.) passes each image through a freshly drawn, shallow random conv net and mixes
the result with the input: ``out = alpha * GIN(x) + (1 - alpha) * x``, rescaled to the input's
Frobenius norm. The nets are tiny (kernels of 1 or 3 voxels, 2 intermediate channels), so they
change contrast and texture but not where edges are. Every sample gets its own net in one grouped
``conv3d`` call, so the whole batch is augmented on the GPU with no Python loop over samples.

IPA (interventional pseudo-correlation augmentation) blends two GIN views of the same image by a
smooth random mask (and the complementary mask), giving two views whose predictions a KL
consistency loss ties together (``consistency_kl``).

Everything here runs under ``torch.no_grad`` in fp32 with autocast disabled: the random nets are not
parameters, nothing is learnt through them, and fp16 would overflow in a 4-layer N(0, 1) net.
Behaviour follows the reference code (cheng-01037/Causality-Medical-Image-Domain-Generalization,
MIT); the implementation is ours. Differences from it, on purpose:

* the kernel size (1 or 3) is drawn per layer *and per sample* (1x1x1 kernels are embedded at the
  centre of a 3x3x3 one when a batch mixes both), so samples really get independent nets;
* the 3x3x3 convolutions pad by replication, not zeros: zero padding would paint a false edge along
  every patch border, and GIN must change contrast, not geometry;
* samples are augmented with probability ``p`` (untouched ones are returned bit-identical), so each
  domain's U-Harmony parameters still see their own contrast;
* IPA's two blended views are rescaled to the input's Frobenius norm as GIN's outputs are.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["GIN", "IPA", "consistency_kl", "gin_net_apply", "sample_gin_nets", "smooth_blend_mask"]

NEGATIVE_SLOPE = 0.01


def _no_autocast(device: torch.device):
    """Disable autocast for ``device`` (fp32 inside even when the caller runs under AMP)."""
    kind = device.type
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(kind):
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device (CPU by default) and move: the draws are a few hundred numbers,
    # and the same seed then gives the same nets whatever device trains.
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)


def _rand(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)


def sample_gin_nets(
    batch: int,
    channels: int,
    interm_channels: int = 2,
    layers: int = 4,
    *,
    kernel_sizes: Sequence[int] = (1, 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Draw ``batch`` random GIN nets: per layer a weight ``(B, out, in, k, k, k)`` and a shift ``(B, out)``.

    Channels go ``channels -> interm -> ... -> interm -> channels``; weights and shifts are N(0, 1);
    each sample draws its own kernel size per layer from ``kernel_sizes``. Where a batch mixes sizes,
    the smaller kernels sit at the centre of the largest one (zeros around), which is the same map.
    """
    if layers < 1:
        raise ValueError("GIN needs at least one layer")
    if batch < 1 or channels < 1 or interm_channels < 1:
        raise ValueError("batch, channels and interm_channels must be positive")
    sizes = sorted({int(k) for k in kernel_sizes})
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel sizes must be odd and positive, got {list(kernel_sizes)}")
    device = torch.device(device)
    chans = [channels] + [interm_channels] * (layers - 1) + [channels]
    kmax = sizes[-1]
    weights, biases = [], []
    for cin, cout in itertools.pairwise(chans):
        # Always draw the full-size kernel and the size choice, so the random stream (and thus a
        # seeded run) does not depend on which sizes happened to come up.
        w = _randn((batch, cout, cin, kmax, kmax, kmax), generator, device)
        b = _randn((batch, cout), generator, device)
        # The size choice stays on the CPU: it decides shapes, so reading it must not sync a GPU.
        pick = (_rand((batch,), generator, torch.device("cpu")) * len(sizes)).long().clamp_max(len(sizes) - 1)
        k_per_sample = torch.tensor(sizes)[pick]
        k_used = int(k_per_sample.max())
        if k_used < kmax:
            lo = (kmax - k_used) // 2
            w = w[..., lo:lo + k_used, lo:lo + k_used, lo:lo + k_used]
        if int(k_per_sample.min()) < k_used:
            # Zero everything outside each sample's own kernel (centred in the k_used cube).
            r = (torch.arange(k_used) - k_used // 2).abs()
            dist = torch.maximum(torch.maximum(r[:, None, None], r[None, :, None]), r[None, None, :])
            keep = dist[None] <= (k_per_sample // 2)[:, None, None, None]  # (B, k, k, k)
            w = w * keep[:, None, None].to(device=device, dtype=w.dtype)
        weights.append(w.contiguous())
        biases.append(b)
    return weights, biases


def gin_net_apply(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], negative_slope: float = NEGATIVE_SLOPE
) -> torch.Tensor:
    """Run per-sample random nets on ``x`` (B, C, D, H, W) with one grouped conv3d per layer.

    ``weights[l]``: (B, out, in, k, k, k); ``biases[l]``: (B, out). Leaky ReLU between layers, not
    after the last. Replicate padding keeps the spatial size without inventing border edges.
    """
    if x.ndim != 5:
        raise ValueError(f"GIN expects (B, C, D, H, W), got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    h = x.reshape(1, b * c, *spatial)
    last = len(weights) - 1
    for i, (w, bias) in enumerate(zip(weights, biases)):
        if w.shape[0] != b or w.shape[2] * b != h.shape[1]:
            raise ValueError(f"GIN layer {i}: weight {tuple(w.shape)} does not fit a batch of {b} x {h.shape[1] // b} channels")
        cout, cin, k = w.shape[1], w.shape[2], w.shape[-1]
        if k > 1:
            h = F.pad(h, (k // 2,) * 6, mode="replicate")
        h = F.conv3d(h, w.reshape(b * cout, cin, k, k, k), bias.reshape(b * cout), groups=b)
        if i < last:
            h = F.leaky_relu(h, negative_slope)
    return h.reshape(b, -1, *spatial)


def _match_frobenius(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Rescale each sample of ``y`` to the Frobenius norm of the same sample of ``ref`` (all channels)."""
    n_ref = torch.linalg.vector_norm(ref.flatten(1), dim=1)
    n_y = torch.linalg.vector_norm(y.flatten(1), dim=1)
    ok = n_y > 0
    scale = torch.where(ok, n_ref / torch.where(ok, n_y, torch.ones_like(n_y)), torch.zeros_like(n_y))
    out = y * scale.view(-1, *([1] * (y.ndim - 1)))
    # A net that maps a sample to exactly zero (measure zero, but possible) leaves it unchanged.
    return torch.where(ok.view(-1, *([1] * (y.ndim - 1))), out, ref)


class GIN:
    """GIN augmentation: ``gin(x)`` returns a new fp32 tensor shaped like ``x`` (B, C, D, H, W).

    Each sample is augmented with probability ``p`` by its own random net (fresh on every call) and
    ``alpha ~ U(alpha_range)``; the others come back unchanged (bit-identical, as fp32). A fixed
    ``generator`` makes it reproducible; without one, torch's global RNG is used.
    """

    def __init__(
        self,
        p: float = 0.5,
        interm_channels: int = 2,
        layers: int = 4,
        alpha_range: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None,
        kernel_sizes: Sequence[int] = (1, 3),
    ):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        lo, hi = (float(a) for a in alpha_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"alpha_range must satisfy 0 <= low <= high <= 1, got {alpha_range}")
        if layers < 1 or interm_channels < 1:
            raise ValueError("layers and interm_channels must be positive")
        self.p = float(p)
        self.interm_channels = int(interm_channels)
        self.layers = int(layers)
        self.alpha_range = (lo, hi)
        self.generator = generator
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)

    def __repr__(self) -> str:
        return (f"GIN(p={self.p}, interm_channels={self.interm_channels}, layers={self.layers}, "
                f"alpha_range={self.alpha_range}, kernel_sizes={self.kernel_sizes})")

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Augment every sample of fp32 ``x`` (no probability, no copy of untouched samples)."""
        nb = x.shape[0]
        weights, biases = sample_gin_nets(nb, x.shape[1], self.interm_channels, self.layers,
                                          kernel_sizes=self.kernel_sizes, generator=self.generator, device=x.device)
        lo, hi = self.alpha_range
        alpha = lo + (hi - lo) * _rand((nb,), self.generator, x.device)
        alpha = alpha.view(-1, 1, 1, 1, 1)
        mixed = alpha * gin_net_apply(x, weights, biases) + (1.0 - alpha) * x
        return _match_frobenius(mixed, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        with torch.no_grad(), _no_autocast(x.device):
            xf = x.detach().to(torch.float32)
            out = xf.clone()  # never alias the caller's tensor
            # Drawn on the CPU so that choosing the samples never waits for the GPU.
            chosen = _rand((x.shape[0],), self.generator, torch.device("cpu")) < self.p
            idx = chosen.nonzero().flatten().to(x.device)
            if idx.numel():
                out[idx] = self.mix(xf[idx])
            return out


class IPA:
    """GIN + IPA: two views of each sample, ``a = m*g1 + (1-m)*g2`` and ``b = (1-m)*g1 + m*g2``.

    ``g1``, ``g2`` are two independent GIN outputs, ``m`` a smooth random mask in [0, 1] (a coarse
    N(0, 1) grid every ``control_spacing`` voxels, trilinearly upsampled, min-max scaled per sample).
    With probability ``1 - p`` a sample is left as it is in both views. Feed both views through the
    network and add ``consistency_kl`` of the two predictions to the segmentation loss.
    """

    def __init__(
        self,
        p: float = 0.5,
        interm_channels: int = 2,
        layers: int = 4,
        alpha_range: tuple[float, float] = (0.0, 1.0),
        control_spacing: int = 16,
        generator: torch.Generator | None = None,
        kernel_sizes: Sequence[int] = (1, 3),
    ):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if control_spacing < 1:
            raise ValueError("control_spacing must be >= 1 voxel")
        self.p = float(p)
        self.control_spacing = int(control_spacing)
        self.generator = generator
        self.gin = GIN(p=1.0, interm_channels=interm_channels, layers=layers, alpha_range=alpha_range, generator=generator,
                       kernel_sizes=kernel_sizes)

    def __repr__(self) -> str:
        return f"IPA(p={self.p}, control_spacing={self.control_spacing}, gin={self.gin!r})"

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x)
        with torch.no_grad(), _no_autocast(x.device):
            xf = x.detach().to(torch.float32)
            a, b = xf.clone(), xf.clone()
            # Drawn on the CPU so that choosing the samples never waits for the GPU.
            chosen = _rand((x.shape[0],), self.generator, torch.device("cpu")) < self.p
            idx = chosen.nonzero().flatten().to(x.device)
            if idx.numel():
                xs = xf[idx]
                g1, g2 = self.gin.mix(xs), self.gin.mix(xs)
                m = smooth_blend_mask(xs.shape, self.control_spacing, generator=self.generator, device=x.device)
                a[idx] = _match_frobenius(m * g1 + (1 - m) * g2, xs)
                b[idx] = _match_frobenius((1 - m) * g1 + m * g2, xs)
            return a, b


def smooth_blend_mask(
    shape: Sequence[int], control_spacing: int = 16, *, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A smooth random field in [0, 1] of shape (B, 1, D, H, W) for ``shape`` (B, C, D, H, W).

    Random N(0, 1) values on a coarse grid (one point every ``control_spacing`` voxels, at least 2
    per axis) upsampled trilinearly, then min-max scaled per sample so every mask spans [0, 1].
    """
    nb, spatial = int(shape[0]), [int(s) for s in shape[2:]]
    grid = [max(2, math.ceil(s / control_spacing) + 1) for s in spatial]
    field = _randn((nb, 1, *grid), generator, torch.device(device))
    field = F.interpolate(field, size=spatial, mode="trilinear", align_corners=True)
    flat = field.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1, 1)
    return (field - lo) / (hi - lo).clamp_min(1e-12)


def consistency_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between the softmaxes (over dim 1) of two predictions, summed over classes and
    averaged over batch and voxels: ``0.5 * (KL(pa || pb) + KL(pb || pa))``. Computed in fp32."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    la = F.log_softmax(logits_a.float(), dim=1)
    lb = F.log_softmax(logits_b.float(), dim=1)
    # KL(a||b) + KL(b||a) = sum_c (pa - pb)(log pa - log pb): one pass, exactly symmetric.
    return 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(dim=1).mean()


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"GIN/IPA expect a (B, C, D, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"GIN/IPA expect a floating-point image, got {x.dtype}")
