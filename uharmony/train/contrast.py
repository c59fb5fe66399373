"""A contrast encoder for the federated domain gate, pretrained before any site joins.

A federation's negative-free gate (docs/federation.md) routes by linear discriminant analysis on the
gate's pooled features, with its convolutions fixed. Random (seeded, untrained) convolutions describe
contrast only by chance: on the benchmark they routed 18 of 27 validation cases right. Here the
convolutions learn, on synthetic heads (`uharmony.data.heads`) rendered in *random* contrasts (every
tissue's intensity drawn independently, any order, bone sometimes as bright as in CT), to regress the
image's contrast description: each channel's mean normalised intensity in CSF, grey matter, white
matter, skull, scalp, fat and marrow. No site's data or style is used: the coordinator trains it
alone, then the gate's features say "which tissue is bright" for any modality.

The result depends only on the gate's shape and the pretraining settings, not on the federation's
seed, so it is cached (`cache_root().parent / "contrast-encoder"`) and reused by every federation with
that gate shape; the file is safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uharmony.data.io import atomic_output
from uharmony.model.gate import DomainGate

__all__ = ["contrast_views", "encoder_file", "ensure_encoder", "load_encoder", "pretrain_gate_features",
           "reference_features"]

FORMAT = 1  # part of the cache key: change it when the data or the objective change
RENDERS_PER_HEAD = 3
SPACING_MM = 4.0  # coarse: the gate sees a 24-32^3 view of the whole head anyway
SEED_BASE = 900000  # anatomy seeds far from every training, benchmark and test range
REFERENCE_SEED_BASE = 990000  # the reference views' anatomy: never pretrained on
REFERENCE_VIEWS = 96
# Encoders shipped in the package (`python -m uharmony.train.contrast` rebuilds the default gate's): a
# first `uharmony fed serve` with that gate then starts at once instead of pretraining for an hour on a CPU.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "contrast-encoder"


def _described():
    from uharmony.data import heads

    return (heads.CSF, heads.GREY, heads.WHITE, heads.SKULL, heads.SCALP, heads.FAT, heads.MARROW)


def contrast_views(n_views: int, input_size, channels: int = 1, *, progress: Callable[[int, int], None] | None = None,
                   seed_base: int = SEED_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_views`` gate views (N, C, *input_size) of random-contrast heads and their descriptions (N, 7 C).

    Each head is rendered RENDERS_PER_HEAD times (each channel its own random contrast), normalised as
    every input is (`normalize_intensity`), resized like the gate's view. A description is each
    channel's mean normalised intensity per described tissue; NaN where the tissue is absent (a
    skull-stripped render) or has under 5 voxels.
    """
    from uharmony.data import heads
    from uharmony.data.preprocess import normalize_intensity

    atlas = heads.build_atlas()
    described = _described()
    views, desc = [], []
    n_heads = math.ceil(n_views / RENDERS_PER_HEAD)
    for h in range(n_heads):
        seed = seed_base + h
        head = heads.make_head(seed, atlas=atlas, spacing=SPACING_MM)
        tissue = torch.from_numpy(head.tissue.astype(np.int64))
        masks = [(tissue == c) for c in described]
        for k in range(RENDERS_PER_HEAD):
            if len(views) == n_views:
                break
            chans, d = [], []
            for c in range(channels):
                img, _ = heads.render(head, heads.RANDOM_CONTRAST, (seed * RENDERS_PER_HEAD + k) * channels + c,
                                      spacing=SPACING_MM)
                chans.append(torch.from_numpy(img))
            x = normalize_intensity(torch.stack(chans))
            for c in range(channels):
                d += [float(x[c][m].mean()) if int(m.sum()) >= 5 else math.nan for m in masks]
            views.append(F.interpolate(x[None], size=tuple(input_size), mode="trilinear", align_corners=False)[0])
            desc.append(d)
        if progress:
            progress(len(views), n_views)
    return torch.stack(views), torch.tensor(desc, dtype=torch.float32)


def pretrain_gate_features(gate: DomainGate, *, steps: int, views: int, seed: int = 0, batch_size: int = 32,
                           device: torch.device | str = "cpu",
                           progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Re-initialise (from ``seed``) and train ``gate.convs`` to describe contrast; returns what was done.

    A throw-away linear map from the pooled features to the standardised description is trained with
    them (masked MSE: absent tissues do not count); the gate's classifier and calibration are not
    touched. The views are jittered in geometry and lightly in intensity (`jitter_views`), as a gate's
    views are in training. A tenth of the views is held out to report the loss before and after.
    Trains on ``device`` (the views stay on the CPU, a batch at a time moves); the gate is returned there.
    """
    from uharmony.augment.views import jitter_views

    if steps < 1 or views < 10:
        raise ValueError(f"contrast pretraining needs steps >= 1 and views >= 10, got {steps} and {views}")
    x, y = contrast_views(views, gate.input_size, gate.convs[0].in_channels,
                          progress=(lambda i, n: progress("views", i, n)) if progress else None)
    mean = torch.nanmean(y, 0)
    std = torch.sqrt(torch.nanmean((y - mean) ** 2, 0)).nan_to_num(1.0).clamp_min(1e-3)
    y = (y - mean) / std
    n_held = max(1, len(x) // 10)
    x_fit, y_fit, x_held, y_held = x[:-n_held], y[:-n_held], x[-n_held:], y[-n_held:]
    dim = gate.pooled_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for conv in gate.convs:
            conv.reset_parameters()
        head = torch.nn.Linear(dim, y.shape[1])
    device = torch.device(device)
    gate.to(device)
    head.to(device)
    params = [*gate.convs.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng([seed, FORMAT])

    def loss_of(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        v, target = v.to(device), target.to(device)
        pred = head(gate(v)[1][:, -dim:])
        ok = torch.isfinite(target)
        return ((pred - target.nan_to_num(0.0)) ** 2 * ok).sum() / ok.sum().clamp_min(1)

    gate.train()
    with torch.no_grad():
        start = float(loss_of(x_held, y_held))
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x_fit), batch_size))
        loss = loss_of(jitter_views(x_fit[idx], rng), y_fit[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress("steps", step + 1, steps)
    gate.eval()
    for p in params:
        p.grad = None
    with torch.no_grad():
        end = float(loss_of(x_held, y_held))
    return {"objective": "regress each channel's mean normalised intensity in CSF, grey matter, white matter, "
                         "skull, scalp, fat and marrow (standardised) from the pooled features",
            "data": f"{views} views of synthetic heads in random contrasts (uharmony.data.heads, seeds from "
                    f"{SEED_BASE})", "steps": steps, "seed": seed, "format": FORMAT,
            "held_loss_before": round(start, 4), "held_loss_after": round(end, 4)}


def encoder_file(in_channels: int, input_size, filters, *, steps: int, views: int, seed: int = 0) -> Path:
    """Where the encoder of this gate shape and these settings is cached."""
    from uharmony.data.sources import cache_root

    key = json.dumps({"in": in_channels, "size": list(map(int, input_size)), "filters": list(map(int, filters)),
                      "steps": steps, "views": views, "seed": seed, "format": FORMAT}, sort_keys=True)
    return cache_root().parent / "contrast-encoder" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def ensure_encoder(in_channels: int, input_size, filters, *, steps: int, views: int, seed: int = 0,
                   progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The encoder file for this gate shape: the one shipped in the package, else the cached one,
    pretrained first (on the GPU if there is one) if there is none yet."""
    from safetensors.torch import save_file

    from uharmony.device import choose_device

    path = encoder_file(in_channels, input_size, filters, steps=steps, views=views, seed=seed)
    if (SHIPPED_DIR / path.name).is_file():
        return SHIPPED_DIR / path.name
    if path.is_file():
        return path
    gate = DomainGate(in_channels, ["any"], input_size, filters)
    info = pretrain_gate_features(gate, steps=steps, views=views, seed=seed, device=choose_device("auto"),
                                  progress=progress)
    gate.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in gate.convs.state_dict().items()}, tmp,
                  metadata={"info": json.dumps(info)})
    return path


def load_encoder(gate: DomainGate, path: Path) -> dict:
    """Put a cached encoder's weights into ``gate.convs``; returns its pretraining record."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    weights = load_file(str(path))
    own = gate.convs.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise ValueError(f"{path}: the contrast encoder does not fit this gate (other filters or channels)")
    gate.convs.load_state_dict(weights)
    return info


def reference_features(gate: DomainGate, views: int = REFERENCE_VIEWS) -> np.ndarray:
    """The gate's pooled features (views, F) on synthetic heads in random contrasts, float64.

    What any head scan, in any contrast, may look like to this gate: the coordinator screens the
    feature statistics a site sends against them. The views (anatomy seeds never pretrained on)
    depend only on the gate's input shape and are cached; the features are computed fresh.
    """
    from safetensors.torch import load_file, save_file

    from uharmony.data.sources import cache_root

    channels = gate.convs[0].in_channels
    key = f"reference-{channels}-{'x'.join(map(str, gate.input_size))}-{views}-{FORMAT}.safetensors"
    path = cache_root().parent / "contrast-encoder" / key
    if path.is_file():
        x = load_file(str(path))["views"]
    else:
        x, _ = contrast_views(views, gate.input_size, channels, seed_base=REFERENCE_SEED_BASE)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            save_file({"views": x.contiguous()}, tmp)
    device = next(gate.parameters()).device
    was_training = gate.training
    gate.eval()
    with torch.no_grad():
        feats = torch.cat([gate(x[i:i + 32].to(device))[1][:, -gate.pooled_dim:] for i in range(0, len(x), 32)])
    gate.train(was_training)
    return feats.double().cpu().numpy()


def main(argv=None) -> int:
    """Pretrain into the package (SHIPPED_DIR) the encoders of the default gate shape (train and fed.toml
    defaults) and of `uharmony bench generalize`'s gate, each unless it is shipped already."""
    import argparse
    import shutil

    from uharmony.bench.generalize import budget
    from uharmony.fed.config import FedConfig
    from uharmony.progress import Reporter

    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    cfg = FedConfig()
    reporter = Reporter("auto")
    settings = {"steps": cfg.gate_pretrain_steps, "views": cfg.gate_pretrain_views}
    bench = budget(500, False)["gate"]
    for shape in ((cfg.gate.input_size, cfg.gate.filters), (bench["input_size"], bench["filters"])):
        args = (len(cfg.channels), *shape)
        shipped = SHIPPED_DIR / encoder_file(*args, **settings).name
        if shipped.is_file():
            print(f"already shipped: {shipped}")
            continue
        path = ensure_encoder(*args, **settings,
                              progress=lambda stage, i, n: reporter.progress(f"contrast encoder {stage}", i, n))
        SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, shipped)
        print(f"shipped: {shipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
