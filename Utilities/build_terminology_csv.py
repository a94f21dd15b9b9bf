"""Rebuild BiomedParseSlicer/textseg/data/terminology.csv from 3D Slicer's terminology tables.

Usage: python Utilities/build_terminology_csv.py TERMINOLOGY_DIR [OUT.csv]

TERMINOLOGY_DIR holds Slicer's ``SegmentationCategoryTypeModifier-DICOM-Master.term.json``,
``SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.term.json`` and
``AnatomicRegionAndModifier-DICOM-Master.term.json`` (Slicer's repository,
Modules/Loadable/Terminologies/Resources, or ``trame_slicer/resources/terminologies`` in the
trame-slicer wheel). Nothing is downloaded.

Every row below names its codes by *meaning*; the script resolves code values from the DICOM master
lists and fails if a meaning is missing, so the CSV only carries master-list codes, except the few
concepts the master list lacks, which are given explicitly with their SNOMED CT code (marked X below).
Colours: the master list's recommended colour of the entry (type or laterality modifier), else the
3D Slicer General Anatomy list's colour for the same code, else the colour given here (with reason).
The layout is TotalSegmentator's ``totalsegmentator_snomed_mapping.csv`` plus two columns:
``RecommendedDisplayRGBValue`` ("R G B", 0-255) and ``Synonyms`` (";"-separated prompts).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

AS, TI, MA, BS = "Anatomical Structure", "Tissue", "Morphologically Altered Structure", "Body Substance"
X = "explicit"  # marker: code given explicitly (not in the master list)

# key, synonyms, category, type, type modifier, anatomic region, region modifier, fallback colour
# A type may be a meaning (looked up in the category) or (X, scheme, value, meaning).
ROWS = [
    # --- abdomen (BiomedParse CT/MRI abdomen, SegVol, SAT, TotalSegmentator) ---
    ("liver", "hepatic parenchyma", AS, "Liver", None, None, None, None),
    ("spleen", "", AS, "Spleen", None, None, None, None),
    ("kidney", "kidneys;both kidneys", AS, "Kidney", None, None, None, (185, 102, 83)),
    ("kidney_left", "left kidney;l kidney", AS, "Kidney", "Left", None, None, None),
    ("kidney_right", "right kidney;r kidney", AS, "Kidney", "Right", None, None, None),
    ("adrenal_gland", "adrenal gland;adrenal glands;adrenal;suprarenal gland", AS, "Adrenal gland", None, None, None,
     (249, 186, 150)),
    ("adrenal_gland_left", "left adrenal gland;left adrenal", AS, "Adrenal gland", "Left", None, None, None),
    ("adrenal_gland_right", "right adrenal gland;right adrenal", AS, "Adrenal gland", "Right", None, None, None),
    ("gallbladder", "gall bladder", AS, "Gallbladder", None, None, None, None),
    ("pancreas", "", AS, "Pancreas", None, None, None, None),
    ("stomach", "", AS, "Stomach", None, None, None, None),
    ("esophagus", "oesophagus", AS, "Esophagus", None, None, None, None),
    ("duodenum", "", AS, "Duodenum", None, None, None, None),
    ("small_bowel", "small intestine;small bowel", AS, "Small Intestine", None, None, None, None),
    ("colon", "large intestine;large bowel", AS, "Colon", None, None, None, None),
    ("rectum", "", AS, "Rectum", None, None, None, (204, 168, 143)),
    ("urinary_bladder", "bladder;urinary bladder", AS, "Bladder", None, None, None, None),
    ("prostate", "prostate gland", AS, "Prostate", None, None, None, None),
    ("uterus", "", AS, "Uterus", None, None, None, None),
    ("aorta", "abdominal aorta;thoracic aorta", AS, "Aorta", None, None, None, None),
    ("inferior_vena_cava", "postcava;ivc;inferior vena cava;vena cava inferior", AS, "Inferior vena cava", None, None,
     None, (0, 151, 206)),
    ("superior_vena_cava", "svc;superior vena cava", AS, "Superior vena cava", None, None, None, (0, 151, 206)),
    ("portal_vein", "portal vein;portal vein and splenic vein", AS, "Portal vein", None, None, None, (0, 151, 206)),
    ("hepatic_vein", "hepatic veins", AS, "Hepatic vein", None, None, None, (0, 151, 206)),
    ("pulmonary_artery", "", AS, "Pulmonary artery", None, None, None, None),
    # --- thorax / heart ---
    ("heart", "", AS, "Heart", None, None, None, None),
    ("heart_ventricle_left", "left ventricle;left heart ventricle;lv;left ventricle of heart", AS, "Left ventricle",
     None, None, None, None),
    ("heart_ventricle_right", "right ventricle;right heart ventricle;rv;right ventricle of heart", AS,
     "Right ventricle", None, None, None, None),
    ("heart_atrium_left", "left atrium;left heart atrium;la", AS, "Left atrium", None, None, None, None),
    ("heart_atrium_right", "right atrium;right heart atrium;ra", AS, "Right atrium", None, None, None, None),
    # Myocardium is not in the master list; SCT 74281007 as in TotalSegmentator's mapping; colour of
    # the master list's "Left ventricle" family (heart muscle).
    ("heart_myocardium", "myocardium;left ventricular myocardium;myo", AS, (X, "SCT", "74281007", "Myocardium"), None,
     None, None, (181, 85, 57)),
    ("lung", "lungs;both lungs", AS, "Lung", None, None, None, (197, 165, 145)),
    ("lung_left", "left lung", AS, "Lung", "Left", None, None, None),
    ("lung_right", "right lung", AS, "Lung", "Right", None, None, None),
    ("trachea", "", AS, "Trachea", None, None, None, None),
    ("thyroid_gland", "thyroid;thyroid gland", AS, "Thyroid", None, None, None, None),
    # --- neuro (deepbet "brain", BraTS) ---
    ("brain", "whole brain;brain mask;brain tissue", AS, "Brain", None, None, None, None),
    ("brain_stem", "brainstem;brain stem", AS, "Brain stem", None, None, None, (119, 159, 176)),
    ("gray_matter", "grey matter;gray matter", AS, "Gray Matter", None, None, None, None),
    ("white_matter", "white matter", AS, "White Matter", None, None, None, (250, 250, 225)),
    ("spinal_cord", "", AS, "Spinal cord", None, None, None, None),
    # --- musculoskeletal / generic tissue ---
    ("bone", "bones;skeleton", TI, "Bone", None, None, None, None),
    ("vertebra", "vertebrae;vertebral body", AS, "Vertebra", None, None, None, (241, 214, 145)),
    ("rib", "ribs", AS, "Rib", None, None, None, None),
    ("femur", "", AS, "Femur", None, None, None, (241, 214, 145)),
    ("femur_left", "left femur;head of left femur", AS, "Femur", "Left", None, None, (241, 214, 145)),
    ("femur_right", "right femur;head of right femur", AS, "Femur", "Right", None, None, (241, 214, 145)),
    ("muscle", "skeletal muscle;muscles", TI, "Muscle", None, None, None, None),
    ("fat", "body fat;adipose tissue;subcutaneous fat", TI, "Body fat", None, None, None, None),
    ("skin", "", TI, "Skin", None, None, None, None),
    ("lymph_node", "lymph nodes;lymph node", TI, "Lymph node", None, None, None, None),
    ("vessel", "vessels;blood vessel;blood vessels;vasculature", TI, "Blood vessel", None, None, None, (216, 101, 79)),
    ("connective_tissue", "connective tissue cells;connective tissue", TI, "Connective tissue", None, None, None, None),
    ("fluid", "body fluid;effusion", BS, "Body fluid", None, None, None, None),
    # --- lesions (BiomedParse: tumour, nodule, lesion, polyp, edema, COVID-19 infection ...) ---
    # The master list has no colour for Neoplasm/Nodule: the colour of its "Mass" entry is used.
    ("tumor", "tumour;neoplasm;tumors;tumor mass;cancer", MA, "Neoplasm", None, None, None, (144, 238, 144)),
    ("metastasis", "metastases;secondary neoplasm", MA, "Neoplasm, Secondary", None, None, None, (144, 238, 144)),
    ("mass", "", MA, "Mass", None, None, None, None),
    ("nodule", "nodules", MA, "Nodule", None, None, None, (144, 238, 144)),
    ("cyst", "cysts", MA, "Cyst", None, None, None, None),
    ("kidney_cyst_left", "left kidney cyst", MA, "Cyst", None, "Kidney", "Left", None),
    ("kidney_cyst_right", "right kidney cyst", MA, "Cyst", None, "Kidney", "Right", None),
    ("edema", "oedema;peritumoral edema;retinal edema", MA, "Edema", None, None, None, None),
    ("hemorrhage", "haemorrhage;bleeding;intracerebral hemorrhage", MA, "Hemorrhage", None, None, None, None),
    ("necrosis", "necrotic core;necrotic tumor core;necrotic tumour core", MA, "Necrosis", None, None, None, None),
    ("blood_clot", "clot;thrombus", MA, "Blood clot", None, None, None, None),
    ("embolus", "embolism;pulmonary embolism", MA, "Embolus", None, None, None, None),
    # Lesion (SCT 52988006) and Polyp (SCT 41329004) are not in the master list.
    ("lesion", "lesions;skin lesion;pet lesion;whole-body lesion", MA, (X, "SCT", "52988006", "Lesion"), None, None,
     None, (144, 238, 144)),
    ("polyp", "polyps;neoplastic polyp;non-neoplastic polyp;colon polyp", MA, (X, "SCT", "41329004", "Polyp"), None,
     None, None, (144, 238, 144)),
    # Brain tumour sub-regions (BraTS): the master list has no sub-region codes; they are neoplasms of
    # the brain and the segment name keeps the sub-region.
    ("tumor_core", "tumor core;tumour core", MA, "Neoplasm", None, "Brain", None, (144, 238, 144)),
    ("enhancing_tumor", "enhancing tumor;enhancing tumour;enhancing tissue", MA, "Neoplasm", None, "Brain", None,
     (255, 182, 193)),
    ("non_enhancing_tumor", "non-enhancing tumor;non enhancing tumor;non-enhancing tumour", MA, "Neoplasm", None,
     "Brain", None, (186, 85, 211)),
    ("whole_tumor", "whole tumor;whole tumour", MA, "Neoplasm", None, "Brain", None, (144, 238, 144)),
    # COVID-19 infiltrate as in TotalSegmentator's mapping (SCT 47351003 + 840539006), region Lung.
    ("lung_covid_infiltrate",
     "covid-19 infection;covid 19 infection;covid-19;covid infection;infection;viral pneumonia",
     MA, (X, "SCT", "47351003", "Infiltrate"), (X, "SCT", "840539006", "COVID-19"), "Lung", None, (255, 160, 122)),
    # Fundus: the master lists have no optic disc / optic cup codes; a generic anatomical structure
    # in the Eye region, named by the prompt.
    ("optic_disc", "optic disc;optic disk", AS, (X, "SCT", "123037004", "Anatomical Structure"), None, "Eye", None,
     (255, 215, 0)),
    ("optic_cup", "optic cup", AS, (X, "SCT", "123037004", "Anatomical Structure"), None, "Eye", None, (255, 140, 0)),
    # Pathology cell classes: Cell (SCT 4421005, DICOM CID 7150 via pydicom's codes).
    ("cell", "cells;neoplastic cells;inflammatory cells;epithelial cells", TI, (X, "SCT", "4421005", "Cell"), None,
     None, None, (160, 120, 200)),
]

HEADER_GROUPS = ["SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
                 "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence",
                 "AnatomicRegionModifierSequence"]


def header():
    cols = ["Structure"]
    for g in HEADER_GROUPS:
        cols += [f"{g}.CodingSchemeDesignator", f"{g}.CodeValue", f"{g}.CodeMeaning"]
    return cols + ["RecommendedDisplayRGBValue", "Synonyms"]


def _code(e):
    return (e["CodingSchemeDesignator"], e["CodeValue"], e["CodeMeaning"])


def _find(items, meaning, what):
    for e in items:
        if e["CodeMeaning"].lower() == meaning.lower():
            return e
    raise SystemExit(f"{what} '{meaning}' not found in the terminology tables")


def build(term_dir: Path):
    master = json.loads((term_dir / "SegmentationCategoryTypeModifier-DICOM-Master.term.json").read_text())
    general = json.loads((term_dir / "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.term.json").read_text())
    anatomic = json.loads((term_dir / "AnatomicRegionAndModifier-DICOM-Master.term.json").read_text())
    cats = master["SegmentationCodes"]["Category"]
    general_colors = {t["CodeValue"]: t["recommendedDisplayRGBValue"]
                      for c in general["SegmentationCodes"]["Category"] for t in c.get("Type", [])
                      if "recommendedDisplayRGBValue" in t}
    regions = anatomic["AnatomicCodes"]["AnatomicRegion"]
    rows = []
    for key, syn, cat_m, typ, mod, region, region_mod, fallback in ROWS:
        cat = _find(cats, cat_m, "category")
        color = None
        if isinstance(typ, tuple):
            type_code, t_entry = typ[1:], {}
        else:
            t_entry = _find(cat.get("Type", []), typ, f"type in {cat_m}")
            type_code = _code(t_entry)
            color = t_entry.get("recommendedDisplayRGBValue")
        mod_code = ("", "", "")
        if isinstance(mod, tuple):
            mod_code = mod[1:]
        elif mod:
            m_entry = _find(t_entry.get("Modifier", []), mod, f"modifier of {typ}")
            mod_code = _code(m_entry)
            color = m_entry.get("recommendedDisplayRGBValue") or color
        reg_code, regmod_code = ("", "", ""), ("", "", "")
        if region:
            r_entry = _find(regions, region, "anatomic region")
            reg_code = _code(r_entry)
            if region_mod:
                regmod_code = _code(_find(r_entry.get("Modifier", []), region_mod, f"modifier of {region}"))
        color = color or general_colors.get(type_code[1]) or fallback
        if color is None:
            raise SystemExit(f"{key}: no colour in the tables; give a fallback colour")
        row = [key]
        for code in (_code(cat), type_code, mod_code, reg_code, regmod_code):
            row += [code[0], code[1], code[2]]
        rows.append(row + [" ".join(str(int(c)) for c in color), syn])
    return rows


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    default = Path(__file__).resolve().parents[1] / "BiomedParseSlicer/textseg/data/terminology.csv"
    out = Path(argv[2]) if len(argv) > 2 else default
    rows = build(Path(argv[1]))
    with open(out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header())
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main(sys.argv)
