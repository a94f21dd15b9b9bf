"""What every model adapter implements (the predictor contract, model side).

The ``Predictor`` (textseg.predictor) owns geometry, devices, progress, cancel, out-of-memory
fallback, thresholds and provenance. An adapter owns only its model:

* ``load(device)``: build the network and load its weights strictly (``self.weights_dir`` holds
  the catalog files); ``to(device)`` moves it.
* ``prepare(volume, preset, ctx)``: intensity/geometry preprocessing of a *canonical* volume
  (closest-LPS array order, see textseg.volume); returns an opaque image state.
* 3D models (``spec.dims == 3``, class ``VolumeAdapter``): ``encode(state, ctx)`` once per image, then
  ``decode(encoded, prompts, ctx)`` per prompt group; return one ``Decoded`` per prompt with a
  probability map on the canonical grid (``state``'s volume shape).
* 2D models (``spec.dims == 2``, class ``SliceAdapter``): ``num_slices(state)``, ``encode_slices(state, indices, ctx)``
  for a batch of slices and ``decode_slices(encoded, prompts, ctx)`` returning, per prompt, the
  probabilities of those slices (``(len(indices), H, W)`` on the canonical grid) and an existence
  score per slice. The predictor batches slices, honours a slice range, and caches encoded
  batches, so an image is encoded once and decoded for many prompts.
* ``prompts_per_call(state)``: how many prompts one ``decode``/``decode_slices`` call takes (the class's
  ``max_prompts_per_call`` unless options or a memory budget lower it for that image).

``ctx`` (RunContext) gives ``device``, ``batch_size`` (lowered on out-of-memory), ``report(fraction)``
(progress within the predictor's current step), ``check_cancel()`` (the run's textseg.runcontrol.CancelToken)
and ``log``; adapters call ``ctx.check_cancel()`` between expensive steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np

from ..catalog import ModelSpec
from ..presets import Preset
from ..prompts import Prompt
from ..runcontrol import CancelToken, Progress, ProgressFn
from ..volume import Volume


@dataclass
class RunContext:
    """What a run hands an adapter: the device, the batch size (lowered on out-of-memory), progress within the
    predictor's current step (``report``), the cancel token (``check_cancel``), the log and the seed."""

    device: Any  # torch.device
    batch_size: int = 4
    progress: Optional[ProgressFn] = None
    cancel: Optional[CancelToken] = None
    log: Callable[[str], None] = lambda msg: None
    seed: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)
    _steps: Progress = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._steps = Progress(self.progress)

    def check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel.check()

    def report(self, fraction: float, stage: Optional[str] = None) -> None:
        """Progress within the current span (set by the predictor) as overall fraction 0..1."""
        self._steps.report(fraction, stage)

    def span(self, lo: float, hi: float, stage: str) -> None:
        """Start the step covering ``lo..hi`` of the run (the predictor's part; adapters only ``report``)."""
        self._steps.span(lo, hi, stage)


class DeferredMap:
    """A probability map on the canonical grid that is computed only when it is read.

    Adapters whose maps are costly to bring onto the canonical grid (SAT: linear resampling from its
    1x1x3 mm crop, ~1 s and 200 MB per prompt at 512x512x200) return one as ``Decoded.probability``.
    The predictor takes the mask from ``mask`` (which may compute only where the map can reach the
    threshold) and calls ``array`` only when someone reads ``PromptResult.probability``. Must pickle
    (results travel between processes)."""

    def array(self) -> np.ndarray:  # float32 [0, 1], canonical (k, j, i)
        raise NotImplementedError

    def mask(self, threshold: float) -> np.ndarray:
        """uint8 0/1: the result's mask; unless a subclass says otherwise (a recognised target: where it won),
        exactly ``array() >= threshold`` (``array() > 0`` for a threshold <= 0)."""
        a = self.array()
        return (a >= threshold if threshold > 0 else a > 0).astype(np.uint8)


@dataclass
class Decoded:
    """A model's answer for one prompt, on the canonical grid."""

    probability: Any  # np.ndarray float32 in [0, 1], canonical (k, j, i) shape, or a DeferredMap
    existence: Optional[float] = None  # probability (0..1) the target is present
    extra: dict[str, Any] = field(default_factory=dict)  # model-specific (p-values, boxes, ...)


@dataclass
class SliceDecoded:
    """A 2D model's answer for one prompt on a batch of slices."""

    probability: np.ndarray  # (n_slices, H, W) float32, canonical in-plane grid
    existence: Optional[np.ndarray] = None  # (n_slices,) probabilities, or None
    edges: Optional[np.ndarray] = None  # (n_slices, H, W) edge probabilities, only when ctx.options["edges"]


@dataclass
class SliceLabels:
    """A recognizer's verdict on a batch of slices: one target (or none) per pixel."""

    labels: np.ndarray  # (b, H, W) int: 0 = none, n = the recognizer's target n (1-based)
    probability: np.ndarray  # (b, H, W) float32: the winning target's probability, 0 where none
    scores: np.ndarray  # (N, b) each target's existence score on the slice where it was kept, NaN where not
    edges: Optional[np.ndarray] = None  # (b, H, W) bool: instance edges (only for an instance split)


class Recognizer:
    """Recognition ("segment everything") rules of a model family, for the Predictor's ``recognize``.

    The predictor decodes ``prompts`` slice batch by slice batch and calls ``slices`` on each batch with the
    probabilities (N, b, H, W), existence scores (N, b) (NaN where a prompt has none) and, if ``edges``,
    edge probabilities; at the end ``instances`` may split targets into instances (canonical grid)."""

    prompts: list[Prompt]
    names: list[str]  # result names, one per prompt
    edges: bool = False
    info: dict[str, Any]

    def slices(self, probs: np.ndarray, existence: Optional[np.ndarray],
               edges: Optional[np.ndarray] = None) -> SliceLabels:
        raise NotImplementedError

    def instances(self, labels: np.ndarray, edges: Optional[np.ndarray]) -> dict[int, np.ndarray]:
        """Target index (0-based) -> instance labels (int, 0 = none) on the canonical grid."""
        return {}


class ModelAdapter:
    """What every adapter has: its spec, weights and options, ``load``/``to`` and ``prepare``. An adapter derives
    from ``VolumeAdapter`` (``spec.dims == 3``) or ``SliceAdapter`` (``spec.dims == 2``), never from this class
    directly; the predictor checks the pairing once, when it takes the adapter."""

    dims: ClassVar[int] = 0  # 3: VolumeAdapter, 2: SliceAdapter
    # The most prompts decoded in one call (a class constant); ``prompts_per_call`` may lower it per image.
    max_prompts_per_call: ClassVar[int] = 16

    def __init__(self, spec: ModelSpec, weights_dir: Optional[Path] = None, **options: Any) -> None:
        self.spec = spec
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.options = options
        self.device: Any = None
        from ..weights import provenance, revision_summary

        # what the weight files are (commit, size, sha256 recorded at download): every result's provenance
        self.weights_files: list[dict[str, Any]] = provenance(spec, self.weights_dir) if spec.files else []
        self.weights_revision: str = revision_summary(self.weights_files) or spec.version

    # ---- lifecycle --------------------------------------------------------------------------
    def load(self, device: Any) -> None:
        raise NotImplementedError

    def to(self, device: Any) -> None:
        self.device = device

    # ---- common -----------------------------------------------------------------------------
    def prepare(self, volume: Volume, preset: Preset, ctx: RunContext) -> Any:
        raise NotImplementedError

    def prompts_per_call(self, state: Any) -> int:
        """Prompts decoded per call on the image ``state`` (what ``prepare`` returned): the class's
        ``max_prompts_per_call`` unless an adapter's options or memory budget say otherwise."""
        return self.max_prompts_per_call

    # ---- optional -----------------------------------------------------------------------------
    def free_memory(self, encoded: Any) -> None:
        """Drop what can be recomputed (feature caches) of an encoded image; called after out-of-memory."""

    def recognizer(self, preset: Preset, **options: Any) -> Recognizer:
        """The family's recognition rules for an image of ``preset`` (spec.recognition models only)."""
        from ..errors import UsageError

        raise UsageError(f"Model '{self.spec.id}' has no recognition ('segment everything').")


class VolumeAdapter(ModelAdapter):
    """A volumetric model (``spec.dims == 3``): the whole canonical volume is encoded once, then decoded per
    prompt group."""

    dims: ClassVar[int] = 3

    def encode(self, state: Any, ctx: RunContext) -> Any:
        """Encode the prepared image once; the default keeps ``state`` as it is (models that encode per prompt)."""
        return state

    def decode(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[Decoded]:
        """One ``Decoded`` per prompt: a float32 probability map (or DeferredMap) of the canonical volume's
        shape (k, j, i)."""
        raise NotImplementedError


class SliceAdapter(ModelAdapter):
    """A slice-wise (2D) model (``spec.dims == 2``) run over a volume: the predictor batches the canonical
    slices (axis k), encodes each batch once (slice cache) and decodes it for every prompt group."""

    dims: ClassVar[int] = 2

    def num_slices(self, state: Any) -> int:
        """Number of canonical slices (k) of the prepared image."""
        raise NotImplementedError

    def slice_shape(self, state: Any) -> tuple:
        """(H, W) of the canonical in-plane grid the slice probabilities are returned on."""
        raise NotImplementedError

    def encode_slices(self, state: Any, indices: Sequence[int], ctx: RunContext) -> Any:
        """Encode the canonical slices ``indices`` (consecutive, at most ``ctx.batch_size``)."""
        raise NotImplementedError

    def decode_slices(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[SliceDecoded]:
        """One ``SliceDecoded`` per prompt: (len(indices), H, W) probabilities and per-slice existence."""
        raise NotImplementedError


def check_adapter(adapter: ModelAdapter) -> None:
    """The adapter's class matches its spec: a VolumeAdapter for ``dims == 3``, a SliceAdapter for ``dims == 2``."""
    expected = {3: VolumeAdapter, 2: SliceAdapter}.get(adapter.spec.dims)
    if expected is None or not isinstance(adapter, expected):
        from ..errors import ModelError

        raise ModelError(f"Model '{adapter.spec.id}' is {adapter.spec.dims}D but its adapter "
                         f"{type(adapter).__name__} is not a {expected.__name__ if expected else 'known'} adapter.")


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors/arrays of ``obj`` (a tensor, an array, or tuples, lists, dicts of them)."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return int(obj.element_size() * obj.nelement())
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def weight_file(adapter: ModelAdapter, name: str) -> Path:
    """Local path of the catalog file ``name`` of an adapter's model (package-shipped or cached)."""
    from ..errors import WeightsError
    from ..weights import locate

    for wf in adapter.spec.files:
        if wf.name == name:
            path = locate(adapter.spec, wf, adapter.weights_dir)
            if path is None:
                raise WeightsError(f"Weight file '{name}' of model '{adapter.spec.id}' is missing: run `textseg models "
                                   f"download {adapter.spec.id}`.")
            return path
    raise KeyError(f"model '{adapter.spec.id}' has no catalog file '{name}'")
