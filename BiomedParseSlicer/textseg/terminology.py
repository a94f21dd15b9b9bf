"""Prompt -> segment name, standard colour and SNOMED CT terminology.

The table ``data/terminology.csv`` has the layout of TotalSegmentator's
``totalsegmentator_snomed_mapping.csv`` (one row per structure: segmented property category, type,
type modifier, anatomic region and its modifier, each as CodingSchemeDesignator/CodeValue/
CodeMeaning) plus ``RecommendedDisplayRGBValue`` and ``Synonyms``. Codes and colours come from
3D Slicer's DICOM master lists (``Utilities/build_terminology_csv.py`` rebuilds it).

``lookup(prompt)`` is forgiving: case, punctuation, British spelling, plurals, synonyms
("postcava" = "inferior vena cava"), BiomedParse-style suffixes ("liver in abdomen CT"),
laterality ("left femur" -> Femur + Left) and lesion-in-organ prompts ("left kidney tumor" ->
category Morphologically Altered Structure, type Neoplasm, anatomic region Kidney, region
modifier Left). An unknown prompt never fails: it gets the generic Tissue entry and a colour
from a fixed palette (``known`` is False).
"""

from __future__ import annotations

import csv
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TABLE = Path(__file__).with_name("data") / "terminology.csv"
GROUPS = ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
          "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence", "AnatomicRegionModifierSequence")

Color = tuple[float, float, float]

# Colours for prompts the table does not know: well separated hues, none equal to a table colour.
UNKNOWN_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)
SPELLING = {"tumour": "tumor", "tumours": "tumors", "oedema": "edema", "haemorrhage": "hemorrhage",
            "oesophagus": "esophagus", "grey": "gray", "haemorrhagic": "hemorrhagic", "disk": "disc"}
FILLER = ("segmentation of", "segment the", "segment", "the", "a", "an", "all")
SIDES = {"left": "Left", "right": "Right"}


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    def as_list(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]


LEFT = Code("SCT", "7771000", "Left")
RIGHT = Code("SCT", "24028007", "Right")
TISSUE = Code("SCT", "85756007", "Tissue")


@dataclass(frozen=True)
class Terminology:
    """One terminology entry: codes (DICOM segmentation attributes) and a display colour (0..1)."""

    category: Code
    type: Code
    color: Color
    type_modifier: Optional[Code] = None
    region: Optional[Code] = None
    region_modifier: Optional[Code] = None
    structure: str = ""  # the table row it came from ("" for unknown prompts)
    known: bool = True

    def to_slicerio(self) -> dict:
        """The terminology dict slicerio writes into a .seg.nrrd (Slicer's TerminologyEntry tag)."""
        d = {"contextName": CATEGORY_CONTEXT, "category": self.category.as_list(), "type": self.type.as_list()}
        if self.type_modifier:
            d["typeModifier"] = self.type_modifier.as_list()
        d["anatomicContextName"] = ANATOMIC_CONTEXT
        if self.region:
            d["anatomicRegion"] = self.region.as_list()
            if self.region_modifier:
                d["anatomicRegionModifier"] = self.region_modifier.as_list()
        return d

    def to_slicer_string(self) -> str:
        """Slicer's serialized terminology entry (``context~cat~type~mod~anatContext~region~regionMod``)."""
        from slicerio.segmentation import terminology_entry_to_string

        return terminology_entry_to_string(self.to_slicerio())

    @staticmethod
    def from_slicerio(d: dict, color: Optional[Color] = None) -> Terminology:
        def code(key):
            v = d.get(key)
            return Code(*v[:3]) if v and len(v) >= 3 and v[1] else None

        return Terminology(code("category") or TISSUE, code("type") or TISSUE, tuple(color or (0.5, 0.5, 0.5)),
                           code("typeModifier"), code("anatomicRegion"), code("anatomicRegionModifier"),
                           known=False)


def normalize(text: str) -> str:
    """Lower case, ASCII, words only, American spelling."""
    t = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower()
    words = re.sub(r"[^a-z0-9]+", " ", t).split()
    return " ".join(SPELLING.get(w, w) for w in words)


@lru_cache(maxsize=1)
def table() -> dict[str, Terminology]:
    """Normalized structure names and synonyms -> Terminology, from data/terminology.csv."""
    out: dict[str, Terminology] = {}
    with open(TABLE, newline="") as f:
        for row in csv.DictReader(f):
            codes = [_code(row, g) for g in GROUPS]
            color = tuple(int(c) / 255.0 for c in row["RecommendedDisplayRGBValue"].split())
            entry = Terminology(codes[0], codes[1], color, codes[2], codes[3], codes[4], row["Structure"])
            names = [row["Structure"]] + [s for s in row["Synonyms"].split(";") if s.strip()]
            for name in names:
                out.setdefault(normalize(name), entry)
    return out


def color_for(category: Code, type_: Code, type_modifier: Optional[Code] = None) -> Optional[Color]:
    """The table's colour for these codes (first matching row), None if the table lacks them."""
    for e in table().values():
        if (e.category.value, e.type.value) == (category.value, type_.value) and (
                type_modifier is None or (e.type_modifier and e.type_modifier.value == type_modifier.value)):
            return e.color
    return None


def _code(row: dict, group: str) -> Optional[Code]:
    value = row[f"{group}.CodeValue"].strip()
    return Code(row[f"{group}.CodingSchemeDesignator"], value, row[f"{group}.CodeMeaning"]) if value else None


def lookup(prompt: str) -> Terminology:
    """The terminology entry for a prompt; the generic Tissue entry if nothing matches."""
    text = normalize(prompt)
    for cand in _candidates(text):
        found = _match(cand)
        if found:
            return found
    return unknown(text)


def unknown(text: str) -> Terminology:
    rgb = UNKNOWN_PALETTE[zlib.crc32(text.encode()) % len(UNKNOWN_PALETTE)]
    return Terminology(TISSUE, TISSUE, tuple(c / 255.0 for c in rgb), known=False)


def _candidates(text: str) -> Iterable[str]:
    yield text
    stripped = text
    for f in FILLER:  # "segmentation of the liver" -> "liver"
        if stripped.startswith(f + " "):
            stripped = stripped[len(f) + 1:]
    yield stripped
    for sep in (" in ", " on ", " within "):  # "liver in abdomen ct" -> "liver"
        if sep in f" {stripped} ":
            yield f" {stripped} ".split(sep)[0].strip()


def _match(text: str) -> Optional[Terminology]:
    if not text:
        return None
    return _exact(text) or _lateral(text) or _lesion_in_organ(text)


def _exact(text: str) -> Optional[Terminology]:
    tab = table()
    if text in tab:
        return tab[text]
    if text.endswith("s") and text[:-1] in tab:  # simple plural
        return tab[text[:-1]]
    return None


def _lateral(text: str) -> Optional[Terminology]:
    """'left femur', 'femur left', 'left lung nodule' (the side goes to the right place)."""
    words = text.split()
    sides = [w for w in words if w in SIDES]
    if len(sides) != 1:
        return None
    base_text = " ".join(w for w in words if w not in SIDES)
    base = _exact(base_text) or _lesion_in_organ(base_text)
    if base is None:
        return None
    side = LEFT if sides[0] == "left" else RIGHT
    if base.region is not None:  # a lesion in an organ: the side belongs to the organ
        return replace(base, region_modifier=base.region_modifier or side)
    if base.type_modifier is not None:
        return base
    return replace(base, type_modifier=side)


def _lesion_in_organ(text: str) -> Optional[Terminology]:
    """'kidney tumor', 'tumor of the liver', 'tumor in the left kidney', 'lung nodule'."""
    for lesion_text, organ_text in _splits(text):
        lesion = _exact(lesion_text)
        if lesion is None or lesion.category.meaning != "Morphologically Altered Structure":
            continue
        organ = _exact(organ_text) or _lateral(organ_text)
        if organ is None or organ.category.meaning == "Morphologically Altered Structure":
            continue
        return replace(lesion, region=organ.type, region_modifier=organ.type_modifier,
                       structure=f"{lesion.structure}@{organ.structure}")
    return None


def _splits(text: str) -> Iterable[tuple[str, str]]:
    m = re.match(r"^(.+?) (?:of|in|within|on) (?:the )?(.+)$", text)
    if m:
        yield m.group(1), m.group(2)
    words = text.split()
    for n in (1, 2, 3):  # trailing lesion words: "left kidney tumor core"
        if len(words) > n:
            yield " ".join(words[-n:]), " ".join(words[:-n])


def distinct_colors(entries: Sequence[Terminology]) -> list[Color]:
    """The entries' colours, with unknown prompts moved along the palette so that no unknown
    segment shares a colour with another segment of the same file."""
    used = {e.color for e in entries if e.known}
    out = []
    for e in entries:
        color = e.color
        if not e.known:
            start = UNKNOWN_PALETTE.index(tuple(round(c * 255) for c in color))
            for k in range(len(UNKNOWN_PALETTE)):
                color = tuple(c / 255.0 for c in UNKNOWN_PALETTE[(start + k) % len(UNKNOWN_PALETTE)])
                if color not in used:
                    break
            used.add(color)
        out.append(color)
    return out
