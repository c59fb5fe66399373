"""The model card (``card.json``): what a model is, what it expects, and what it may be used for.

Validated with a JSON schema on every load; the error names the card file and the exact field.
Torch-free, so the Slicer module can read cards without loading the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from uharmony.errors import BadModelError

CARD_FORMAT = 1
CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"

_rgb = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 3, "maxItems": 3}
_code = {
    "type": ["object", "null"],
    "required": ["scheme", "code", "meaning"],
    "properties": {"scheme": {"type": "string"}, "code": {"type": "string"}, "meaning": {"type": "string"}},
}
_vec3 = {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 3, "maxItems": 3}
_ivec3 = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 3, "maxItems": 3}

CARD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "name", "version", "architecture", "input", "domains", "classes", "gate",
                 "intended_use", "limitations", "training", "weights"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": CARD_FORMAT},
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "version": {"type": "string"},
        "description": {"type": "string"},
        "architecture": {"type": "object", "required": ["backbone", "in_channels", "num_classes", "domains"]},
        "input": {
            "type": "object",
            "required": ["channels", "normalization", "spacing_mm", "orientation", "patch_size"],
            "additionalProperties": False,
            "properties": {
                "channels": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}},
                "normalization": {"type": "object", "required": ["rule"]},
                "spacing_mm": _vec3,
                "orientation": {"const": "RAS"},
                "patch_size": _ivec3,
                "overlap": {"type": "number", "minimum": 0, "maximum": 0.95},
                "sw_batch_size": {"type": "integer", "minimum": 1},
            },
        },
        "domains": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "modality"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*$"},
                "modality": {"type": "string"},
                "description": {"type": "string"},
                "annotated_classes": {"type": "array", "items": {"type": "string"}},
            }}},
        "classes": {"type": "array", "minItems": 2, "items": {
            "type": "object", "required": ["value", "name"],
            "properties": {
                "value": {"type": "integer", "minimum": 0, "maximum": 255},
                "name": {"type": "string", "minLength": 1},
                "color": _rgb,
                "terminology": {"type": "object", "properties": {
                    "category": _code, "type": _code, "modifier": _code}},
            }}},
        "gate": {"type": "object", "required": ["unfamiliar_threshold", "routing"], "properties": {
            "unfamiliar_threshold": {"type": "number", "exclusiveMinimum": 0},
            "routing": {"enum": ["argmax", "soft"]},
            "calibration": {"type": "object"},
            # fields of view (x the scan's) the gate is asked about at inference, its answers averaged
            "fov_views": {"type": "array", "minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0.2,
                                                                   "maximum": 3}},
        }},
        # clean-up of the label map (uharmony.infer.postprocess): per class name, the smallest component kept
        "postprocess": {"type": "object", "additionalProperties": False, "properties": {
            "min_component_ml": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}}},
        "intended_use": {"type": "string"},
        "limitations": {"type": "array", "items": {"type": "string"}},
        "training": {"type": "object"},
        "evaluation": {"type": "object"},
        "weights": {"type": "object", "required": ["file", "sha256"], "additionalProperties": False, "properties": {
            "file": {"const": WEIGHTS_FILE},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        }},
    },
}


def validate_card(card: dict, where: str | Path = CARD_FILE) -> dict:
    """Check a card against the schema and its internal consistency; return it unchanged."""
    validator = jsonschema.Draft202012Validator(CARD_SCHEMA)
    errors = sorted(validator.iter_errors(card), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        field = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise BadModelError(f"card field {field}: {e.message}{more}", where)
    arch = card["architecture"]
    domains = [d["name"] for d in card["domains"]]
    values = [c["value"] for c in card["classes"]]
    problems = []
    if arch["domains"] != domains:
        problems.append(f"architecture.domains {arch['domains']} differ from domains {domains}")
    if arch["in_channels"] != len(card["input"]["channels"]):
        problems.append(f"architecture.in_channels={arch['in_channels']} but {len(card['input']['channels'])} input channels")
    if sorted(values) != list(range(arch["num_classes"])):
        problems.append(f"class values {values} are not 0..{arch['num_classes'] - 1}")
    names = [c["name"].lower() for c in card["classes"]]
    if len(set(names)) != len(names):
        problems.append("class names are not unique (case-insensitive)")
    foreground = [c["name"].lower() for c in card["classes"] if c["value"] != 0]
    for name in card.get("postprocess", {}).get("min_component_ml", {}):
        if name.lower() not in foreground:
            problems.append(f"postprocess.min_component_ml names {name!r}, not a class of this model")
    if problems:
        raise BadModelError("card is inconsistent: " + "; ".join(problems), where)
    return card


def load_card(model_dir: str | Path) -> dict:
    """Read and validate ``card.json`` from a model folder."""
    path = Path(model_dir) / CARD_FILE
    if not Path(model_dir).is_dir():
        raise BadModelError("is not a model folder (expected a folder with card.json and model.safetensors)", model_dir)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadModelError("card.json is missing", model_dir) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadModelError(f"card.json cannot be read: {e}", path) from None
    if not isinstance(card, dict):
        raise BadModelError("card.json is not a JSON object", path)
    return validate_card(card, path)


def class_names(card: dict) -> list[str]:
    return [c["name"] for c in sorted(card["classes"], key=lambda c: c["value"])]


def card_summary(card: dict) -> str:
    """A human-readable summary for `uharmony info`."""
    arch, inp = card["architecture"], card["input"]
    lines = [
        f"{card['name']} {card['version']}" + (f" - {card['description']}" if card.get("description") else ""),
        f"  channels:  {', '.join(c['name'] for c in inp['channels'])}",
        f"  spacing:   {' x '.join(f'{s:g}' for s in inp['spacing_mm'])} mm, orientation {inp['orientation']}, "
        f"patch {' x '.join(str(s) for s in inp['patch_size'])}",
        f"  network:   {arch['backbone']} filters {arch.get('filters')}, U-Harmony on {arch.get('harmony_levels')} levels, "
        f"polynomial degree {arch.get('poly_degree')}"
        + (f" (terms x {arch['poly_scale']:g})" if arch.get("poly_scale", 1.0) != 1.0 else ""),
        "  domains:",
        *(f"    - {d['name']} ({d['modality']})" + (f": {d['description']}" if d.get("description") else "")
          for d in card["domains"]),
        f"  gate:      routing {card['gate']['routing']}, unfamiliar above {card['gate']['unfamiliar_threshold']:.3g}"
        + (f", averaged over fields of view x{'/'.join(f'{v:g}' for v in card['gate']['fov_views'])}"
           if card["gate"].get("fov_views") else ""),
        "  classes:",
        *(f"    {c['value']:>3}  {c['name']}" for c in sorted(card["classes"], key=lambda c: c["value"])),
        *(f"  clean-up:  {name} pieces under {ml:g} mL go to the next likely class"
          for name, ml in card.get("postprocess", {}).get("min_component_ml", {}).items()),
        f"  intended use: {card['intended_use']}",
        "  limitations:",
        *(f"    - {x}" for x in card["limitations"]),
        "  training:",
        *(f"    {k}: {v}" for k, v in card["training"].items()),
        f"  weights:   {card['weights']['file']} sha256 {card['weights']['sha256']}",
    ]
    return "\n".join(lines)
