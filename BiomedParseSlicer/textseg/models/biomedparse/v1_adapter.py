"""BiomedParse v1 behind the predictor contract (2D, slice-wise along canonical k).

* ``encode_slices``: upstream preprocessing per slice (``v1_preprocess``) and backbone + pixel
  decoder once per slice batch; ``decode_slices``: grounding decoder for all prompts of a call.
* Probabilities: the selected query's stride-4 logits, bilinearly resized to the padded slice shape,
  sigmoid, padding cropped -> canonical slice grid.
* Existence per slice: upstream's K-S p-value test (``v1_existence``) on the 1024x1024 input and the
  probability map upsampled to it (upstream order: bilinear, then sigmoid); the adjusted p-value is
  the existence score, the spec's threshold 0.05 drops slices. A prompt that is not a target of the
  image's upstream image type (``target_dist.json``) has no existence test (None) and is logged.
* Options: ``concat_prompts`` (upstream compatibility: all prompts of a call share one grounding
  token sequence), ``image_type`` (force an upstream image type for the test and for recognition),
  ``config`` (a ``V1Config``; tests use the reduced one).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UsageError
from ...prompts import Prompt
from ..base import ModelAdapter, RunContext, SliceDecoded, weight_file
from .v1_existence import adjusted_p_value, find_params, load_target_dist, mask_stats
from .v1_model import V1Config, build_v1, load_v1_weights
from .v1_preprocess import preprocess_slice
from .v1_spec import BIOMED_OBJECTS, image_types_for


class BiomedParseV1Adapter(ModelAdapter):
    max_prompts_per_call = 4  # B slices x 4 prompts decoded as one batch

    def load(self, device: Any) -> None:
        cfg = self.options.get("config") or V1Config()
        self.concat = bool(self.options.get("concat_prompts", False))
        if self.concat:
            self.max_prompts_per_call = 10_000  # upstream: one call for all prompts
        self.model = build_v1(cfg)
        load_v1_weights(self.model, weight_file(self, "biomedparse_v1.pt"))
        self.target_dist = load_target_dist(weight_file(self, "target_dist.json"))
        self._text_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.to(device)

    def to(self, device: Any) -> None:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._text_cache = {}

    # ---- image ----------------------------------------------------------------------------------
    def prepare(self, volume, preset, ctx: RunContext) -> Any:
        forced = self.options.get("image_type")
        types = [forced] if forced else image_types_for(preset.modality, preset.site)
        return {"array": volume.array, "preset": preset, "image_types": types}

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
        from ..clip_tokenizer import tokenize

        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            ids, att = tokenize(todo, self.model.cfg.context_length)
            with torch.inference_mode():
                tok, cls = self.model.embed_text(torch.from_numpy(ids).to(self.device))
            for i, t in enumerate(todo):
                self._text_cache[t] = (tok[i], torch.from_numpy(att[i]).to(self.device), cls[i])
        parts = [self._text_cache[t] for t in texts]
        return tuple(torch.stack([p[i] for p in parts]) for i in range(3))

    def decode_slices(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> List[SliceDecoded]:
        from .v1_model import Encoded

        texts = [p.text or "" for p in prompts]
        if not all(t.strip() for t in texts):
            raise UsageError("BiomedParse v1 needs a text prompt (a target name such as 'liver').")
        tok, att, cls = self._embed(texts)
        with torch.inference_mode():
            out = self.model.decode(Encoded(**encoded["enc"]), tok, att, cls, concat=self.concat)
            logits = out["logits"].float()
        ctx.report(0.8)
        return [self._finish(encoded, logits[:, j], t) for j, t in enumerate(texts)]

    def _finish(self, encoded: Dict[str, Any], logits: torch.Tensor, text: str) -> SliceDecoded:
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
def recognize(predictor, image_type: Optional[str] = None, p_value_threshold: float = 0.05,
              progress=None, cancel=None) -> list:
    """Upstream ``interactive_infer_image_all`` per slice: run every target of the image type, keep
    those whose p-value passes on a slice, NMS in descending p-value order, then ``combine_masks``.
    Returns one PromptResult per target kept on at least one slice (mask = its combined voxels)."""
    from .v1_existence import combine_masks, non_maxima_suppression

    if predictor.spec.id != "biomedparse-v1":
        raise UsageError("recognize() is for the biomedparse-v1 model.")
    preset = predictor._preset
    if preset is None:
        raise UsageError("No image set: call set_image(volume, modality) before recognize().")
    types = [image_type] if image_type else image_types_for(preset.modality, preset.site)
    if not types or types[0] not in BIOMED_OBJECTS:
        raise UsageError(f"No BiomedParse v1 image type for {preset.key}; choose one of {', '.join(BIOMED_OBJECTS)}.")
    targets = list(BIOMED_OBJECTS[types[0]])
    results = predictor.predict(targets, keep_absent=True, progress=progress, cancel=cancel)
    vol = predictor._volume
    first = predictor._slice_range[0]
    canon = {r.prompt.text: vol.orientation.to_canonical(r.probability) for r in results}
    pvals = {r.prompt.text: r.extra.get("slice_existence") for r in results}
    masks = {t: np.zeros(c.shape, np.uint8) for t, c in canon.items()}
    best = {t: 0.0 for t in canon}
    n_done = min(len(v) for v in pvals.values() if v is not None) if any(pvals.values()) else 0
    for s in range(n_done):
        k = first + s
        passing = {t: canon[t][k] for t in canon if pvals[t] is not None and pvals[t][s] >= p_value_threshold}
        kept = non_maxima_suppression(passing, {t: pvals[t][s] for t in passing})
        for t, m in combine_masks({t: passing[t] for t in kept}).items():
            masks[t][k] = m
            best[t] = max(best[t], pvals[t][s])
    out = []
    for r in results:
        t = r.prompt.text
        if masks[t].any():
            r.mask = vol.to_input_grid(masks[t])
            r.existence, r.present = best[t], True
            r.message = ""
            r.extra["recognition"] = {"image_type": types[0], "p_value_threshold": p_value_threshold}
            out.append(r)
    return out
