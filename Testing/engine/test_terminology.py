"""Prompt -> SNOMED CT terminology + standard colour, from the shipped table."""

import csv

import pytest

from textseg.terminology import TABLE, UNKNOWN_PALETTE, distinct_colors, lookup, normalize


def rgb(t):
    return tuple(round(c * 255) for c in t.color)


def test_table_has_totalsegmentator_layout_and_unique_structures():
    with open(TABLE, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    groups = ["SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
              "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence", "AnatomicRegionModifierSequence"]
    expected = ["Structure"] + [f"{g}.{c}" for g in groups for c in ("CodingSchemeDesignator", "CodeValue",
                                                                     "CodeMeaning")]
    assert reader.fieldnames[:16] == expected
    assert reader.fieldnames[16:] == ["RecommendedDisplayRGBValue", "Synonyms"]
    names = [r["Structure"] for r in rows]
    assert len(names) == len(set(names)) and len(rows) >= 70
    for r in rows:  # every row has SNOMED category and type codes and a colour
        assert r["SegmentedPropertyCategoryCodeSequence.CodingSchemeDesignator"] == "SCT"
        assert r["SegmentedPropertyTypeCodeSequence.CodeValue"].isdigit()
        assert len(r["RecommendedDisplayRGBValue"].split()) == 3


@pytest.mark.parametrize("prompt, type_code, modifier, color", [
    ("liver", "10200004", None, (221, 130, 101)),          # Slicer DICOM master list colour
    ("Liver in abdomen CT", "10200004", None, (221, 130, 101)),
    ("spleen", "78961009", None, (157, 108, 162)),
    ("left kidney", "64033007", "Left", (185, 102, 83)),
    ("Right Kidney", "64033007", "Right", (185, 102, 83)),
    ("left adrenal gland", "23451007", "Left", (249, 186, 150)),
    ("postcava", "64131007", None, None),
    ("inferior vena cava", "64131007", None, None),
    ("IVC", "64131007", None, None),
    ("left heart ventricle", "87878005", None, (152, 55, 13)),
    ("right heart atrium", "73829009", None, (210, 115, 89)),
    ("myocardium", "74281007", None, None),
    ("brain", "12738006", None, (250, 250, 225)),
    ("left lung", "39607008", "Left", (197, 165, 145)),
    ("oesophagus", "32849002", None, (211, 171, 143)),
    ("gall bladder", "28231008", None, (139, 150, 98)),
    ("kidneys", "64033007", None, (185, 102, 83)),
    ("femur left", "71341001", "Left", None),
])
def test_known_prompts(prompt, type_code, modifier, color):
    t = lookup(prompt)
    assert t.known and t.type.scheme == "SCT" and t.type.value == type_code
    assert (t.type_modifier.meaning if t.type_modifier else None) == modifier
    if color:
        assert rgb(t) == color


def test_postcava_and_inferior_vena_cava_are_the_same_entry():
    assert lookup("postcava") == lookup("Inferior Vena Cava") == lookup("inferior_vena_cava")


@pytest.mark.parametrize("prompt, lesion, region, side", [
    ("left kidney tumor", "108369006", "64033007", "Left"),
    ("tumour in the right kidney", "108369006", "64033007", "Right"),
    ("liver tumor", "108369006", "10200004", None),
    ("lung nodule", "27925004", "39607008", None),
    ("cyst of the left kidney", "367643001", "64033007", "Left"),
    ("pancreas lesion", "52988006", "15776009", None),
])
def test_lesion_in_organ(prompt, lesion, region, side):
    t = lookup(prompt)
    assert t.category.value == "49755003"  # Morphologically Altered Structure
    assert t.type.value == lesion and t.region.value == region
    assert (t.region_modifier.meaning if t.region_modifier else None) == side
    assert t.type_modifier is None


def test_biomedparse_targets_map_to_specific_entries():
    for p in ["enhancing tumor", "non-enhancing tumor", "tumor core", "edema", "COVID-19 infection", "nodule",
              "neoplastic polyp", "optic disc", "optic cup", "lesion", "left heart atrium", "pancreas",
              "duodenum", "stomach", "esophagus", "aorta", "gallbladder", "right adrenal gland"]:
        assert lookup(p).known, p
    assert lookup("enhancing tumor").region.meaning == "Brain"
    assert lookup("COVID-19 infection").type_modifier.value == "840539006"
    assert lookup("optic disc").region.meaning == "Eye"
    # TotalSegmentator label names resolve too
    assert lookup("kidney_cyst_left").region_modifier.meaning == "Left"
    assert lookup("adrenal_gland_right").type_modifier.meaning == "Right"


@pytest.mark.parametrize("prompt", ["banana", "", "   ", "???", "a very long made up structure name " * 5, 42])
def test_unknown_prompt_is_generic_tissue_never_an_error(prompt):
    t = lookup(prompt)
    assert not t.known and t.category.value == t.type.value == "85756007"
    assert tuple(round(c * 255) for c in t.color) in UNKNOWN_PALETTE


def test_distinct_colors_for_unknown_prompts():
    terms = [lookup(p) for p in ["liver", "thing one", "thing two", "thing three", "thing four"]]
    colors = distinct_colors(terms)
    assert colors[0] == terms[0].color
    assert len(set(colors)) == len(colors)


def test_slicer_terminology_string():
    s = lookup("left kidney tumor").to_slicer_string()
    assert s == ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
                 "~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^64033007^Kidney~SCT^7771000^Left")


def test_normalize():
    assert normalize("  Left_Kidney-TUMOUR!! ") == "left kidney tumor"
