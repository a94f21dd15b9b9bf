"""The model catalog: one source of truth for the CLI, the server's /models and the Slicer panel.

Importable without torch. Each model family declares its specs in the (torch-free)
``textseg.models.<family>`` package; this module collects them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UsageError

# Families whose specs are collected. Each module exposes SPECS: list[ModelSpec].
_FAMILY_MODULES = (
    "textseg.models.deepbet",
    "textseg.models.biomedparse",
    "textseg.models.synthetic",
    "textseg.models.segvol",
    "textseg.models.sat",
)


@dataclass(frozen=True)
class WeightFile:
    """One file a model needs. ``repo``/``revision``/``filename`` locate it on the HuggingFace hub;
    ``url`` overrides that for non-hub files; ``package`` names a PyPI package that ships the file
    inside it (then nothing is downloaded).

    ``revision`` is a commit (40 hex digits: a pin) or a branch. A branch is resolved to a commit once
    per download of a model (every file of the model from that commit). ``size``/``sha256`` are the
    pinned file's, where published. ``resolution`` says how a revision that is not a confirmed pin with
    a checksum is known or resolved (``textseg models list`` shows it). ``fallback`` names the branch
    resolved instead when the pinned commit is not on the hub (then the file's sha256, if the catalog
    has one, still has to match); None: a missing pin is an error. What was resolved (commit, size,
    sha256) is recorded in the install (``textseg.weights.provenance``)."""

    name: str  # file name in the model's local folder
    repo: str = ""
    revision: str = "main"
    filename: str = ""
    size: Optional[int] = None
    sha256: Optional[str] = None
    gated: bool = False
    url: Optional[str] = None
    package: Optional[str] = None
    package_path: Optional[str] = None  # path inside the installed package
    resolution: str = ""
    fallback: Optional[str] = None


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str
    title: str
    version: str
    dims: int  # 2: slice-wise, 3: volumetric
    modalities: tuple[str, ...]
    adapter: str  # "module:Class", imported only when the model runs
    prompt_kinds: tuple[str, ...] = ("text",)
    sites: tuple[str, ...] = ()  # CT sites (presets) the model accepts; empty = any/none
    files: tuple[WeightFile, ...] = ()
    license: str = ""
    citation: str = ""
    homepage: str = ""
    description: str = ""
    threshold: float = 0.5  # probability threshold for the binary mask
    existence_threshold: Optional[float] = None  # None: the model has no existence test
    recognition: bool = False  # "segment everything" supported
    vocabulary: tuple[str, ...] = ()  # known targets (autocomplete/validation); empty = free text
    free_text: bool = True  # False: prompts must come from the vocabulary
    hidden: bool = False  # never offered to users (test-only adapters)
    benchmarks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return d


_REGISTRY: dict[str, ModelSpec] = {}
_LOADED = False


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.id] = spec
    return spec


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in _FAMILY_MODULES:
        for spec in importlib.import_module(mod).SPECS:
            _REGISTRY.setdefault(spec.id, spec)
    _LOADED = True  # only now: a concurrent caller (server threads) must not see a half-filled registry


def list_models(include_hidden: bool = False) -> list[ModelSpec]:
    _load()
    show_hidden = include_hidden or os.environ.get("TEXTSEG_SHOW_TEST_MODELS") == "1"
    return [s for s in _REGISTRY.values() if show_hidden or not s.hidden]


def get_model(model_id: str) -> ModelSpec:
    _load()
    try:
        return _REGISTRY[model_id]
    except KeyError:
        known = ", ".join(s.id for s in list_models()) or "(none)"
        raise UsageError(f"Unknown model '{model_id}'. Known models: {known}. See `textseg models`.") from None
