"""A deterministic, weight-free adapter that exists only to test the engine's plumbing
(geometry, batching, progress, cancel, server). Hidden: never offered to users as a model.

Prompts: a tissue name with an HU range (``bone`` 200..3000, ``air`` -2000..-500, ``fat``
-150..-50, ``soft tissue`` -50..150) or an explicit range ``LOW..HIGH``, optionally followed by
``left`` / ``right`` / ``superior`` / ``inferior``, which keeps the half of the image on that side
of the patient. The side words make the output depend on orientation, so geometry tests fail if
the canonical orientation is wrong. ``nothing`` gives existence 0.
"""

from ...catalog import ModelSpec

_COMMON = dict(
    family="synthetic",
    version="1",
    modalities=("CT", "MRI", "PET", "X-Ray", "Pathology", "Ultrasound", "Fundus", "Endoscopy", "Dermoscopy", "OCT"),
    prompt_kinds=("text", "box", "point"),
    license="Apache-2.0",
    description="Test-only thresholding adapter (never a segmentation model).",
    existence_threshold=0.5,
    hidden=True,
)

SPECS = [
    ModelSpec(id="synthetic-3d", title="Synthetic 3D (tests only)", dims=3,
              adapter="textseg.models.synthetic.adapter:Synthetic3D", **_COMMON),
    ModelSpec(id="synthetic-2d", title="Synthetic slice-wise (tests only)", dims=2,
              adapter="textseg.models.synthetic.adapter:Synthetic2D", **_COMMON),
]
