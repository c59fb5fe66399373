"""The U-Harmony normalisation layer (DESIGN.md, "Method").

Stage 1 (harmonise) standardises each sample and channel over all voxels. Stage 2 (restore) applies a
per-domain polynomial affine ``y = g1*x + s * sum_k g_k * p_k(clamp(x)) + b`` (s: `poly_scale`) with centred Hermite
polynomials, mixing the domains by per-sample routing weights. Both stages run in fp32 even under
AMP: ``x**3`` of an unclamped patch overflows fp16.

Domain parameters live under ``harmony.<domain>.{gamma,beta}`` so that a state dict is keyed by
domain names, never by an index; adding a domain adds keys and changes no existing one.
"""

from __future__ import annotations

import torch
from torch import nn


def hermite_terms(x: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """Probabilists' Hermite polynomials He_2..He_degree of x (centred for standard-normal x)."""
    terms: list[torch.Tensor] = []
    prev, cur = torch.ones_like(x), x  # He_0, He_1
    for n in range(1, degree):
        prev, cur = cur, x * cur - n * prev  # He_{n+1} = x He_n - n He_{n-1}
        terms.append(cur)
    return terms


class DomainAffine(nn.Module):
    """One domain's stage-2 parameters for C channels: gamma (degree, C) and beta (C)."""

    def __init__(self, channels: int, degree: int):
        super().__init__()
        gamma = torch.zeros(degree, channels)
        gamma[0] = 1.0  # identity on the linear term: a fresh layer equals InstanceNorm(affine=True)
        self.gamma = nn.Parameter(gamma)
        self.beta = nn.Parameter(torch.zeros(channels))


class HarmonyNorm(nn.Module):
    """Drop-in replacement of ``InstanceNorm3d(C, affine=True)`` with per-domain restoration.

    ``poly_scale`` multiplies the Hermite terms: the polynomial gammas then act at that fraction of the
    linear one's size. Adam moves every parameter by about the learning rate per step whatever its
    gradient, and He_3 reaches 52 at the clamp, so unscaled polynomial gammas take steps far larger in
    effect than the linear gamma (measured: they cost CT's Dice; docs/benchmarks.md).

    Set the routing with `set_routing` (a (B, D) weight tensor over `domains`, or None to use the
    first domain) before calling forward; `UHarmonyNet` does that for every layer at once.
    """

    def __init__(self, channels: int, domains: list[str], degree: int = 3, clamp: float = 4.0, eps: float = 1e-5,
                 poly_scale: float = 1.0):
        super().__init__()
        if degree < 1:
            raise ValueError("degree must be >= 1")
        if not poly_scale > 0:
            raise ValueError("poly_scale must be > 0")
        self.channels, self.degree, self.clamp, self.eps = channels, degree, float(clamp), eps
        self.poly_scale = float(poly_scale)
        self.harmony = nn.ModuleDict({name: DomainAffine(channels, degree) for name in domains})
        self._routing: torch.Tensor | None = None

    @property
    def domains(self) -> list[str]:
        return list(self.harmony.keys())

    def add_domain(self, name: str, like: str | None = None) -> None:
        """Add a domain, initialised as a copy of `like` (or as identity)."""
        new = DomainAffine(self.channels, self.degree).to(next(self.parameters()).device)
        if like is not None:
            new.load_state_dict(self.harmony[like].state_dict())
        self.harmony[name] = new

    def set_routing(self, weights: torch.Tensor | None) -> None:
        self._routing = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            dims = tuple(range(2, xf.ndim))
            var, mean = torch.var_mean(xf, dim=dims, keepdim=True, unbiased=False)
            xhat = (xf - mean) * torch.rsqrt(var + self.eps)  # stage 1
            gamma, beta = self._mixed_parameters(xf.shape[0], xf.device)
            shape = (xf.shape[0], self.channels) + (1,) * len(dims)
            y = gamma[:, 0].view(shape) * xhat + beta.view(shape)  # stage 2, linear part
            if self.degree > 1:
                xc = xhat.clamp(-self.clamp, self.clamp)
                for k, term in enumerate(hermite_terms(xc, self.degree), start=1):
                    y = y + (self.poly_scale * gamma[:, k]).view(shape) * term
        return y.to(in_dtype)

    def _mixed_parameters(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (B, degree, C) gamma and (B, C) beta mixed by the routing weights.

        Only domains with a non-zero weight enter the graph, so a one-hot routing leaves the other
        domains' parameters without any gradient (not merely a zero one).
        """
        names = self.domains
        w = self._routing
        if w is None:
            w = torch.zeros(batch, len(names), device=device)
            w[:, 0] = 1.0
        if w.shape != (batch, len(names)):
            raise ValueError(f"routing weights have shape {tuple(w.shape)}, expected {(batch, len(names))}")
        w = w.to(device=device, dtype=torch.float32)
        gamma = beta = None
        active = (w != 0).any(dim=0).tolist()
        for d, name in enumerate(names):
            if not active[d]:
                continue
            p = self.harmony[name]
            g = w[:, d, None, None] * p.gamma.float()[None]
            b = w[:, d, None] * p.beta.float()[None]
            gamma = g if gamma is None else gamma + g
            beta = b if beta is None else beta + b
        if gamma is None:
            raise ValueError("routing weights are all zero")
        return gamma, beta
