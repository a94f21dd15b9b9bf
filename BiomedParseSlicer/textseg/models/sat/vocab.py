"""SAT's class vocabulary (SAT-DS): 498 (modality, name) pairs, 451 distinct names.

The table ``textseg/data/sat_classes.csv`` (columns modality, name, region, abnormal) is built
from SAT-DS ``data/terminology_list.json`` by ``Utilities/build_sat_vocabulary.py``, which also checks
it against every label of SAT-DS's ``data/jsonl`` files. SAT takes any text (its text tower is a
language model) but was trained on these names only: they feed autocomplete, and a prompt
outside them gets a warning with the closest names (``check_target``). Torch-free.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Optional

TABLE = Path(__file__).resolve().parents[2] / "data" / "sat_classes.csv"
MODALITIES = ("CT", "MRI", "PET")


@dataclass(frozen=True)
class SATClass:
    modality: str  # CT, MRI or PET
    name: str  # lower case, as SAT was trained
    region: str  # one of SAT-DS's 9 body regions
    abnormal: bool  # lesion class


@lru_cache(maxsize=1)
def classes() -> tuple[SATClass, ...]:
    with open(TABLE, newline="", encoding="utf-8") as f:
        return tuple(SATClass(r["modality"], r["name"], r["region"], r["abnormal"] == "1") for r in csv.DictReader(f))


def sat_modality(modality: str) -> str:
    """Our modality name (CT, MRI, MR, PET, T1, ...) -> the table's CT/MRI/PET (upstream's substring
    rule of ``Inference_Dataset._merge_modality``)."""
    m = str(modality).lower()
    if any(k in m for k in ("t1", "t2", "mri", "mr", "flair", "dwi")):
        return "MRI"
    if "ct" in m:
        return "CT"
    if "pet" in m or m == "pt":
        return "PET"
    raise ValueError(f"SAT segments CT, MRI and PET images, not '{modality}'.")


@cache
def names(modality: Optional[str] = None) -> tuple[str, ...]:
    """Sorted distinct class names, of one modality or of all."""
    mod = sat_modality(modality) if modality else None
    return tuple(sorted({c.name for c in classes() if mod is None or c.modality == mod}))


def regions() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for c in classes():
        out.setdefault(c.region, []).append(f"{c.modality}:{c.name}")
    return {k: tuple(v) for k, v in out.items()}


def normalize(text: str) -> str:
    """What SAT feeds its text tower: the prompt lower-cased (upstream ``label.lower()``)."""
    return " ".join(str(text).split()).lower()


def check_target(text: str, modality: Optional[str] = None, n: int = 5) -> Optional[str]:
    """None when ``text`` is a class SAT was trained on for ``modality`` (any modality when None);
    otherwise a warning naming the closest trained names."""
    t = normalize(text)
    known = names(modality)
    if t in known:
        return None
    where = f"for {sat_modality(modality)} " if modality else ""
    close = difflib.get_close_matches(t, known, n=n, cutoff=0.6)
    other = [] if modality is None or t not in names() else [c.modality for c in classes() if c.name == t]
    msg = f"'{text}' is not one of the {len(known)} classes SAT was trained on {where}(SAT-DS)"
    if other:
        msg += f"; it is trained for {'/'.join(sorted(set(other)))}"
    if close:
        msg += f"; closest: {', '.join(close)}"
    return msg + ". SAT still segments it, but results for untrained text are unreliable."
