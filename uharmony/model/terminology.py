"""Standard terminology (SNOMED CT codes) and Slicer's recommended colours for UHarmony's classes.

Source (verified against Slicer's own files, main branch, 2026):
- codes and colours: ``Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json``
  (the "Segmentation category and type - DICOM master list" context). Cerebrospinal fluid
  (SCT 65216001) exists only in the DICOM master list, not in the "3D Slicer General Anatomy list",
  so every entry here uses the DICOM master list, which Slicer always loads.
  The colours equal ``Base/Logic/Resources/ColorFiles/GenericAnatomyColors.txt``
  (``cerebro-spinal_fluid`` 85 188 255, ``mass`` 144 238 144).
- the string format: ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry`` — seven
  ``~``-separated fields: context name, category, type, type modifier, region context name, region,
  region modifier; each coded field is ``scheme^value^meaning`` (``^^`` when empty). A segment
  stores it in its ``TerminologyEntry`` tag (``vtkSegment::SetTerminology``).

This module is plain Python (no Slicer, no torch): the card writer and the Slicer module share it.
"""

from __future__ import annotations

from typing import Any

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"

_ANATOMICAL_STRUCTURE = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
_MORPHOLOGICALLY_ALTERED = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"}


def _rgb(r: int, g: int, b: int) -> list[float]:
    return [round(r / 255.0, 6), round(g / 255.0, 6), round(b / 255.0, 6)]


def _entry(category: dict, code: str, meaning: str, rgb: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "color": _rgb(*rgb),
        "terminology": {
            "category": dict(category),
            "type": {"scheme": "SCT", "code": code, "meaning": meaning},
            "modifier": None,
        },
    }


_CSF = _entry(_ANATOMICAL_STRUCTURE, "65216001", "Cerebrospinal Fluid", (85, 188, 255))
_GREY = _entry(_ANATOMICAL_STRUCTURE, "389081007", "Gray Matter", (200, 200, 235))
_WHITE = _entry(_ANATOMICAL_STRUCTURE, "389080008", "White Matter", (250, 250, 210))
# The DICOM list has no plain "Lesion" type; "Mass" is the one lesion type with a recommended colour.
_LESION = _entry(_MORPHOLOGICALLY_ALTERED, "4147007", "Mass", (144, 238, 144))

#: Lower-case class name -> {"color": [r, g, b] in 0..1, "terminology": {category, type, modifier}}.
#: Spelling variants map to the same entry (a fresh copy each, so callers may edit them).
STANDARD_CLASSES: dict[str, dict[str, Any]] = {}
for _names, _value in (
    (("cerebrospinal fluid", "csf", "cerebro-spinal fluid"), _CSF),
    (("grey matter", "gray matter"), _GREY),
    (("white matter",), _WHITE),
    (("lesion", "mass", "tumour", "tumor"), _LESION),
):
    for _name in _names:
        STANDARD_CLASSES[_name] = {
            "color": list(_value["color"]),
            "terminology": {k: (dict(v) if isinstance(v, dict) else v) for k, v in _value["terminology"].items()},
        }
del _names, _value, _name


def standard_class(name: str) -> dict[str, Any] | None:
    """The standard colour and terminology of a class name (case-insensitive), or None."""
    entry = STANDARD_CLASSES.get(" ".join(name.strip().lower().split()))
    if entry is None:
        return None
    return {"color": list(entry["color"]), "terminology": {k: (dict(v) if isinstance(v, dict) else v) for k, v in entry["terminology"].items()}}


def _coded(code: dict | None, field: str) -> str:
    if not code:
        return "^^"
    if not isinstance(code, dict):
        raise ValueError(f"terminology {field} must be an object with scheme, code, meaning")
    parts = []
    for key in ("scheme", "code", "meaning"):
        value = code.get(key)
        if value is None or str(value) == "":
            raise ValueError(f"terminology {field} lacks {key!r}")
        value = str(value)
        if "~" in value or "^" in value or "|" in value:
            raise ValueError(f"terminology {field} {key} {value!r} contains a reserved character (~ ^ |)")
        parts.append(value)
    return "^".join(parts)


def slicer_terminology_entry(terminology: dict, context: str = CATEGORY_CONTEXT, region_context: str = REGION_CONTEXT) -> str:
    """Slicer's serialized TerminologyEntry for a card terminology dict.

    ``{"category": {...}, "type": {...}, "modifier": None|{...}, "region": None|{...},
    "region_modifier": None|{...}}`` -> ``context~cat~type~modifier~regionContext~region~regionModifier``.
    Category and type are required (Slicer rejects an entry without them).
    """
    if not isinstance(terminology, dict):
        raise ValueError("terminology must be an object")
    for required in ("category", "type"):
        if not terminology.get(required):
            raise ValueError(f"terminology lacks {required!r}")
    fields = [
        context,
        _coded(terminology["category"], "category"),
        _coded(terminology["type"], "type"),
        _coded(terminology.get("modifier"), "modifier"),
        region_context,
        _coded(terminology.get("region"), "region"),
        _coded(terminology.get("region_modifier"), "region_modifier"),
    ]
    return "~".join(fields)


def parse_slicer_terminology_entry(entry: str) -> dict[str, Any]:
    """The inverse of `slicer_terminology_entry` (context names included)."""
    parts = entry.split("~")
    if len(parts) != 7:
        raise ValueError(f"a Slicer terminology entry has 7 '~'-separated fields, not {len(parts)}")

    def coded(text: str) -> dict | None:
        bits = text.split("^")
        if len(bits) != 3:
            raise ValueError(f"coded field {text!r} is not scheme^code^meaning")
        if not any(bits):
            return None
        return {"scheme": bits[0], "code": bits[1], "meaning": bits[2]}

    return {
        "context": parts[0],
        "category": coded(parts[1]),
        "type": coded(parts[2]),
        "modifier": coded(parts[3]),
        "region_context": parts[4],
        "region": coded(parts[5]),
        "region_modifier": coded(parts[6]),
    }
