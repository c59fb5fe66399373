"""Model packages: ``model.safetensors`` (weights only, never a pickle) + ``card.json``.

`save_package` writes both atomically (a staging folder renamed into place) with the weights'
sha256 in the card. `load_model` validates the card, checks the hash, rebuilds the network from
the card's architecture and loads the tensors strictly: a missing, extra or mis-shaped tensor is
named in the error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uharmony.errors import BadModelError, OutputError
from uharmony.model.card import CARD_FILE, CARD_FORMAT, WEIGHTS_FILE, load_card, validate_card
from uharmony.model.network import ArchConfig, UHarmonyNet
from uharmony.model.registry import sha256_file, staged_folder, verify_weights


# DynUNet keeps every block twice in its state dict: once by name and once inside its recursive
# skip-layer chain. The chain's keys are aliases of the same tensors, so packages store the named
# copy only (safetensors refuses shared tensors) and loading fills the aliases by reference.
_ALIAS_PREFIX = "backbone.skip_layers."


def portable_state_dict(model: UHarmonyNet) -> dict[str, torch.Tensor]:
    """The model's tensors without DynUNet's aliases, on the CPU in fp32 (buffers keep their dtype)."""
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in model.state_dict().items() if not k.startswith(_ALIAS_PREFIX)}


def load_portable_state_dict(model: UHarmonyNet, tensors: dict[str, torch.Tensor], where=None) -> None:
    """Strict loading of a portable state dict: names every missing, extra or mis-shaped tensor."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(_ALIAS_PREFIX)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensors of the wrong shape (e.g. {k}: {tuple(tensors[k].shape)} "
                         f"instead of {tuple(expected[k].shape)})")
        raise BadModelError("weights do not match the card's architecture: " + ", ".join(parts), where)
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and all(k.startswith(_ALIAS_PREFIX) for k in result.missing_keys)


def save_package(model: UHarmonyNet, card: dict, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write `model` and its card into `out_dir`; fills in format, architecture and weights.

    Returns the card as written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError("exists already (use --overwrite to replace it)", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out_dir) as staging:
        save_file(portable_state_dict(model), str(staging / WEIGHTS_FILE),
                  metadata={"format": "uharmony", "card_format": str(CARD_FORMAT)})
        card = dict(card)
        card["format"] = CARD_FORMAT
        card["architecture"] = model.config.to_dict()
        card["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(staging / WEIGHTS_FILE)}
        validate_card(card, staging / CARD_FILE)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def build_model(card: dict) -> UHarmonyNet:
    try:
        return UHarmonyNet(ArchConfig.from_dict(dict(card["architecture"])))
    except (TypeError, ValueError) as e:
        raise BadModelError(f"card architecture cannot be built: {e}") from None


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[UHarmonyNet, dict]:
    """Validate and load a package; returns (model in eval mode on `device`, card)."""
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    verify_weights(model_dir, card)
    weights = model_dir / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors' own errors for a malformed file
        raise BadModelError(f"is not a valid safetensors file: {e}", weights) from None
    try:
        model = build_model(card)
    except BadModelError as e:
        raise BadModelError(e.message, model_dir / CARD_FILE) from None
    load_portable_state_dict(model, tensors, weights)
    return model.to(device).eval(), card
