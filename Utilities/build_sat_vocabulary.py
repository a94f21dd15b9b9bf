"""Rebuild BiomedParseSlicer/textseg/data/sat_classes.csv: SAT's class vocabulary, from SAT-DS.

Source: github.com/zhaoziheng/SAT-DS (commit 492df0e was used), ``data/terminology_list.json``:
``all`` holds the 498 "<modality>_<name>" pairs SAT was trained on (306 ct, 189 mri, 3 pet;
451 distinct names; the papers say "497 classes"), ``region_based`` assigns each pair to exactly
one of 9 body regions and ``abnormal`` lists the 24 lesion classes.

Cross-check (the script fails if it does not hold): the union of the ``label`` names of every
``data/jsonl/*.jsonl`` line, lower-cased, with the line's ``modality`` merged the way SAT's
``Inference_Dataset._merge_modality`` does (t1/t2/mri/mr/flair/dwi -> mri, ct -> ct, pet -> pet;
"MRI ADC" -> mri because it contains "mr"), is exactly the same 498 pairs. The names SAT-DS's
``loader.py`` adds by merging labels (kidney, eyeball, head of femur, lumbar vertebrae, left rib, ...)
were checked by hand to be in the list.

Usage: python Utilities/build_sat_vocabulary.py <SAT-DS checkout> [--check]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "BiomedParseSlicer" / "textseg" / "data" / "sat_classes.csv"
MODALITY_NAMES = {"ct": "CT", "mri": "MRI", "pet": "PET"}


def merge_modality(mod: str) -> str:
    """SAT data/inference_dataset.py Inference_Dataset._merge_modality."""
    if any(k in mod for k in ["t1", "t2", "mri", "mr", "flair", "dwi"]):
        return "mri"
    if "ct" in mod:
        return "ct"
    if "pet" in mod:
        return "pet"
    return mod


def build(root: Path) -> str:
    term = json.loads((root / "data" / "terminology_list.json").read_text())
    pairs = [tuple(x.split("_", 1)) for x in term["all"]]
    if len(set(pairs)) != len(pairs):
        raise SystemExit("terminology_list.json 'all' has duplicates")
    from_jsonl = set()
    for f in sorted((root / "data" / "jsonl").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                m = merge_modality(d["modality"].lower())
                from_jsonl.update((m, n.lower()) for n in d["label"])
    if from_jsonl != set(pairs):
        raise SystemExit(f"jsonl labels and terminology_list differ: {sorted(from_jsonl ^ set(pairs))[:10]}")
    region = {}
    for r, items in term["region_based"].items():
        for x in items:
            if x in region:
                raise SystemExit(f"{x} is in two regions")
            region[x] = r
    abnormal = set(term["abnormal"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["modality", "name", "region", "abnormal"])
    for m, n in sorted(pairs, key=lambda p: (["ct", "mri", "pet"].index(p[0]), p[1])):
        key = f"{m}_{n}"
        w.writerow([MODALITY_NAMES[m], n, region[key], int(key in abnormal)])
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("satds", type=Path, help="SAT-DS checkout (needs data/terminology_list.json, data/jsonl)")
    ap.add_argument("--check", action="store_true", help="only compare with the committed CSV")
    a = ap.parse_args(argv)
    text = build(a.satds)
    if a.check:
        same = OUT.read_text() == text
        print("up to date" if same else f"{OUT} differs from SAT-DS")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10)) - 1} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
