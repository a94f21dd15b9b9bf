"""The predictor: encode an image once, decode many prompts (cf. segment-anything's SamPredictor).

    predictor = Predictor("deepbet", device="auto")
    predictor.set_image(volume, modality="MRI")
    results = predictor.predict(["brain"])          # one PromptResult per prompt

The same contract is implemented by ``textseg.remote.client.RemotePredictor`` over HTTP.

Geometry: the adapter sees the canonical (closest-LPS) volume; every probability map and mask
comes back on exactly the input grid. A result's ``mask`` is always computed; its ``probability`` may be
computed on first read (``probability_ready``), when the model's map is costly to bring back (SAT), so
callers that use masks only never pay for the maps. Devices: ``auto`` picks cuda, then mps, then cpu. On a GPU
out-of-memory error the batch is halved and retried, and finally the model moves to the CPU; each
step is logged. Progress is reported as (fraction, stage); ``cancel`` (a CancelToken) stops the
run between steps: prompts already completed are returned, the rest are left out.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from . import __version__
from .catalog import ModelSpec, get_model, list_models
from .detection import detect_objects
from .errors import Cancelled, ModelError, UsageError
from .models.base import CancelToken, DeferredMap, ModelAdapter, ProgressFn, Recognizer, RunContext
from .models.feature_cache import FeatureCache, cache_budget
from .models.options import AdapterOptions
from .presets import Preset, get_preset
from .prompts import Prompt, parse_prompts
from .volume import Volume

log = logging.getLogger("textseg")

_RETRY = object()
PromptLike = Union[str, Prompt, dict[str, Any]]


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
class _Recognized(DeferredMap):
    """A recognised target: its mask is where it won (the label map), its probability the winning probability
    there, 0 elsewhere, computed on first read; every target of a run shares the two canonical arrays (no
    float32 map per target)."""

    labels: np.ndarray  # int32 canonical label map (0 = none, n = target n)
    probability: np.ndarray  # float32 canonical: the winning target's probability
    label: int

    def array(self) -> np.ndarray:
        return np.where(self.labels == self.label, self.probability, np.float32(0))

    def mask(self, threshold: float) -> np.ndarray:
        return (self.labels == self.label).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class _OnInputGrid:
    """A deferred canonical map, put on a volume's input grid when called (picklable: no volume array)."""

    deferred: Any  # DeferredMap
    orientation: Any  # Volume.orientation
    shape: tuple[int, ...]

    def __call__(self) -> np.ndarray:
        return self.orientation.onto_grid(np.asarray(self.deferred.array(), np.float32), self.shape)


def kept_summary(done: int, total: int, partial: int) -> str:
    """What a cancelled prompt run kept, as the predictor, the client and the server's job stage say it."""
    return f"kept {done} of {total} completed prompt(s)" + (f" and {partial} partial result(s)" if partial else "")


# ---- devices -----------------------------------------------------------------------------------
def select_device(device: str = "auto") -> Any:
    """'auto' -> cuda, then mps, then cpu; or a forced 'cpu' / 'cuda' / 'cuda:1' / 'mps'."""
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available here. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for, but Apple MPS is not available here. Use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"Unknown device '{device}'. Use auto, cpu, cuda, cuda:N or mps.") from None


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # pragma: no cover - torch without cuda module
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def load_adapter(spec: ModelSpec, weights_dir: Optional[Path] = None, **options: Any) -> ModelAdapter:
    module_name, _, class_name = spec.adapter.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ModelError(
            f"Model '{spec.id}' needs a package that is not installed ({exc.name or exc}). "
            "Install the engine with its model extras: pip install 'textseg[models]'."
        ) from exc
    if weights_dir is None and spec.files:
        from .weights import require_weights

        weights_dir = require_weights(spec)
    return cls(spec, weights_dir, **options)


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
        self._slice_cache = FeatureCache()  # batch of slice indices -> encoded batch (option feature_cache_bytes)
        self._slice_range: Optional[tuple[int, int]] = None

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
        """Run fn, retrying with a smaller batch and finally on the CPU after GPU out-of-memory.

        With ``retry_same=False`` the caller re-plans its work instead: _RETRY is returned after
        the batch size (or device) was lowered."""
        while True:
            try:
                return fn(ctx)
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - filtered below
                if not is_out_of_memory(exc) or getattr(self.device, "type", "cpu") == "cpu":
                    raise
                self._free_gpu()
                if ctx.batch_size > 1:
                    ctx.batch_size = self.batch_size = max(1, ctx.batch_size // 2)
                    self._log(f"GPU out of memory: retrying with batch size {ctx.batch_size}.")
                else:
                    import torch

                    self._log("GPU out of memory even with batch size 1: continuing on the CPU (slower).")
                    self.device = ctx.device = torch.device("cpu")
                    self.adapter.to(self.device)
                    self._slice_cache.clear()
                    if self._encoded is not None and self.spec.dims == 3:
                        self._encoded = self.adapter.encode(self._state, ctx)
                if not retry_same:
                    return _RETRY

    def _free_gpu(self) -> None:
        self._slice_cache.clear()
        if self._encoded is not None:
            self.adapter.free_memory(self._encoded)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

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
        self._slice_cache.clear()
        ctx.span(0.1, 0.3, "preprocessing")
        self._state = self.adapter.prepare(self._canonical, preset, ctx)
        if self.spec.dims == 2:
            n = self.adapter.num_slices(self._state)
            first, stop = slices if slices is not None else (0, n)
            if not (0 <= first < stop <= n):
                raise UsageError(f"Slice range {first}:{stop} is outside the image's 0:{n} slices.")
            self._slice_range = (first, stop)
        else:
            if slices is not None:
                raise UsageError(f"Model '{self.spec.id}' is volumetric; a slice range applies to 2D models only.")
            ctx.span(0.3, 1.0, "encoding image")
            self._encoded = self._run(lambda c: self.adapter.encode(self._state, c), ctx)
        ctx.span(1.0, 1.0, "image ready")

    def reset_image(self) -> None:
        self._volume = self._canonical = self._state = self._encoded = None
        self._slice_cache.clear()

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
        thr = self.spec.threshold if threshold is None else float(threshold)
        ctx = self._context(progress, cancel)
        results: list[PromptResult] = []
        try:
            if self.spec.dims == 2:
                self._predict_slices(plist, thr, keep_absent, ctx, results)
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
            self._recognize_slices(rec, ctx, results)
        except Cancelled:
            self._log("Cancelled before any slice was recognized: nothing kept.")
        ctx.span(1.0, 1.0, "done")
        return results

    def _recognize_slices(self, rec: Recognizer, ctx: RunContext, results: list[PromptResult]) -> None:
        assert self._volume is not None and self._slice_range is not None
        first, stop = self._slice_range
        n_total, (h, w) = self.adapter.num_slices(self._state), self.adapter.slice_shape(self._state)
        n = len(rec.prompts)
        labels = np.zeros((n_total, h, w), np.int32)
        win = np.zeros((n_total, h, w), np.float32)
        edges = np.zeros((n_total, h, w), bool) if rec.edges else None
        scores = np.full((n, n_total), np.nan)
        t0 = time.perf_counter()
        cancelled: Optional[Cancelled] = None
        try:
            for batch, outs in self._decoded_batches(rec.prompts, first, stop, ctx, "recognizing slices"):
                probs = np.zeros((n, len(batch), h, w), np.float32)
                exist = np.full((n, len(batch)), np.nan)
                edge = np.zeros((n, len(batch), h, w), np.float32) if rec.edges else None
                for j, o in enumerate(outs):
                    probs[j] = o.probability
                    if o.existence is not None:
                        exist[j] = o.existence
                    if edge is not None and o.edges is not None:
                        edge[j] = o.edges
                out = rec.slices(probs, exist, edge)
                sl = slice(batch[0], batch[-1] + 1)
                labels[sl], win[sl], scores[:, sl] = out.labels, out.probability, out.scores
                if edges is not None and out.edges is not None:
                    edges[sl] = out.edges
        except Cancelled as exc:
            if self._slices_done == first:
                raise
            cancelled = exc
        idx = self._slices_done
        seconds = (time.perf_counter() - t0) / max(1, n)
        split = rec.instances(labels, edges)
        held = np.stack([np.bincount(s.ravel(), minlength=n + 1) > 0 for s in labels])  # (slice, label): present
        for t in range(n):
            on_slice = held[:, t + 1]
            if not on_slice.any():
                continue
            sc = scores[t][on_slice]
            existence = float(np.nanmax(sc)) if np.isfinite(sc).any() else None
            extra: dict[str, Any] = {"name": rec.names[t], "recognition": dict(rec.info)}
            r = self._finish(rec.prompts[t], _Recognized(labels, win, t + 1), None, extra,
                             self.spec.threshold, True, seconds, detect=False)
            r.existence = existence
            r.provenance["existence"] = None if existence is None else round(existence, 4)
            r.provenance["recognition"] = rec.info.get("rules", "")
            r.present, r.message = True, ""
            if t in split:
                r.instances = self._volume.to_input_grid(split[t].astype(np.int32))
                r.extra["instance_count"] = int(np.unique(split[t]).size - (split[t] == 0).any())
            r.objects = detect_objects(self._volume, r.mask, r.name, r.instances)
            if cancelled is not None:
                r.complete = False
                r.extra["slices_done"] = [first, idx]
                r.message = f"Partial: cancelled after slices {first}:{idx} of {first}:{stop}."
            results.append(r)
        self._log(f"Recognition: {len(results)} of {n} targets found"
                  + (f" (cancelled after slices {first}:{idx})." if cancelled is not None else "."))

    # ---- execution paths -------------------------------------------------------------------------
    def _predict_volume(self, plist, thr, keep_absent, ctx, results) -> None:
        group = max(1, self.adapter.max_prompts_per_call)
        for start in range(0, len(plist), group):
            ctx.check_cancel()
            chunk = plist[start : start + group]
            ctx.span(start / len(plist), (start + len(chunk)) / len(plist), f"decoding '{chunk[0].label}'")
            t0 = time.perf_counter()
            decoded = self._run(lambda c: self.adapter.decode(self._encoded, chunk, c), ctx)  # noqa: B023 - runs in this iteration
            seconds = (time.perf_counter() - t0) / len(chunk)
            for p, d in zip(chunk, decoded):
                results.append(self._finish(p, d.probability, d.existence, d.extra, thr, keep_absent, seconds))

    def _predict_slices(self, plist, thr, keep_absent, ctx, results) -> None:
        assert self._canonical is not None and self._slice_range is not None
        first, stop = self._slice_range
        h, w = self.adapter.slice_shape(self._state)
        n_total = self.adapter.num_slices(self._state)
        probs = [np.zeros((n_total, h, w), np.float32) for _ in plist]
        exist = [np.zeros(n_total, np.float32) for _ in plist]
        has_exist = [False] * len(plist)
        t0 = time.perf_counter()
        cancelled: Optional[Cancelled] = None
        try:
            self._slice_loop(plist, probs, exist, has_exist, first, stop, ctx)
        except Cancelled as exc:
            cancelled = exc
        idx = self._slices_done
        if idx == first:
            raise cancelled or Cancelled("cancelled")
        seconds = (time.perf_counter() - t0) / len(plist)
        for j, p in enumerate(plist):
            e = exist[j] if has_exist[j] else None
            prob = probs[j]
            prob[idx:] = 0.0  # a cancelled batch may be half decoded: keep whole slices only
            existence = float(e[first:idx].max()) if e is not None else None
            extra: dict[str, Any] = {}
            if e is not None and self.spec.existence_threshold is not None and not keep_absent:
                absent = e < self.spec.existence_threshold
                absent[:first] = absent[idx:] = False
                prob[absent] = 0.0
                extra["slices_absent"] = int(absent[first:idx].sum())
            if e is not None:
                extra["slice_existence"] = e[first:idx].round(4).tolist()
            r = self._finish(p, prob, existence, extra, thr, keep_absent, seconds)
            if cancelled is not None:
                r.complete = False
                r.extra["slices_done"] = [first, idx]
                r.message = (r.message + " " if r.message
                             else "") + f"Partial: cancelled after slices {first}:{idx} of {first}:{stop}."
            results.append(r)
        if cancelled is not None:
            raise cancelled

    def _slice_loop(self, plist, probs, exist, has_exist, first, stop, ctx) -> None:
        for batch, outs in self._decoded_batches(plist, first, stop, ctx, "slices"):
            sl = slice(batch[0], batch[-1] + 1)
            for j, o in enumerate(outs):
                probs[j][sl] = o.probability
                if o.existence is not None:
                    exist[j][sl] = o.existence
                    has_exist[j] = True

    def _decoded_batches(self, plist, first, stop, ctx, stage: str):
        """Slices ``first:stop`` batch by batch: each batch encoded once (kept in the slice cache, a FeatureCache
        of ``feature_cache_bytes``) and decoded for every prompt, in groups. Yields ``(batch, outs)``, one
        SliceDecoded per prompt; re-plans after out-of-memory. ``self._slices_done`` is the first slice
        not yet yielded (what a cancel keeps)."""
        group = max(1, self.adapter.max_prompts_per_call)
        self._slice_cache.budget = cache_budget(AdapterOptions.from_mapping(self.adapter.options).feature_cache_bytes,
                                                self.device)
        idx = self._slices_done = first
        while idx < stop:
            ctx.check_cancel()
            batch = tuple(range(idx, min(stop, idx + ctx.batch_size)))
            ctx.span((idx - first) / (stop - first), (batch[-1] + 1 - first) / (stop - first),
                     f"{stage} {idx}-{batch[-1]}")
            enc = self._slice_cache.get(batch)
            if enc is None:
                enc = self._run(lambda c: self.adapter.encode_slices(self._state, batch, c), ctx, retry_same=False)  # noqa: B023 - runs in this iteration
                if enc is _RETRY:  # batch size or device lowered after out-of-memory: re-plan
                    continue
                self._slice_cache.put(batch, enc)
            outs: list = []
            for s in range(0, len(plist), group):
                ctx.check_cancel()
                got = self._run(lambda c: self.adapter.decode_slices(enc, plist[s : s + group], c), ctx,  # noqa: B023 - runs in this iteration
                                retry_same=False)
                if got is _RETRY:
                    break
                outs.extend(got)
            else:
                yield batch, outs
                idx = self._slices_done = batch[-1] + 1

    def _finish(self, prompt, prob_canonical, existence, extra, thr, keep_absent, seconds, detect=True):
        assert self._volume is not None and self._preset is not None
        if isinstance(prob_canonical, DeferredMap):  # the mask only; the map itself on first read
            mask = self._volume.to_input_grid(prob_canonical.mask(thr))
            prob: Any = _OnInputGrid(prob_canonical, self._volume.orientation, tuple(self._volume.shape))
        else:
            prob = self._volume.to_input_grid(np.asarray(prob_canonical, dtype=np.float32))
            mask = (prob >= thr).astype(np.uint8) if thr > 0 else (prob > 0).astype(np.uint8)
        present = True
        message = ""
        et = self.spec.existence_threshold
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
            self._log(message)
        provenance = {
            "model": self.spec.id,
            "model_version": self.spec.version,
            "weights_revision": self.adapter.weights_revision,
            "weights": getattr(self.adapter, "weights_files", []),
            "engine": f"textseg {__version__}",
            "prompt": prompt.to_dict(),
            "modality": self._preset.modality,
            "site": self._preset.site or "",
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
            r.objects = detect_objects(self._volume, mask, r.name)
        return r
