"""The predictor contract, written once: what the local ``Predictor`` and the HTTP ``RemotePredictor`` both do.

Frames and shapes, everywhere in the contract:

* A ``Volume``'s ``array`` is indexed (k, j, i) (slice, row, column) for grey images, (k, j, i, c) for RGB; its
  geometry (spacing, origin, direction) maps voxel indices to patient coordinates in LPS millimetres.
* Every result map (``PromptResult.mask``, ``probability``, ``instances``) is on exactly the input volume's grid:
  shape ``volume.shape`` (k, j, i), whatever orientation the model works in.
* Box and point prompts are in LPS millimetres (patient coordinates, as ``Volume`` geometry), never indices.
* ``slices=(first, stop)`` counts canonical slices: the slice axis of the volume re-ordered closest to LPS
  (``Volume.canonical``), inferior to superior for axial images, first..stop-1.
* ``progress(fraction, stage)``: fraction 0..1 of the whole call, a short stage text; ``cancel``: a
  ``textseg.runcontrol.CancelToken`` checked between steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union, runtime_checkable

from ..catalog import ModelSpec
from ..errors import UsageError
from ..prompts import Prompt, parse_prompts
from ..runcontrol import CancelToken, ProgressFn
from ..volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from .results import PromptResult

PromptLike = Union[str, Prompt, dict[str, Any]]


@runtime_checkable
class PredictorProtocol(Protocol):
    """Encode an image once, answer many prompts (cf. segment-anything's SamPredictor).

    Implemented by ``textseg.predictor.Predictor`` (local, torch) and ``textseg.remote.client.RemotePredictor``
    (HTTP); ``Testing/engine/test_predictor_protocol.py`` runs the same tests against both."""

    spec: ModelSpec  # the model: dims (2 slice-wise, 3 volumetric), modalities, prompt kinds, vocabulary, threshold
    messages: list[str]  # what the runs said (out-of-memory fallbacks, absent targets, cancels), oldest first

    def set_image(
        self,
        volume: Volume,
        modality: Optional[str] = None,
        site: Optional[str] = None,
        slices: Optional[tuple[int, int]] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        """Check, preprocess and (3D models) encode ``volume`` once for the prompts that follow.

        ``volume.array``: (k, j, i) grey or (k, j, i, 3) RGB, any orientation (the model sees its canonical,
        closest-LPS copy). ``modality``: a preset name (CT, MRI, PET, ...; default: the model's first);
        ``site``: the CT body site. ``slices``: (first, stop) canonical slices a slice-wise model is limited to.
        Raises UsageError for what the model cannot take (modality, RGB as CT, a slice range on a 3D model),
        Cancelled when cancelled."""
        ...

    def check_prompts(self, prompts: Union[str, Sequence[PromptLike]]) -> list[Prompt]:
        """Parse and validate prompts (kinds, vocabulary) against ``spec`` without running the model.

        ``prompts``: text with one target per line, or a list of texts, ``Prompt``s or dicts (``{"text": ...,
        "box": [[x0, y0, z0], [x1, y1, z1]]}`` in LPS mm). Raises UsageError naming the first prompt the model
        cannot take."""
        ...

    def predict(
        self,
        prompts: Union[str, Sequence[PromptLike]],
        threshold: Optional[float] = None,
        keep_absent: bool = False,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
    ) -> list[PromptResult]:
        """One ``PromptResult`` per prompt, in order, on the input grid: ``mask`` uint8 (k, j, i) 0/1,
        ``probability`` float32 (k, j, i) in [0, 1].

        ``threshold``: mask = probability >= threshold (default ``spec.threshold``). Targets the model's
        existence test says are absent get an empty mask and a message unless ``keep_absent``. After a cancel:
        the prompts completed so far, and for slice-wise models the prompts' whole slices done so far as
        results with ``complete == False``; ``messages`` ends with the "kept N of M" summary."""
        ...

    def recognize(
        self,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
        **options: Any,
    ) -> list[PromptResult]:
        """"Segment everything" (``spec.recognition`` models): one ``PromptResult`` per target found, named after
        it (``result.name``), on the input grid, with detection ``objects`` (boxes and centroids in LPS mm).

        ``options``: the model family's recognition options (JSON-able). After a cancel: the targets found in
        the slices completed, with ``complete == False``. UsageError for a model without recognition."""
        ...

    def reset_image(self) -> None:
        """Forget the image (and what was encoded or uploaded for it); ``predict`` then needs ``set_image``."""
        ...


def check_prompts(spec: ModelSpec, prompts: Union[str, Sequence[PromptLike]]) -> list[Prompt]:
    """Parse and validate prompts against the model (kinds, vocabulary) without running it."""
    plist = parse_prompts(prompts)
    for p in plist:
        unsupported = set(p.kinds) - set(spec.prompt_kinds)
        if unsupported:
            raise UsageError(
                f"Model '{spec.id}' takes {'/'.join(spec.prompt_kinds)} prompts, not "
                f"{'/'.join(sorted(unsupported))} ('{p.label}')."
            )
        if not spec.free_text and p.text and spec.vocabulary and p.text.lower() not in {
            v.lower() for v in spec.vocabulary
        }:
            raise UsageError(
                f"'{p.text}' is not a target of model '{spec.id}'. Known targets: "
                f"{', '.join(spec.vocabulary[:20])}{' ...' if len(spec.vocabulary) > 20 else ''}."
            )
    return plist
