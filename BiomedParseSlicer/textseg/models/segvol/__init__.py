"""SegVol (Du et al., NeurIPS 2024; BAAI-DCAI/SegVol, MIT): 3D CT segmentation from text, box and
point prompts with zoom-out-zoom-in inference. Torch-free spec; the network lives in
``network.py`` and the inference steps in ``adapter.py`` (see docs/segvol.md)."""

from ...catalog import ModelSpec, WeightFile

# HF BAAI/SegVol commit 516701d ("add quickstart (#3)") is the last commit that changed
# pytorch_model.bin (724 MB, keys prefixed ``model.``); later commits only edit the remote code.
HF_REVISION = "516701d5bef430604a13f5db7ce896149d075663"

# Category names used in SegVol's training sets (M3D-Seg dataset_info, demo config); offered for
# autocomplete only - SegVol accepts free text through its CLIP text tower.
VOCABULARY = (
    "liver", "kidney", "left kidney", "right kidney", "spleen", "pancreas", "stomach", "gallbladder",
    "esophagus", "aorta", "postcava", "inferior vena cava", "portal vein and splenic vein", "duodenum",
    "bladder", "prostate", "uterus", "left adrenal gland", "right adrenal gland", "colon", "intestine",
    "rectum", "small bowel", "liver tumor", "kidney tumor", "pancreas tumor", "colon cancer", "hepatic vessel",
    "lung", "left lung", "right lung", "lung tumor", "lung nodule", "heart", "trachea", "brain", "brainstem",
    "spinal cord", "left femoral head", "right femoral head", "optic nerve", "parotid gland", "mandible",
    "thyroid gland", "left parotid gland", "right parotid gland", "vertebrae", "rib", "sacrum", "pelvis",
    "adrenal gland", "kidney cyst", "COVID-19 infection",
)

SPECS = [
    ModelSpec(
        id="segvol",
        family="segvol",
        title="SegVol (3D CT: text, box and point prompts)",
        version="v1",
        dims=3,
        modalities=("CT",),
        adapter="textseg.models.segvol.adapter:SegVolAdapter",
        prompt_kinds=("text", "box", "point"),
        files=(
            WeightFile(name="pytorch_model.bin", repo="BAAI/SegVol", revision=HF_REVISION, filename="pytorch_model.bin",
                       fallback="main",
                       resolution="commit confirmed publicly only by its prefix 516701d; should the hub not know it, "
                                  "branch main is resolved instead (later commits did not change the weights); the "
                                  "commit, size and sha256 downloaded are recorded in the install"),
        ),
        license="MIT",
        citation=(
            "Du Y., Bai F., Huang T., Zhao B. SegVol: Universal and Interactive Volumetric Medical Image "
            "Segmentation. NeurIPS 2024 (arXiv:2311.13385)."
        ),
        homepage="https://github.com/BAAI-DCAI/SegVol",
        description=(
            "ViT-B 3D foundation model trained on 90k unlabeled and 6k labeled CTs; zoom-out-zoom-in inference. "
            "CT only; prompts are anatomical names (free text), optionally with a box or points."
        ),
        vocabulary=VOCABULARY,
        free_text=True,
    )
]
