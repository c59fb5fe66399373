"""Training checkpoints: safetensors + a JSON sidecar, written atomically. Never a pickle.

Layout of ``<out>.checkpoint/``::

    latest.json            {"step": 40, "folder": "step-00000040"}   (replaced atomically, last)
    step-00000040/
        model.safetensors      the model's tensors (as in a package, without DynUNet's aliases)
        optimizer.safetensors  the optimiser state's tensors, named ``state.<param index>.<key>``
        state.json             step, config hash, datalist hashes, optimiser scalars (param groups),
                               grad-scaler state, sha256 of both tensor files

A step folder is written under a temporary name and renamed into place; then ``latest.json`` is
replaced; then older step folders are removed. A kill at any moment leaves ``latest.json`` naming a
complete folder (or no checkpoint at all). Random state is not saved: every step's randomness is
drawn from ``(seed, step)``, so the step number is all a resumed run needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uharmony.data.io import write_json
from uharmony.errors import ExitCode, UHarmonyError
from uharmony.model.package import load_portable_state_dict, portable_state_dict
from uharmony.model.registry import sha256_file, staged_folder

FORMAT = 1
LATEST = "latest.json"


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where the checkpoints of a run writing the package `out` live: ``<out>.checkpoint``."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: str | os.PathLike, *, step: int, model, optimizer, scaler=None, meta: dict) -> Path:
    """Write the checkpoint of `step` atomically; return its step folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    with staged_folder(folder / name, public=False) as staging:
        save_file(portable_state_dict(model), str(staging / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        state = {
            "format": FORMAT,
            "step": int(step),
            **meta,
            "optimizer": opt_meta,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "sha256": {f: sha256_file(staging / f) for f in ("model.safetensors", "optimizer.safetensors")},
        }
        write_json(staging / "state.json", state)
    write_json(folder / LATEST, {"format": FORMAT, "step": int(step), "folder": name})
    for old in folder.iterdir():  # older steps and staging leftovers of a killed run
        if old.name != name and old.name != LATEST and (old.name.startswith("step-") or old.name.startswith(".")):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return folder / name


def read_checkpoint_state(folder: str | os.PathLike) -> tuple[Path, dict]:
    """The latest complete checkpoint's folder and state.json (refused with exit 2 when unusable)."""
    folder = Path(folder)
    latest = folder / LATEST
    if not latest.is_file():
        raise UHarmonyError("no checkpoint to resume from (run without --resume to start)", folder, code=ExitCode.USAGE)
    try:
        pointer = json.loads(latest.read_text(encoding="utf-8"))
        step_dir = folder / pointer["folder"]
        state = json.loads((step_dir / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise UHarmonyError(f"checkpoint cannot be read ({e}); start again without --resume", folder,
                            code=ExitCode.USAGE) from None
    if state.get("format") != FORMAT:
        raise UHarmonyError(f"checkpoint format {state.get('format')} is not {FORMAT}", step_dir, code=ExitCode.USAGE)
    for f, digest in state.get("sha256", {}).items():
        if not (step_dir / f).is_file() or sha256_file(step_dir / f) != digest:
            raise UHarmonyError(f"checkpoint file {f} is missing or corrupt; start again without --resume", step_dir,
                                code=ExitCode.USAGE)
    return step_dir, state


def load_checkpoint(step_dir: Path, state: dict, *, model, optimizer, scaler=None) -> int:
    """Load tensors into `model` and `optimizer` (and the grad scaler); return the step."""
    load_portable_state_dict(model, load_file(str(step_dir / "model.safetensors"), device="cpu"), step_dir)
    device = next(model.parameters()).device
    opt_tensors = load_file(str(step_dir / "optimizer.safetensors"), device=str(device))
    # Adam's "step" counters live on the CPU unless the optimiser is capturable/fused.
    for k in list(opt_tensors):
        if k.endswith(".step"):
            opt_tensors[k] = opt_tensors[k].cpu()
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])
