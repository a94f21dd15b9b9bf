"""BiomedParse v1 behind the predictor contract (2D, slice-wise along canonical k).

* ``encode_slices``: upstream preprocessing per slice (``v1.preprocess``) and backbone + pixel
  decoder once per slice batch; ``decode_slices``: grounding decoder for all prompts of a call.
* Probabilities: the selected query's stride-4 logits, bilinearly resized to the padded slice shape,
  sigmoid, padding cropped -> canonical slice grid.
* Existence per slice: upstream's K-S p-value test (``v1.existence``) on the 1024x1024 input and the
  probability map upsampled to it (upstream order: bilinear, then sigmoid); the adjusted p-value is
  the existence score, the spec's threshold 0.05 drops slices. A prompt that is not a target of the
  image's upstream image type (``target_dist.json``) has no existence test (None) and is logged.
* Options: ``concat_prompts`` (upstream compatibility: all prompts of a call share one grounding
  token sequence), ``image_type`` (force an upstream image type for the test and for recognition),
  ``config`` (a ``V1Config``; tests use the reduced one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ....errors import UsageError
from ....prompts import Prompt
from ...base import Recognizer, RunContext, SliceAdapter, SliceDecoded, SliceLabels, weight_file
from ...options import AdapterOptions
from .existence import adjusted_p_value, find_params, load_target_dist, mask_stats
from .model import V1Config, build_v1, load_v1_weights
from .preprocess import preprocess_slice
from .spec import BIOMED_OBJECTS, image_types_for


class BiomedParseV1Adapter(SliceAdapter):
    max_prompts_per_call = 4  # B slices x 4 prompts decoded as one batch

    def load(self, device: Any) -> None:
        cfg = self.options.get("config") or V1Config()
        self.concat = bool(AdapterOptions.from_mapping(self.options).concat_prompts)
        self.model = build_v1(cfg)
        load_v1_weights(self.model, weight_file(self, "biomedparse_v1.pt"))
        self.target_dist = load_target_dist(weight_file(self, "target_dist.json"))
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.to(device)

    def to(self, device: Any) -> None:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._text_cache = {}

    # ---- image ----------------------------------------------------------------------------------
    def prepare(self, volume, preset, ctx: RunContext) -> Any:
        forced = AdapterOptions.from_mapping(self.options).image_type
        types = [forced] if forced else image_types_for(preset.modality, preset.site)
        return {"array": volume.array, "preset": preset, "image_types": types}

    def prompts_per_call(self, state: Any) -> int:
        return 10_000 if self.concat else self.max_prompts_per_call  # upstream concatenates all prompts

    def num_slices(self, state: Any) -> int:
        return int(state["array"].shape[0])

    def slice_shape(self, state: Any) -> tuple:
        return tuple(state["array"].shape[1:3])

    def encode_slices(self, state: Any, indices: Sequence[int], ctx: RunContext) -> Any:
        size = self.model.cfg.image_size
        images, pads = [], []
        for n, k in enumerate(indices):
            ctx.check_cancel()
            img, pad = preprocess_slice(state["array"][k], state["preset"], size)
            images.append(img)
            pads.append(pad)
            ctx.report(0.5 * (n + 1) / len(indices))
        batch = np.stack(images)
        with torch.inference_mode():
            enc = self.model.encode(torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device))
        ctx.report(0.6)
        return {"enc": enc.__dict__, "images": batch, "pads": pads, "image_types": state["image_types"]}

    # ---- prompts --------------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str]):
        from ...clip_tokenizer import tokenize

        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            ids, att = tokenize(todo, self.model.cfg.context_length)
            with torch.inference_mode():
                tok, cls = self.model.embed_text(torch.from_numpy(ids).to(self.device))
            for i, t in enumerate(todo):
                self._text_cache[t] = (tok[i], torch.from_numpy(att[i]).to(self.device), cls[i])
        parts = [self._text_cache[t] for t in texts]
        return tuple(torch.stack([p[i] for p in parts]) for i in range(3))

    def decode_slices(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[SliceDecoded]:
        from .model import Encoded

        texts = [p.text or "" for p in prompts]
        if not all(t.strip() for t in texts):
            raise UsageError("BiomedParse v1 needs a text prompt (a target name such as 'liver').")
        tok, att, cls = self._embed(texts)
        with torch.inference_mode():
            out = self.model.decode(Encoded(**encoded["enc"]), tok, att, cls, concat=self.concat)
            logits = out["logits"].float()
        ctx.report(0.8)
        return [self._finish(encoded, logits[:, j], t) for j, t in enumerate(texts)]

    def recognizer(self, preset, **options: Any) -> V1Recognizer:
        forced = AdapterOptions.from_mapping(self.options).image_type
        return V1Recognizer([forced] if forced else image_types_for(preset.modality, preset.site), **options)

    def _finish(self, encoded: dict[str, Any], logits: torch.Tensor, text: str) -> SliceDecoded:
        """(B, h, w) logits of one prompt -> canonical probabilities + per-slice existence."""
        probs = []
        for b, pad in enumerate(encoded["pads"]):
            p = F.interpolate(logits[b][None, None], size=pad.padded, mode="bilinear", align_corners=False)
            probs.append(pad.crop(p[0, 0].sigmoid().cpu().numpy()))
        prob = np.stack(probs).astype(np.float32)
        found = find_params(self.target_dist, encoded["image_types"], text)
        if found is None:
            return SliceDecoded(prob, None)
        size = self.model.cfg.image_size
        full = F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        stats = mask_stats(full.sigmoid().cpu().numpy() * 255, encoded["images"])
        return SliceDecoded(prob, adjusted_p_value(stats, found[2]).astype(np.float32))


# ---- recognition ("segment everything") -------------------------------------------------------------
class V1Recognizer(Recognizer):
    """Upstream ``interactive_infer_image_all`` per slice: every target of the image type, keep those whose
    p-value passes on the slice, NMS in descending p-value order, then ``combine_masks`` (one target per pixel).
    Options: ``image_type`` (default: from the modality/site; when several fit, e.g. MRI without a site, the
    targets of all of them), ``p_value_threshold`` (0.05), ``targets``."""

    OPTIONS = ("image_type", "p_value_threshold", "targets")

    def __init__(self, types: Sequence[str], **options: Any) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise UsageError(f"Unknown recognition option(s) {unknown} for BiomedParse v1; it takes "
                             f"{', '.join(self.OPTIONS)}.")
        forced = options.get("image_type")
        types = [forced] if forced else list(types)
        if not types or any(t not in BIOMED_OBJECTS for t in types):
            raise UsageError(f"No BiomedParse v1 image type for this image; pass image_type= one of "
                             f"{', '.join(BIOMED_OBJECTS)}.")
        # Several image types fit (MRI without a site, brain MRI): every one's targets are run, each tested
        # against its own type's existence distribution (the first type that knows it, as for prompts).
        targets = options.get("targets")
        every = list(dict.fromkeys(t for it in types for t in BIOMED_OBJECTS[it]))
        self.names = [targets] if isinstance(targets, str) else list(targets or every)
        self.prompts = [Prompt(t) for t in self.names]
        self.threshold = float(options.get("p_value_threshold", 0.05))
        self.info = {"rules": "biomedparse-v1", "image_type": " + ".join(types), "p_value_threshold": self.threshold}

    def slices(self, probs: np.ndarray, existence: Optional[np.ndarray], edges=None) -> SliceLabels:
        from .existence import combine_masks, non_maxima_suppression

        n, b = probs.shape[:2]
        ex = np.full((n, b), np.nan) if existence is None else existence
        labels = np.zeros((b,) + probs.shape[2:], np.int32)
        win = np.zeros(labels.shape, np.float32)
        scores = np.full((n, b), np.nan)
        for s in range(b):
            passing = {i: probs[i, s] for i in range(n) if np.isfinite(ex[i, s]) and ex[i, s] >= self.threshold}
            kept = non_maxima_suppression(passing, {i: ex[i, s] for i in passing})
            for i, m in combine_masks({i: passing[i] for i in kept}).items():
                on = m.astype(bool)
                labels[s][on] = i + 1
                win[s][on] = probs[i, s][on]
                scores[i, s] = ex[i, s]
        return SliceLabels(labels, win, scores)


def recognize(predictor, image_type: Optional[str] = None, p_value_threshold: float = 0.05,
              progress=None, cancel=None) -> list:
    """Kept for compatibility: ``predictor.recognize(image_type=..., p_value_threshold=...)``."""
    if predictor.spec.id != "biomedparse-v1":
        raise UsageError("recognize() is for the biomedparse-v1 model.")
    return predictor.recognize(progress=progress, cancel=cancel, image_type=image_type,
                               p_value_threshold=p_value_threshold)
