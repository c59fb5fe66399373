"""UHarmonyNet: a MONAI backbone whose first L levels use U-Harmony normalisation, plus a domain gate
and one 1x1x1 output head per domain over the union label space.

The backbone is MONAI's DynUNet (the default of DESIGN.md). Levels are counted from the
full-resolution end: level 0 is DynUNet's input block and its last up-sampling block, level 1 the
first down-sampling block and the up-sampling block before the last, and so on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from monai.networks.nets import DynUNet
from torch import nn

from uharmony.model.gate import DomainGate
from uharmony.model.harmony import HarmonyNorm


@dataclass
class ArchConfig:
    """Everything needed to rebuild the network; stored in the card's ``architecture``."""

    backbone: str = "DynUNet"
    in_channels: int = 1
    num_classes: int = 5
    domains: list[str] = field(default_factory=lambda: ["default"])
    filters: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    kernel_size: int = 3
    res_block: bool = False
    harmony_levels: int = 2  # L: levels (encoder + matching decoder) with U-Harmony normalisation
    poly_degree: int = 3  # K: linear term plus Hermite terms He_2..He_K
    clamp: float = 4.0
    poly_scale: float = 1.0  # Hermite terms x this (1 in cards that predate it)
    gate_input_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    gate_filters: list[int] = field(default_factory=lambda: [16, 32, 64])

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _harmony_blocks(net: DynUNet, levels: int) -> list[nn.Module]:
    """The encoder blocks of the first `levels` levels and their matching decoder blocks."""
    encoder = [net.input_block, *net.downsamples, net.bottleneck]
    decoder = list(net.upsamples)  # decoder[i] works at the resolution of encoder level len-1-i
    blocks = []
    for level in range(min(levels, len(encoder))):
        blocks.append(encoder[level])
        j = len(decoder) - 1 - level
        if j >= 0:
            blocks.append(decoder[j])
    return blocks


class UHarmonyNet(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        if config.backbone != "DynUNet":
            raise ValueError(f"backbone {config.backbone!r} is not supported (DynUNet is)")
        if not config.domains or len(set(config.domains)) != len(config.domains):
            raise ValueError("domains must be a non-empty list of unique names")
        self.config = config
        n = len(config.strides)
        backbone = DynUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            kernel_size=[config.kernel_size] * n,
            strides=config.strides,
            upsample_kernel_size=config.strides[1:],
            filters=config.filters,
            norm_name=("instance", {"affine": True}),
            res_block=config.res_block,
        )
        for block in _harmony_blocks(backbone, config.harmony_levels):
            for name, module in list(block.named_modules()):
                if isinstance(module, nn.InstanceNorm3d):
                    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                    setattr(parent, name.rpartition(".")[2], HarmonyNorm(
                        module.num_features, config.domains, config.poly_degree, config.clamp, module.eps,
                        config.poly_scale))
        backbone.output_block = nn.Identity()  # the per-domain heads below replace it
        self.backbone = backbone
        self.heads = nn.ModuleDict({d: nn.Conv3d(config.filters[0], config.num_classes, 1) for d in config.domains})
        self.gate = DomainGate(config.in_channels, config.domains, config.gate_input_size, config.gate_filters)

    @property
    def domains(self) -> list[str]:
        return list(self.heads.keys())

    def harmony_layers(self) -> list[HarmonyNorm]:
        return [m for m in self.modules() if isinstance(m, HarmonyNorm)]

    def routing_from(self, domain: str | int | torch.Tensor, batch: int, device=None) -> torch.Tensor:
        """One-hot routing weights (B, D) for a domain name or index, or pass weights through."""
        if isinstance(domain, torch.Tensor):
            return domain
        index = self.domains.index(domain) if isinstance(domain, str) else int(domain)
        w = torch.zeros(batch, len(self.domains), device=device)
        w[:, index] = 1.0
        return w

    def forward(self, x: torch.Tensor, routing: torch.Tensor | str | int) -> torch.Tensor:
        """Segmentation logits (B, num_classes, ...) for the given routing (B, D) or domain."""
        w = self.routing_from(routing, x.shape[0], x.device).to(x.device)
        for layer in self.harmony_layers():
            layer.set_routing(w)
        try:
            features = self.backbone(x)
        finally:
            for layer in self.harmony_layers():
                layer.set_routing(None)
        out = None
        for d, name in enumerate(self.domains):
            wd = w[:, d]
            if not bool((wd != 0).any()):
                continue  # unrouted heads stay out of the graph
            term = self.heads[name](features) * wd.view(-1, 1, *([1] * (features.ndim - 2))).to(features.dtype)
            out = term if out is None else out + term
        return out

    def add_domain(self, name: str, like: str | None = None) -> None:
        """A new domain: stage-2 parameters, head and gate output copied from `like`."""
        if name in self.domains:
            raise ValueError(f"domain {name!r} exists")
        for layer in self.harmony_layers():
            layer.add_domain(name, like)
        head = nn.Conv3d(self.config.filters[0], self.config.num_classes, 1).to(next(self.parameters()).device)
        if like is not None:
            head.load_state_dict(self.heads[like].state_dict())
        self.heads[name] = head
        self.gate.add_domain(name, like)
        self.config.domains.append(name)

    def add_classes(self, n: int, *, init_std: float = 1e-3, bias_offset: float = 4.0,
                    generator: torch.Generator | None = None) -> None:
        """Append `n` output channels to every domain's head; existing channels are unchanged.

        New weights are N(0, init_std), the same in every head; new biases start `bias_offset` below the head's smallest
        existing bias, so the new classes take little probability until they are trained and the
        old classes' predictions barely move.
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        old = self.config.num_classes
        first = next(iter(self.heads.values()))
        # One draw shared by every head, so a domain that is a copy of another stays an exact copy.
        fresh = torch.randn((n, *first.weight.shape[1:]), generator=generator, dtype=torch.float32) * init_std
        for name, head in list(self.heads.items()):
            new = nn.Conv3d(head.in_channels, old + n, 1).to(head.weight.device, head.weight.dtype)
            with torch.no_grad():
                new.weight[:old] = head.weight
                new.bias[:old] = head.bias
                new.weight[old:] = fresh.to(new.weight)
                new.bias[old:] = head.bias.min() - bias_offset
            self.heads[name] = new
        self.config.num_classes = old + n


def polynomial_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squares of every domain's polynomial gammas (k >= 2): the weight decay on them."""
    total = None
    for layer in model.modules():
        if isinstance(layer, HarmonyNorm):
            for p in layer.harmony.values():
                s = (p.gamma[1:] ** 2).sum()
                total = s if total is None else total + s
    return total if total is not None else torch.zeros(())
