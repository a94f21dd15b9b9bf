"""BiomedParse v2 (2.5D slice-wise, BoltzFormer decoder) catalog entry and vocabulary. Torch-free.

Targets are upstream's README "Supported Tasks" (microsoft/BiomedParse branch v2 @ f571d5c), written as
the plain target names the challenge prompts use. Upstream takes free sentences; the released model was
trained on the CVPR 2025 challenge sentences, e.g. "Visualization of the liver in abdominal CT imaging"
(examples/imgs/CT_AMOS_amos_0018.npz). ``prompt_sentence`` applies that template for the user.
"""

from __future__ import annotations

from typing import Optional

from ....catalog import ModelSpec, WeightFile

TARGETS: dict[str, tuple[str, ...]] = {
    "CT": (
        "spleen", "liver", "gallbladder", "stomach", "pancreas", "duodenum", "small bowel", "colon", "esophagus",
        "right kidney", "left kidney", "right adrenal gland", "left adrenal gland", "bladder", "prostate", "uterus",
        "aorta", "superior vena cava", "inferior vena cava", "pulmonary vein", "brachiocephalic trunk",
        "portal vein and splenic vein", "heart", "left lung", "right lung", "left upper lobe of lung",
        "left lower lobe of lung", "right upper lobe of lung", "right middle lobe of lung",
        "right lower lobe of lung", "trachea", "airway tree", "thyroid", "brainstem", "spinal cord", "brain",
        "skull", "sacrum", "liver tumor", "kidney lesion", "lung lesion", "pancreas tumor", "colon cancer",
        "COVID-19 lesion", "whole-body lesion", "lymph node", "adrenocortical carcinoma",
        "left gluteus maximus", "right gluteus maximus", "left iliopsoas", "right iliopsoas",
        "left autochthon", "right autochthon", "left femur", "right femur", "left hip", "right hip",
    ),
    "MRI": (
        "spleen", "liver", "gallbladder", "stomach", "pancreas", "duodenum", "small bowel", "colon", "esophagus",
        "bladder", "prostate", "uterus", "cecum", "appendix", "ascending colon", "transverse colon",
        "descending colon", "sigmoid colon", "rectum", "prostate transition zone", "prostate lesion",
        "left ventricle", "right ventricle", "myocardium", "left atrium", "right atrium", "left lung", "right lung",
        "aorta", "pulmonary artery", "brain", "brain tumor", "stroke lesion", "vestibular schwannoma",
        "non-enhancing tumor core", "non-enhancing FLAIR hyperintensity", "enhancing tissue", "resection cavity",
        "white matter hyperintensities", "intervertebral discs", "spinal canal", "spinal cord", "sacrum",
    ),
    "Ultrasound": ("left ventricle", "myocardium", "left atrium", "thyroid", "carotid artery", "jugular vein",
                   "brain tumor", "soleus", "gastrocnemius medialis", "gastrocnemius lateralis"),
    "PET": ("whole-body lesion",),
    "Microscopy": ("endolysosomes", "mitochondria", "nuclei", "neuronal ultrastructure", "synaptic clefts", "axon",
                   "brain neural activity", "Alzheimer's plaque", "vessel"),
}

# Modality words of the challenge sentences ("abdominal CT", "post-contrast T1-weighted MR", "cardiac Ultrasound").
MODALITY_WORDS = {"CT": "CT", "MRI": "MR", "Ultrasound": "Ultrasound", "PET": "PET", "Microscopy": "Microscopy"}
REGION_WORDS = {"abdomen": "abdominal", "pelvis": "pelvic", "lung": "chest", "chest": "chest", "liver": "abdominal",
                "pancreas": "abdominal", "colon": "abdominal", "brain": "head", "head": "head", "neck": "neck",
                "cardiac": "cardiac", "heart": "cardiac"}
MODALITIES = tuple(TARGETS)
CT_SITES = ("abdomen", "lung", "pelvis", "liver", "colon", "pancreas")
EXISTENCE_THRESHOLD = 0.5  # upstream inference.py: keep a prompt on a slice if sigmoid(existence) > 0.5


def prompt_sentence(target: str, modality: str, site: Optional[str] = None) -> str:
    """Upstream's challenge sentence for a bare target; a sentence (3+ words) is passed through unchanged."""
    target = target.strip()
    if len(target.split()) > 3 or " in " in target:
        return target
    words = [REGION_WORDS.get((site or "").lower(), ""), MODALITY_WORDS.get(modality, modality)]
    return f"Visualization of the {target} in {' '.join(w for w in words if w)} imaging"


def vocabulary() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for targets in TARGETS.values():
        for t in targets:
            seen.setdefault(t, None)
    return tuple(seen)


SPEC = ModelSpec(
    id="biomedparse-v2",
    family="biomedparse",
    title="BiomedParse v2 (BoltzFormer, 2.5D slice-wise)",
    version="v2",
    dims=2,
    modalities=MODALITIES,
    adapter="textseg.models.biomedparse.v2.adapter:BiomedParseV2Adapter",
    prompt_kinds=("text",),
    sites=CT_SITES,
    files=(
        # The revision biomedparse-mlx pins; size and sha256 are the published ones of that revision. Should
        # the hub not know the commit, branch main is resolved, and its file must still have this sha256.
        WeightFile(name="biomedparse_v2.ckpt", repo="microsoft/BiomedParse",
                   revision="e473e5b2b1a3f44649734afd3dc7cf1770aaa9e2", filename="biomedparse_v2.ckpt", gated=True,
                   size=4_460_902_829, sha256="6ea0bee43b983a7490e0b48689add96440c4405ca4b50b9f2fe21d5d03fd9440",
                   fallback="main",
                   resolution="commit pinned by biomedparse-mlx, with its published size and sha256"),
    ),
    license="CC-BY-NC-SA-4.0",
    citation="Zhao T. et al. A foundation model for joint segmentation, detection and recognition of biomedical "
             "objects across nine modalities. Nature Methods 22, 166-176 (2025); Zhao T. et al. Boltzmann Attention "
             "Sampling for Image Analysis with Small Objects. CVPR 2025.",
    homepage="https://github.com/microsoft/BiomedParse/tree/v2",
    description="Text-prompted 3D segmentation slice by slice (512x512, [current, previous, next] slices as "
                "channels) with a built-in per-slice existence classifier.",
    threshold=0.5,
    existence_threshold=EXISTENCE_THRESHOLD,
    recognition=True,
    vocabulary=vocabulary(),
    free_text=True,
)

SPECS = [SPEC]
