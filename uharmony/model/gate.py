"""The domain gate: which source domain does this whole image look like, and is it any of them?

A small CNN on a low-resolution copy of the whole normalised (never augmented) image gives domain
logits. Familiarity is scored separately, without negatives: a per-domain diagonal Gaussian over the
gate's style features (per-channel mean and log-std of its early activations, and its pooled
features). The score is the smallest mean squared z-distance to any domain; the threshold that
separates familiar from unfamiliar is calibrated on held-back cases and stored in the card.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def variance_floor(mean_variance: float) -> float:
    """The least variance a familiarity Gaussian gives a feature: 1e-3 of the mean variance over features, so
    a near-constant feature does not dominate the distance. Central and federated fits share it."""
    return 1e-3 * max(float(mean_variance), 1e-8)


class DomainStats(nn.Module):
    """Running per-domain feature mean/variance (buffers, so they travel in the weights file)."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        self.register_buffer("count", torch.zeros(()))


class DomainGate(nn.Module):
    def __init__(self, in_channels: int, domains: list[str], input_size=(32, 32, 32), filters=(16, 32, 64)):
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        chans = [in_channels, *filters]
        self.convs = nn.ModuleList(
            nn.Conv3d(chans[i], chans[i + 1], kernel_size=3, stride=2 if i else 1, padding=1) for i in range(len(filters))
        )
        self.features = 2 * sum(filters[:2]) + filters[-1]
        self.classifier = nn.ModuleDict({d: nn.Linear(filters[-1], 1) for d in domains})
        self.calibration = nn.ModuleDict({d: DomainStats(self.features) for d in domains})

    @property
    def domains(self) -> list[str]:
        return list(self.classifier.keys())

    @property
    def pooled_dim(self) -> int:
        """Length of the pooled features the classifier reads (the last columns of `forward`'s features)."""
        return self.classifier[self.domains[0]].in_features

    @property
    def style_dim(self) -> int:
        """Length of the style features (the first two layers' channel means and log-stds), the first
        columns of `forward`'s features; only the unfamiliar-input score reads them."""
        return self.features - self.pooled_dim

    def add_domain(self, name: str, like: str | None = None) -> None:
        head = nn.Linear(self.classifier[self.domains[0]].in_features, 1)
        stats = DomainStats(self.features)
        if like is not None:
            head.load_state_dict(self.classifier[like].state_dict())
        device = next(self.parameters()).device
        self.classifier[name] = head.to(device)
        self.calibration[name] = stats.to(device)

    def downsample(self, image: torch.Tensor) -> torch.Tensor:
        """The gate's view: the whole image resized to `input_size` (area averaging, fp32)."""
        return F.interpolate(image.float(), size=self.input_size, mode="trilinear", align_corners=False, antialias=False)

    def forward(self, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *input_size) -> (logits (B, D), style features (B, F))."""
        x, style = small, []
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.01)
            if i < 2:
                var, mean = torch.var_mean(x, dim=(2, 3, 4), unbiased=False)
                style += [mean, 0.5 * torch.log(var + 1e-6)]
        pooled = x.mean(dim=(2, 3, 4))
        logits = torch.cat([self.classifier[d](pooled) for d in self.domains], dim=1)
        return logits, torch.cat([*style, pooled], dim=1)

    # -- familiarity ------------------------------------------------------------------------
    @torch.no_grad()
    def fit_calibration(self, features: torch.Tensor, domain_index: torch.Tensor) -> None:
        """Set each domain's Gaussian from features of (un-augmented) cases of that domain."""
        for d, name in enumerate(self.domains):
            f = features[domain_index == d]
            if len(f) < 2:
                continue
            stats = self.calibration[name]
            stats.mean.copy_(f.mean(0))
            var = f.var(0, unbiased=True)
            stats.var.copy_(var.clamp_min(variance_floor(var.mean())))
            stats.count.fill_(len(f))

    @torch.no_grad()
    def familiarity_distance(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, D) mean squared z-distance to each domain's Gaussian."""
        rows = []
        for name in self.domains:
            s = self.calibration[name]
            rows.append(((features - s.mean) ** 2 / s.var).mean(dim=1))
        return torch.stack(rows, dim=1)

    @torch.no_grad()
    def unfamiliar_score(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) the distance to the nearest domain; large means unlike every training domain.

        Domains without a fitted Gaussian (count 0: a federated domain no site has described yet) are
        left out, unless none has one (an uncalibrated model, whose card's threshold never fires).
        """
        dist = self.familiarity_distance(features)
        fitted = torch.stack([self.calibration[d].count > 0 for d in self.domains]).to(dist.device)
        if bool(fitted.any()):
            dist = dist.masked_fill(~fitted[None], float("inf"))
        return dist.min(dim=1).values
