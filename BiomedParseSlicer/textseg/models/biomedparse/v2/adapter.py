"""BiomedParse v2 behind the predictor contract (2.5D: slice-wise along canonical k, neighbour channels).

* ``encode_slices``: each slice and its neighbours windowed to 0..255 (``presets.window_to_uint8``; upstream
  expects challenge-preprocessed uint8 volumes and does no windowing itself), packed [current, previous,
  next] with upstream's edge rule over the whole volume, square-padded, bicubic to 512 (uint8 path), then
  backbone + pixel decoder once per slice batch.
* ``decode_slices``: the BoltzFormer decoder for a group of prompts on the encoded batch; probabilities =
  sigmoid of the mean segmentation-query logits, bicubic-antialias upsampled, padding removed; existence
  per slice = sigmoid(classifier logit) (spec threshold 0.5, as upstream ``postprocess``).
* Sampling: seeded. Default: each (prompt, slice) row draws from its own generator (seed, prompt text, slice
  index), and padding between prompts is masked: a prompt's result depends neither on the other prompts nor
  on the slice batching. ``compat_upstream=True``: one generator seeded with the run's seed (default 0) in
  upstream's call order, unmasked zero padding between prompts, and upstream's output path (logits to 512,
  nearest back to the padded square). ``deterministic=True``: full attention, no sampling.
* Slicing axis: canonical k (from the image geometry) in both modes. Upstream picks the axis from the array
  shape; compat mode refuses volumes where that rule would pick another axis (UsageError) rather than
  silently differ.
* Edges: with ``ctx.options["edges"]`` (recognition with an instance split) the edge queries' mean logits
  take the same path as the probabilities (``SliceDecoded.edges``).
* Recognition: ``recognizer`` gives ``v2.recognition.V2Recognizer`` (NMS, merge, instance split).
* Options (``models.options.AdapterOptions``): ``compat_upstream``, ``deterministic``, ``resize_path``
  ('uint8'/'float'); tests inject ``config`` (a V2Config).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ....errors import UsageError
from ....presets import window_to_uint8
from ....prompts import Prompt
from ...base import RunContext, SliceAdapter, SliceDecoded, weight_file
from ...options import AdapterOptions
from . import preprocess as pre
from .decoder import Sampling
from .loader import load_v2_weights
from .model import Encoded, Prompts, V2Config, build_v2


def row_seed(seed: int, text: str, k: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(text.encode()) * 7919 + int(k)) % (2 ** 62)


class BiomedParseV2Adapter(SliceAdapter):
    max_prompts_per_call = 8

    def load(self, device: Any) -> None:
        opts = AdapterOptions.from_mapping(self.options)
        self.compat = bool(opts.compat_upstream)
        self.deterministic = bool(opts.deterministic)
        self.resize_path = opts.resize_path
        self.model = build_v2(self.options.get("config") or V2Config())
        load_v2_weights(self.model, weight_file(self, "biomedparse_v2.ckpt"))
        self.to(device)

    def to(self, device: Any) -> None:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._text_cache: dict[tuple, Prompts] = {}  # prompt group -> grounding tokens (text encoder once)

    # ---- image ----------------------------------------------------------------------------------
    def prepare(self, volume, preset, ctx: RunContext) -> Any:
        arr = volume.array
        if arr.ndim != 3:
            raise UsageError("BiomedParse v2 takes a grey-scale 3D volume (one channel).")
        if self.compat and pre.upstream_axis(arr.shape) != 0:
            raise UsageError(f"compat_upstream: upstream would slice this {arr.shape} volume along axis "
                             f"{pre.upstream_axis(arr.shape)} (shape rule), not along k; turn compat_upstream off.")
        self._generator = torch.Generator().manual_seed(int(ctx.seed or 0))
        return {"array": arr, "preset": preset, "u8": {}, "seed": int(ctx.seed or 0)}

    def prompts_per_call(self, state: Any) -> int:
        return 10_000 if self.compat else self.max_prompts_per_call  # upstream: all prompts in one call

    def num_slices(self, state: Any) -> int:
        return int(state["array"].shape[0])

    def slice_shape(self, state: Any) -> tuple:
        return tuple(state["array"].shape[1:3])

    def _u8(self, state, k: int) -> np.ndarray:
        if k not in state["u8"]:
            state["u8"][k] = window_to_uint8(state["array"][k], state["preset"])
        return state["u8"][k]

    def encode_slices(self, state: Any, indices: Sequence[int], ctx: RunContext) -> Any:
        d = self.num_slices(state)
        needed = sorted({j for k in indices for j in pre.neighbours(k, d)})
        for n, j in enumerate(needed):
            ctx.check_cancel()
            self._u8(state, j)
            ctx.report(0.3 * (n + 1) / len(needed))
        local = {j: i for i, j in enumerate(needed)}
        vol = np.stack([state["u8"][j] for j in needed])
        resized, pad, padded = pre.square_pad_resize(vol, self.model.cfg.image_size, self.resize_path)
        packed = torch.stack([torch.stack([resized[local[j]] for j in pre.neighbours(k, d)]) for k in indices])
        with torch.inference_mode():
            enc = self.model.encode(packed.to(self.device))
        ctx.report(0.6)
        return {"enc": enc, "indices": list(indices), "pad": pad, "padded": padded, "seed": state["seed"]}

    # ---- prompts --------------------------------------------------------------------------------
    def _prompts(self, texts: Sequence[str]) -> Prompts:
        """The group's grounding tokens, encoded once (not again for every slice batch, nor for a repeated call)."""
        from ...clip_tokenizer import tokenize

        key = tuple(texts)
        if key not in self._text_cache:
            ids, att = tokenize(list(texts), self.model.cfg.context_length)
            with torch.inference_mode():
                prompts = self.model.embed_prompts(torch.from_numpy(ids).to(self.device),
                                                   torch.from_numpy(att).to(self.device))
            if len(self._text_cache) >= 64:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[key] = prompts
        return self._text_cache[key]

    def decode_slices(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[SliceDecoded]:
        texts = [(p.text or "").strip() for p in prompts]
        if not all(texts):
            raise UsageError("BiomedParse v2 needs a text prompt, e.g. 'Visualization of the liver in abdominal CT "
                             "imaging'.")
        enc: Encoded = encoded["enc"]
        if self.deterministic:
            sampling = Sampling(deterministic=True)
        elif self.compat:
            sampling = Sampling(generator=self._generator)
        else:
            sampling = Sampling(row_seeds=[row_seed(encoded["seed"], t, k) for k in encoded["indices"] for t in texts])
        with torch.inference_mode():
            out = self.model.decode(enc, self._prompts(texts), sampling, compat_upstream=self.compat)
        ctx.report(0.8)
        existence = out.existence.sigmoid().float().cpu().numpy()
        edges = ctx.options.get("edges") and out.edges is not None
        return [SliceDecoded(self._probability(out.masks[:, j].float(), encoded), existence[:, j].astype(np.float32),
                             self._probability(out.edges[:, j].float(), encoded) if edges else None)
                for j in range(len(texts))]

    # ---- recognition ----------------------------------------------------------------------------
    def recognizer(self, preset, **options: Any):
        from .recognition import V2Recognizer

        return V2Recognizer(preset.modality, preset.site, self.spec.existence_threshold or 0.5,
                            bool(AdapterOptions.from_mapping(self.options).compat_upstream), **options)

    def _probability(self, logits: torch.Tensor, encoded: dict[str, Any]) -> np.ndarray:
        """(B, h, w) logits -> (B, H, W) probabilities on the canonical slice grid."""
        padded = encoded["padded"]
        if self.compat:  # upstream: bicubic-antialias to 512, then nearest to the padded square
            big = pre.upsample_logits(logits[:, None], self.model.cfg.image_size)[:, 0]
            prob = F.interpolate(big.sigmoid()[None], size=(padded, padded), mode="nearest")[0]
        else:  # one resampling step straight to the padded square
            prob = pre.upsample_logits(logits[:, None], padded)[:, 0].sigmoid()
        (_, _), (a, b), (c, d) = encoded["pad"]
        return prob[:, a:padded - b, c:padded - d].cpu().numpy().astype(np.float32)
