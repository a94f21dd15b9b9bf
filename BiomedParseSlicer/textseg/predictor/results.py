"""What a prompt run returns: ``PromptResult`` on the input grid, built with its masks, messages and provenance."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..detection import detect_objects
from ..models.base import DeferredMap, ModelAdapter
from ..presets import Preset
from ..prompts import Prompt
from ..volume import Volume


@dataclass
class PromptResult:
    """The answer to one prompt, on the input volume's grid."""

    prompt: Prompt
    probability: np.ndarray  # float32 (k, j, i) in [0, 1]; a property (below): may be computed on first read
    mask: np.ndarray  # uint8 (k, j, i), 0/1
    existence: Optional[float]  # 0..1, None when the model has no existence test
    present: bool  # False: the existence test says the target is not in the image
    provenance: dict[str, Any]
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = True  # False: cancelled part-way (2D models: only some slices were processed)
    # Detection (textseg.detection): per object label, voxel_count, bbox_min/bbox_max/centroid (LPS mm, voxel
    # centres), index_min/index_max (i, j, k); one object per instance when ``instances`` is set.
    objects: list[dict[str, Any]] = field(default_factory=list)
    instances: Optional[np.ndarray] = None  # int32 (k, j, i) instance labels (0 = none), from an instance split

    @property
    def name(self) -> str:
        return self.extra.get("name") or self.prompt.label

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def probability_ready(self) -> bool:
        """False while the probability map is still deferred (computed on first read)."""
        return not _is_deferred(self.__dict__.get("_probability"))


def _is_deferred(value: Any) -> bool:
    return callable(value) and not isinstance(value, np.ndarray)


def _get_probability(self: PromptResult) -> np.ndarray:
    value = self.__dict__["_probability"]
    if _is_deferred(value):  # computed on first read, then kept
        value = self.__dict__["_probability"] = value()
    return value


def _set_probability(self: PromptResult, value: Any) -> None:
    self.__dict__["_probability"] = value


# ``probability`` may be given as a zero-argument callable (a picklable one: results travel between
# processes) that computes the map on first read: the predictor does so for maps that are costly to bring
# onto the input grid (textseg.models.base.DeferredMap), so callers that use only masks never pay for them.
PromptResult.probability = property(  # type: ignore[assignment]
    _get_probability, _set_probability, doc="float32 (k, j, i) in [0, 1] on the input grid (computed on first read)")


@dataclass(frozen=True, eq=False)
class OnInputGrid:
    """A deferred canonical map, put on a volume's input grid when called (picklable: no volume array)."""

    deferred: Any  # DeferredMap
    orientation: Any  # Volume.orientation
    shape: tuple[int, ...]

    def __call__(self) -> np.ndarray:
        return self.orientation.onto_grid(np.asarray(self.deferred.array(), np.float32), self.shape)


@dataclass
class ResultMaker:
    """Turns a canonical probability map into a ``PromptResult`` on ``volume``'s grid: threshold, the
    existence verdict and its message, detection, provenance (model, weights, engine, prompt, preset,
    threshold, device, timing, seed)."""

    adapter: ModelAdapter
    volume: Volume
    preset: Preset
    device: Any
    seed: Optional[int]
    log: Any  # Callable[[str], None]

    def make(self, prompt: Prompt, prob_canonical: Any, existence: Optional[float], extra: dict[str, Any],
             thr: float, keep_absent: bool, seconds: float, detect: bool = True) -> PromptResult:
        spec, volume = self.adapter.spec, self.volume
        if isinstance(prob_canonical, DeferredMap):  # the mask only; the map itself on first read
            mask = volume.to_input_grid(prob_canonical.mask(thr))
            prob: Any = OnInputGrid(prob_canonical, volume.orientation, tuple(volume.shape))
        else:
            prob = volume.to_input_grid(np.asarray(prob_canonical, dtype=np.float32))
            mask = (prob >= thr).astype(np.uint8) if thr > 0 else (prob > 0).astype(np.uint8)
        present = True
        message = ""
        et = spec.existence_threshold
        if existence is not None and et is not None and existence < et:
            present = False
            if keep_absent:
                message = (f"'{prompt.label}' is probably not in this image (existence {existence:.2f} < {et}); mask "
                           f"kept as asked.")
            else:
                mask[:] = 0
                message = (
                    f"'{prompt.label}' is probably not in this image (existence {existence:.2f} < {et}): "
                    "mask dropped. Use keep_absent / --keep-absent to keep it anyway."
                )
        elif not mask.any():
            message = f"'{prompt.label}': the model found nothing above threshold {thr}."
        if message:
            self.log(message)
        provenance = {
            "model": spec.id,
            "model_version": spec.version,
            "weights_revision": self.adapter.weights_revision,
            "weights": self.adapter.weights_files,
            "engine": f"textseg {__version__}",
            "prompt": prompt.to_dict(),
            "modality": self.preset.modality,
            "site": self.preset.site or "",
            "threshold": thr,
            "existence": None if existence is None else round(float(existence), 4),
            "device": str(self.device),
            "seconds": round(seconds, 3),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.seed is not None:
            provenance["seed"] = self.seed
        r = PromptResult(prompt, prob, mask, existence, present, provenance, message, dict(extra))
        if detect:
            r.objects = detect_objects(volume, mask, r.name)
        return r


def mark_partial(r: PromptResult, first: int, done: int, stop: int) -> None:
    """A slice-wise result cut short by a cancel: canonical slices ``first:done`` of ``first:stop`` were run."""
    r.complete = False
    r.extra["slices_done"] = [first, done]
    partial = f"Partial: cancelled after slices {first}:{done} of {first}:{stop}."
    r.message = f"{r.message} {partial}" if r.message else partial
