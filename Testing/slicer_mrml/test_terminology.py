"""The standard classes' codes/colours and the TerminologyEntry string Slicer stores on a segment."""

from __future__ import annotations

import pytest

from uharmony.model.terminology import (
    CATEGORY_CONTEXT,
    REGION_CONTEXT,
    STANDARD_CLASSES,
    parse_slicer_terminology_entry,
    slicer_terminology_entry,
    standard_class,
)

EXPECTED = {  # from Slicer's SegmentationCategoryTypeModifier-DICOM-Master.json
    "cerebrospinal fluid": ("123037004", "65216001", (85, 188, 255)),
    "grey matter": ("123037004", "389081007", (200, 200, 235)),
    "white matter": ("123037004", "389080008", (250, 250, 210)),
    "lesion": ("49755003", "4147007", (144, 238, 144)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_codes_and_colours(name):
    category, type_code, rgb = EXPECTED[name]
    entry = STANDARD_CLASSES[name]
    assert entry["terminology"]["category"]["code"] == category
    assert entry["terminology"]["type"]["code"] == type_code
    assert entry["terminology"]["type"]["scheme"] == "SCT"
    assert entry["terminology"]["modifier"] is None
    assert [round(c * 255) for c in entry["color"]] == list(rgb)
    assert all(0.0 <= c <= 1.0 for c in entry["color"])


def test_exact_string_format():
    text = slicer_terminology_entry(STANDARD_CLASSES["cerebrospinal fluid"]["terminology"])
    assert text == (
        "Segmentation category and type - DICOM master list"
        "~SCT^123037004^Anatomical Structure~SCT^65216001^Cerebrospinal Fluid~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert text.count("~") == 6


def test_modifier_and_region_are_rendered():
    term = dict(STANDARD_CLASSES["white matter"]["terminology"])
    term["modifier"] = {"scheme": "SCT", "code": "24028007", "meaning": "Right"}
    term["region"] = {"scheme": "SCT", "code": "12738006", "meaning": "Brain"}
    text = slicer_terminology_entry(term)
    fields = text.split("~")
    assert fields[3] == "SCT^24028007^Right"
    assert fields[5] == "SCT^12738006^Brain"
    back = parse_slicer_terminology_entry(text)
    assert back["modifier"]["meaning"] == "Right" and back["region"]["code"] == "12738006"
    assert back["context"] == CATEGORY_CONTEXT and back["region_context"] == REGION_CONTEXT


@pytest.mark.parametrize(
    "bad",
    [
        {"type": {"scheme": "SCT", "code": "1", "meaning": "x"}},  # no category
        {"category": {"scheme": "SCT", "code": "1", "meaning": "x"}},  # no type
        {"category": {"scheme": "SCT", "code": "1"}, "type": {"scheme": "SCT", "code": "2", "meaning": "y"}},
        {"category": {"scheme": "SCT", "code": "1", "meaning": "a~b"}, "type": {"scheme": "SCT", "code": "2", "meaning": "y"}},
    ],
)
def test_invalid_terminology_is_refused(bad):
    with pytest.raises(ValueError):
        slicer_terminology_entry(bad)


def test_lookup_is_case_and_space_insensitive_and_returns_copies():
    a = standard_class("  Grey   Matter ")
    assert a is not None and a["terminology"]["type"]["code"] == "389081007"
    assert standard_class("gray matter")["color"] == a["color"]
    a["color"][0] = 0.0
    a["terminology"]["type"]["code"] = "changed"
    assert STANDARD_CLASSES["grey matter"]["terminology"]["type"]["code"] == "389081007"
    assert standard_class("spleen") is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_slicer_own_parser_accepts_and_reserializes_it(name):
    """Slicer's C++ (de)serializer from slicer-core reads our string back field by field."""
    slicer = pytest.importorskip("slicer")
    text = slicer_terminology_entry(STANDARD_CLASSES[name]["terminology"])
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry)
    assert entry.GetTerminologyContextName() == CATEGORY_CONTEXT
    assert entry.GetRegionContextName() == REGION_CONTEXT
    assert entry.GetCategoryObject().GetCodeValue() == EXPECTED[name][0]
    assert entry.GetTypeObject().GetCodeValue() == EXPECTED[name][1]
    assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
    assert slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry) == text
    segment = slicer.vtkSegment()
    segment.SetTerminology(text)
    assert segment.GetTerminology() == text
