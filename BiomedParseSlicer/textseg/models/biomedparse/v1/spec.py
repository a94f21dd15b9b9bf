"""BiomedParse v1 (2D) catalog entry and vocabulary. Torch-free.

Targets per image type are upstream's ``BIOMED_OBJECTS`` (``utilities/constants.py`` @ 750eb40);
``IMAGE_TYPES`` maps each of upstream's 14 image types to our (modality, sites) presets. The
existence test's Beta parameters (``target_dist.json``) are gated data from the same HF repo and
hold a few extra aliases per image type (e.g. CT-Abdomen: kidney, adrenal gland).
"""

from __future__ import annotations

from typing import Optional

from ....catalog import ModelSpec, WeightFile

BIOMED_OBJECTS: dict[str, tuple[str, ...]] = {
    "CT-Abdomen": ("postcava", "aorta", "right kidney", "left kidney", "duodenum", "pancreas", "liver", "spleen",
                   "stomach", "gallbladder", "left adrenal gland", "right adrenal gland", "esophagus"),
    "CT-Chest": ("nodule", "COVID-19 infection", "tumor"),
    "CT-Liver": ("vessel", "tumor"),
    "MRI-Abdomen": ("aorta", "postcava", "right kidney", "duodenum", "left kidney", "liver", "pancreas", "gallbladder",
                    "stomach", "spleen", "left adrenal gland", "right adrenal gland", "esophagus"),
    "MRI-Cardiac": ("left heart ventricle", "myocardium", "right heart ventricle"),
    "MRI-FLAIR-Brain": ("edema", "tumor core"),
    "MRI-T1-Gd-Brain": ("enhancing tumor", "non-enhancing tumor"),
    "Pathology": ("connective tissue cells", "inflammatory cells", "neoplastic cells", "epithelial cells"),
    "X-Ray-Chest": ("left lung", "right lung"),
    "Ultrasound-Cardiac": ("left heart atrium", "left heart ventricle"),
    "Endoscopy": ("neoplastic polyp", "non-neoplastic polyp"),
    "Fundus": ("optic cup", "optic disc"),
    "Dermoscopy": ("lesion",),
    "OCT": ("edema",),
}

# image type -> (our modality, preset sites it applies to; empty = any site)
IMAGE_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "CT-Abdomen": ("CT", ("abdomen", "pelvis", "pancreas", "colon")),
    "CT-Chest": ("CT", ("lung",)),
    "CT-Liver": ("CT", ("liver",)),
    "MRI-Abdomen": ("MRI", ("abdomen",)),
    "MRI-Cardiac": ("MRI", ("cardiac", "heart")),
    "MRI-FLAIR-Brain": ("MRI", ("brain", "flair")),
    "MRI-T1-Gd-Brain": ("MRI", ("brain", "t1-gd")),
    "Pathology": ("Pathology", ()),
    "X-Ray-Chest": ("X-Ray", ()),
    "Ultrasound-Cardiac": ("Ultrasound", ()),
    "Endoscopy": ("Endoscopy", ()),
    "Fundus": ("Fundus", ()),
    "Dermoscopy": ("Dermoscopy", ()),
    "OCT": ("OCT", ()),
}

MODALITIES = ("CT", "MRI", "X-Ray", "Pathology", "Ultrasound", "Fundus", "Endoscopy", "Dermoscopy", "OCT")
CT_SITES = ("abdomen", "lung", "pelvis", "liver", "colon", "pancreas")
P_VALUE_THRESHOLD = 0.05  # upstream notebook: "recommended threshold 0.05"


def image_types_for(modality: str, site: Optional[str] = None) -> list[str]:
    """Upstream image types of a preset: those of the modality whose sites include the preset's
    site, or all of the modality's types when none does (e.g. MRI without a site)."""
    cands = [t for t, (m, _) in IMAGE_TYPES.items() if m == modality]
    matching = [t for t in cands if site and site.lower() in IMAGE_TYPES[t][1]]
    return matching or cands


def vocabulary() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for targets in BIOMED_OBJECTS.values():
        for t in targets:
            seen.setdefault(t, None)
    return tuple(seen)


V1_RESOLUTION = ("no commit confirmed: branch main, resolved to a commit at download (both files from that "
                 "commit); commit, size and sha256 are recorded in the install")

SPEC = ModelSpec(
    id="biomedparse-v1",
    family="biomedparse",
    title="BiomedParse v1 (2D, slice-wise)",
    version="v1",
    dims=2,
    modalities=MODALITIES,
    adapter="textseg.models.biomedparse.v1.adapter:BiomedParseV1Adapter",
    prompt_kinds=("text",),
    sites=CT_SITES,
    files=(
        # The HF repo names no commit for the v1 files in the material we have: "main" until a
        # user-verified revision is pinned. Both files are gated (accept the licence on the hub).
        WeightFile(name="biomedparse_v1.pt", repo="microsoft/BiomedParse", revision="main",
                   filename="biomedparse_v1.pt", gated=True, resolution=V1_RESOLUTION),
        WeightFile(name="target_dist.json", repo="microsoft/BiomedParse", revision="main",
                   filename="target_dist.json", gated=True, resolution=V1_RESOLUTION),
    ),
    license="CC-BY-NC-SA-4.0",
    citation="Zhao T. et al. A foundation model for joint segmentation, detection and recognition of biomedical "
             "objects across nine modalities. Nature Methods 2025.",
    homepage="https://github.com/microsoft/BiomedParse",
    description="2D text-prompted segmentation (1024x1024 per slice) for nine modalities; existence by the "
                "upstream K-S p-value test (target_dist.json).",
    threshold=0.5,
    existence_threshold=P_VALUE_THRESHOLD,
    recognition=True,
    vocabulary=vocabulary(),
    free_text=True,
)

SPECS = [SPEC]
