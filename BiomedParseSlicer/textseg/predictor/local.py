"""The local predictor: encode an image once, decode many prompts (cf. segment-anything's SamPredictor).

    predictor = Predictor("deepbet", device="auto")
    predictor.set_image(volume, modality="MRI")
    results = predictor.predict(["brain"])          # one PromptResult per prompt

It implements ``PredictorProtocol`` (contract.py: shapes and frames); ``textseg.remote.client.RemotePredictor``
implements the same contract over HTTP.

Geometry: the adapter sees the canonical (closest-LPS) volume; every probability map and mask comes back on
exactly the input grid (results.py). A result's ``mask`` is always computed; its ``probability`` may be computed
on first read (``probability_ready``), when the model's map is costly to bring back (SAT), so callers that use
masks only never pay for the maps. Volumetric adapters encode once and decode per prompt group (here);
slice-wise ones run in cached slice batches (slices.py); recognition is slices.py's loop with the family's rules
(recognition.py); devices and out-of-memory fallback are devices.py's. Progress is reported as (fraction,
stage); ``cancel`` (a textseg.runcontrol.CancelToken) stops the run between steps: prompts already completed
are returned, the rest are left out.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..analysis.confidence import check_threshold
from ..catalog import ModelSpec, get_model, list_models
from ..errors import Cancelled, ModelError, UsageError
from ..models.base import ModelAdapter, RunContext, VolumeAdapter, check_adapter
from ..models.options import AdapterOptions
from ..presets import Preset, get_preset
from ..prompts import Prompt
from ..runcontrol import CancelToken, ProgressFn, kept_summary
from ..volume import Volume
from .contract import PromptLike, check_prompts
from .devices import free_gpu, run_with_fallback, select_device
from .recognition import recognize_slices
from .results import PromptResult, ResultMaker
from .slices import SliceBatches, predict_slices

log = logging.getLogger("textseg")


def load_adapter(spec: ModelSpec, weights_dir: Optional[Path] = None, **options: Any) -> ModelAdapter:
    """The spec's adapter class (``module:Class``) built with ``options``; weights located (or asked for) first."""
    module_name, _, class_name = spec.adapter.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ModelError(
            f"Model '{spec.id}' needs a package that is not installed ({exc.name or exc}). "
            "Install the engine with its model extras: pip install 'textseg[models]'."
        ) from exc
    if weights_dir is None and spec.files:
        from ..weights import require_weights

        weights_dir = require_weights(spec)
    return cls(spec, weights_dir, **options)


class Predictor:
    """Local predictor. See the module docstring."""

    def __init__(
        self,
        model: Union[str, ModelSpec, ModelAdapter],
        device: str = "auto",
        weights_dir: Optional[Union[str, Path]] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        log_fn: Optional[Callable[[str], None]] = None,
        **adapter_options: Any,
    ) -> None:
        if isinstance(model, ModelAdapter):
            self.adapter = model
        else:
            spec = get_model(model) if isinstance(model, str) else model
            self.adapter = load_adapter(spec, Path(weights_dir) if weights_dir else None, **adapter_options)
        check_adapter(self.adapter)  # a VolumeAdapter for a 3D spec, a SliceAdapter for a 2D one
        self.spec: ModelSpec = self.adapter.spec
        AdapterOptions.from_mapping(self.adapter.options)  # a bad or renamed setting fails here, in one line
        self.device = select_device(device)
        self.batch_size = batch_size or (4 if self.spec.dims == 2 else 1)
        self.seed = seed
        self.messages: list[str] = []
        self._log_fn = log_fn
        self._loaded = False
        self._volume: Optional[Volume] = None
        self._canonical: Optional[Volume] = None
        self._preset: Optional[Preset] = None
        self._state: Any = None
        self._encoded: Any = None
        self.slices = SliceBatches()  # slice-wise models: range, cache of encoded slice batches

    # ---- logging -----------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        self.messages.append(msg)
        log.info(msg)
        if self._log_fn:
            self._log_fn(msg)

    def _context(self, progress: Optional[ProgressFn], cancel: Optional[CancelToken]) -> RunContext:
        return RunContext(self.device, self.batch_size, progress, cancel, self._log, self.seed)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.adapter.load(self.device)
            self.adapter.device = self.device
            self._loaded = True

    def _run(self, fn: Callable[[RunContext], Any], ctx: RunContext, retry_same: bool = True) -> Any:
        """``fn(ctx)`` with the out-of-memory fallback of devices.py."""
        return run_with_fallback(self, fn, ctx, retry_same)

    def _free_gpu(self) -> None:
        free_gpu(self)

    # ---- the contract --------------------------------------------------------------------------
    def set_image(
        self,
        volume: Volume,
        modality: Optional[str] = None,
        site: Optional[str] = None,
        slices: Optional[tuple[int, int]] = None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        """Preprocess and (for 3D models) encode the image once.

        ``slices`` = (first, stop) limits a 2D model to canonical slices first..stop-1 (the
        slice axis of the canonical, closest-LPS volume: inferior to superior for axial images).
        """
        volume.check_usable()
        if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
            finite = np.isfinite(volume.array)
            fill = float(volume.array[finite].min())
            self._log(f"{int((~finite).sum())} NaN/infinite voxels set to the image minimum ({fill:g}) for the model.")
            volume = volume.with_array(np.where(finite, volume.array, fill))
        modality = modality or self.spec.modalities[0]
        preset = get_preset(modality, site)
        if preset.modality not in self.spec.modalities:
            raise UsageError(
                f"Model '{self.spec.id}' does not support {preset.modality} images; it supports "
                f"{', '.join(self.spec.modalities)}. Pick another model or modality."
            )
        if self.spec.sites and preset.site and preset.site not in self.spec.sites:
            raise UsageError(
                f"Model '{self.spec.id}' does not support the CT site '{preset.site}'; "
                f"it supports {', '.join(self.spec.sites)}."
            )
        if volume.is_rgb and preset.modality in ("CT", "MRI", "PET"):
            raise UsageError(f"An RGB image cannot be {preset.modality}: choose a photographic modality.")
        ctx = self._context(progress, cancel)
        ctx.span(0.0, 0.1, "loading model")
        self._ensure_loaded()
        self._volume, self._preset = volume, preset
        self._canonical = volume.canonical()
        self._encoded = None
        self.slices.cache.clear()
        ctx.span(0.1, 0.3, "preprocessing")
        self._state = self.adapter.prepare(self._canonical, preset, ctx)
        if self.spec.dims == 2:
            n = self.adapter.num_slices(self._state)
            first, stop = slices if slices is not None else (0, n)
            if not (0 <= first < stop <= n):
                raise UsageError(f"Slice range {first}:{stop} is outside the image's 0:{n} slices.")
            self.slices.range = (first, stop)
        else:
            if slices is not None:
                raise UsageError(f"Model '{self.spec.id}' is volumetric; a slice range applies to 2D models only.")
            ctx.span(0.3, 1.0, "encoding image")
            self._encoded = self._run(lambda c: self.adapter.encode(self._state, c), ctx)
        ctx.span(1.0, 1.0, "image ready")

    def reset_image(self) -> None:
        self._volume = self._canonical = self._state = self._encoded = None
        self.slices.cache.clear()

    def check_prompts(self, prompts: Union[str, Sequence[PromptLike]]) -> list[Prompt]:
        """Parse and validate prompts against the model (kinds, vocabulary) without running it."""
        return check_prompts(self.spec, prompts)

    def predict(
        self,
        prompts: Union[str, Sequence[PromptLike]],
        threshold: Optional[float] = None,
        keep_absent: bool = False,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
    ) -> list[PromptResult]:
        """One result per prompt. Cancel keeps the prompts completed so far."""
        if self._volume is None:
            raise UsageError("No image set: call set_image(volume, modality) before predict().")
        plist = self.check_prompts(prompts)
        thr = self.spec.threshold if threshold is None else check_threshold(threshold)  # as the server checks it
        ctx = self._context(progress, cancel)
        results: list[PromptResult] = []
        try:
            if self.spec.dims == 2:
                predict_slices(self, plist, thr, keep_absent, ctx, results)
            else:
                self._predict_volume(plist, thr, keep_absent, ctx, results)
        except Cancelled:
            done = sum(r.complete for r in results)
            self._log(f"Cancelled: {kept_summary(done, len(plist), len(results) - done)}.")
        ctx.span(1.0, 1.0, "done")
        return results

    def recognize(
        self,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelToken] = None,
        **options: Any,
    ) -> list[PromptResult]:
        """Recognition ("segment everything"): run every target of the image's modality/site and keep, slice by
        slice, those the model's family rules keep (existence test, NMS across targets, one target per voxel).
        One result per target found, named after it (``result.name``), with ``objects`` (detection boxes) and,
        for an instance split, ``instances``. Options are the family's (BiomedParse v1: image_type,
        p_value_threshold, targets; v2: targets, instances, iou_threshold, existence_threshold,
        compat_upstream, expand_distance, sentences). Cancel keeps the slices completed so far (results
        marked incomplete)."""
        if not self.spec.recognition:
            able = [m.id for m in list_models() if m.recognition]
            raise UsageError(f"Model '{self.spec.id}' has no recognition ('segment everything'): give prompts to "
                             f"predict() instead, or use a model with recognition "
                             f"({', '.join(able) or 'none installed'}).")
        if self._volume is None or self._preset is None:
            raise UsageError("No image set: call set_image(volume, modality) before recognize().")
        if self.spec.dims != 2:
            raise UsageError(f"Recognition is implemented for slice-wise models; '{self.spec.id}' is volumetric.")
        rec = self.adapter.recognizer(self._preset, **options)
        ctx = self._context(progress, cancel)
        ctx.options = {"edges": bool(rec.edges)}
        results: list[PromptResult] = []
        try:
            recognize_slices(self, rec, ctx, results)
        except Cancelled:
            self._log("Cancelled before any slice was recognized: nothing kept.")
        ctx.span(1.0, 1.0, "done")
        return results

    # ---- execution --------------------------------------------------------------------------------
    def _predict_volume(self, plist: list[Prompt], thr: float, keep_absent: bool, ctx: RunContext,
                        results: list[PromptResult]) -> None:
        adapter: VolumeAdapter = self.adapter  # type: ignore[assignment]
        group = max(1, adapter.prompts_per_call(self._state))
        make = self._results()
        for start in range(0, len(plist), group):
            ctx.check_cancel()
            chunk = plist[start : start + group]
            ctx.span(start / len(plist), (start + len(chunk)) / len(plist), f"decoding '{chunk[0].label}'")
            t0 = time.perf_counter()
            decoded = self._run(lambda c: adapter.decode(self._encoded, chunk, c), ctx)  # noqa: B023 - runs in this iteration
            seconds = (time.perf_counter() - t0) / len(chunk)
            for p, d in zip(chunk, decoded):
                results.append(make.make(p, d.probability, d.existence, d.extra, thr, keep_absent, seconds))

    def _results(self) -> ResultMaker:
        assert self._volume is not None and self._preset is not None
        return ResultMaker(self.adapter, self._volume, self._preset, self.device, self.seed, self._log)
