"""SAT, Segment Anything with Text (Zhao et al., npj Digital Medicine 2025; zhaoziheng/SAT): 3D
CT/MR/PET segmentation from anatomical names, 497 SAT-DS classes. Torch-free spec; the network
is in ``network.py``/``text.py``/``loader.py``, preprocessing in ``preprocess.py``, the sliding
window in ``window.py`` and the predictor glue in ``adapter.py`` (see docs/sat.md)."""

from ...catalog import ModelSpec, WeightFile
from .vocab import names

# HF zzh99/SAT has no pinned commit in the material we know (main keeps changing: files in Nano/ were
# renamed in Aug 2024, new files came in 2025); files are taken from "main", resolved once per download.
SAT_REPO = "zzh99/SAT"
SAT_RESOLUTION = ("no commit confirmed (main changes: Nano/ renamed in Aug 2024, new files in 2025): branch main, "
                  "resolved to one commit at download for the segmentation file and its paired text encoder; a file "
                  "downloaded later keeps to that commit; commit, size and sha256 are recorded in the install")
BIOLORD_RESOLUTION = ("no commit confirmed: branch main of FremyCompany/BioLORD-2023-C, resolved to a commit at "
                      "download; commit, size and sha256 are recorded in the install")
BIOLORD_REPO = "FremyCompany/BioLORD-2023-C"
# The BioLORD-2023-C tokenizer and MPNet config are not in SAT's checkpoints (their weights are):
# they come from the BioLORD repository, stored flat in the model folder under these names.
BIOLORD_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BIOLORD_PREFIX = "biolord-"


def _biolord() -> tuple:
    return tuple(WeightFile(name=BIOLORD_PREFIX + f, repo=BIOLORD_REPO, revision="main", filename=f,
                            resolution=BIOLORD_RESOLUTION) for f in BIOLORD_FILES)


CITATION = (
    "Zhao Z., Zhang Y., Wu C., Zhang X., Zhou X., Zhang Y., Wang Y., Xie W. Large-vocabulary segmentation for "
    "medical images with text prompts. npj Digital Medicine 2025 (arXiv:2312.17183)."
)
LICENSE = "not stated upstream (zhaoziheng/SAT and zzh99/SAT state no license)"
COMMON = dict(
    family="sat",
    version="v1",
    dims=3,
    modalities=("CT", "MRI", "PET"),
    adapter="textseg.models.sat.adapter:SATAdapter",
    prompt_kinds=("text",),
    license=LICENSE,
    citation=CITATION,
    homepage="https://github.com/zhaoziheng/SAT",
    vocabulary=names(),
    free_text=True,
)

SPECS = [
    ModelSpec(
        id="sat-nano",
        title="SAT-Nano (3D CT/MR/PET, 497 text classes)",
        files=(
            WeightFile(name="nano.pth", repo=SAT_REPO, revision="main", filename="Nano/nano.pth",
                       resolution=SAT_RESOLUTION),
            WeightFile(name="nano_text_encoder.pth", repo=SAT_REPO, revision="main",
                       filename="Nano/nano_text_encoder.pth", resolution=SAT_RESOLUTION),
        ) + _biolord(),
        description=(
            "U-Net (110 M) + text-query transformer decoder trained on 72 datasets (SAT-DS); knowledge-enhanced "
            "BioLORD text tower. Segments anatomy and lesions named in text; 288x288x96 patches at 1x1x3 mm."
        ),
        **COMMON,
    ),
    ModelSpec(
        id="sat-pro",
        title="SAT-Pro (3D CT/MR/PET, 497 text classes)",
        files=(
            WeightFile(name="SAT_Pro.pth", repo=SAT_REPO, revision="main", filename="Pro/SAT_Pro.pth",
                       resolution=SAT_RESOLUTION),
            WeightFile(name="text_encoder.pth", repo=SAT_REPO, revision="main", filename="Pro/text_encoder.pth",
                       resolution=SAT_RESOLUTION),
        ) + _biolord(),
        description=(
            "Large U-Net (447 M) + text-query transformer decoder trained on 72 datasets (SAT-DS); more accurate and "
            "slower than SAT-Nano (about 34 GB GPU memory upstream)."
        ),
        **COMMON,
    ),
]
