"""SAT behind the predictor contract.

``prepare``: upstream's preprocessing of the canonical volume (preprocess.py: RAS order, 1x1x3 mm,
crop to image > 0, CT window / MR-PET percentiles, z-score), keeping the geometry to map back.
``encode``: nothing (a patch's features are ~2 GB at full size, so patches are encoded inside
``decode``, once per prompt group: the predictor hands up to ``prompts_per_call(state)`` prompts at
once). The windows' features of the image are kept in the feature cache (``models.feature_cache``, option
``feature_cache_bytes``), so later prompts on the same image (the annotator's next target) only decode: no
window is encoded twice while the cache holds it. ``decode``: prompts
lower-cased -> text tower with the modality code -> query embeddings;
sliding window over 288x288x96 patches (window.py) with Gaussian blending; each probability map
mapped back from the SAT grid onto the canonical grid (un-crop, linear resampling, orientation) when it
is read (``SATMap``): the predictor's mask needs only the part where the map reaches the threshold.
Prompts outside SAT's 497 trained classes run anyway, with a warning naming the closest classes.

Options (``models.options.AdapterOptions``, units and defaults there): ``compat_upstream`` (False: upstream's
grid, sampled along the input's axes, exact way back; True: also upstream's exact sample positions, see
preprocess.py), ``autocast``, ``memory_budget``, ``max_queries``, ``feature_cache_bytes``; tests inject
``network``, ``text_tower``, ``config``, ``patch``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import UsageError
from ...prompts import Prompt
from ..base import Decoded, DeferredMap, RunContext, VolumeAdapter, weight_file
from ..feature_cache import FeatureCache, cache_budget
from ..options import AdapterOptions
from . import BIOLORD_FILES, BIOLORD_PREFIX
from .preprocess import SATGeometry, preprocess
from .vocab import check_target, normalize, sat_modality
from .window import PATCH, sliding_window

CHECKPOINTS = {"sat-nano": ("nano.pth", "nano_text_encoder.pth", "nano"),
               "sat-pro": ("SAT_Pro.pth", "text_encoder.pth", "pro")}


@dataclass(frozen=True, eq=False)
class SATMap(DeferredMap):
    """One prompt's probabilities on the SAT grid, brought onto the canonical grid when read (the mask alone
    only where the map can reach the threshold: a fraction of the work for an organ; see SATGeometry)."""

    geo: SATGeometry
    sat_map: np.ndarray  # (x, y, z) float32 on the SAT grid

    def array(self) -> np.ndarray:
        return self.geo.to_canonical(self.sat_map)

    def mask(self, threshold: float) -> np.ndarray:
        return self.geo.mask_to_canonical(self.sat_map, threshold)


@dataclass
class SATState:
    image: np.ndarray  # (x, y, z) float32 on the SAT grid
    geo: SATGeometry
    modality: str  # upstream's code: "ct", "mri" or "pet"
    features: FeatureCache = field(default_factory=FeatureCache)  # (device, batch size, index): window features

    @property
    def cache_bytes(self) -> int:
        return self.features.nbytes


class SATAdapter(VolumeAdapter):
    # Prompts decoded per pass over the patches (each pass encodes every patch once); ``prompts_per_call``
    # lowers it so that the accumulated probabilities stay within ``memory_budget`` bytes (option, default 2 GiB).
    max_prompts_per_call = 64

    # ---- lifecycle --------------------------------------------------------------------------
    def load(self, device: Any) -> None:
        """Network and text tower from the catalog files; tests inject ``network``/``text_tower``
        (anything with ``encode``/``decode`` and ``embed(texts, modality)``)."""
        opts = AdapterOptions.from_mapping(self.options)  # a bad setting fails here
        autocast_dtype(opts.autocast, torch.device(device).type)
        self.network = self.options.get("network")
        self.text_tower = self.options.get("text_tower")
        if self.network is None or self.text_tower is None:
            from .loader import load_sat_network, load_text_tower
            from .network import PRESETS

            ckpt, text_ckpt, variant = CHECKPOINTS[self.spec.id]
            if self.network is None:
                cfg = self.options.get("config") or PRESETS[variant]  # config: tests use a reduced SATConfig
                self.network = load_sat_network(weight_file(self, ckpt), cfg)
            if self.text_tower is None:
                for name in BIOLORD_FILES:
                    weight_file(self, BIOLORD_PREFIX + name)  # WeightsError naming the file when missing
                folder = biolord_dir(weight_file(self, BIOLORD_PREFIX + BIOLORD_FILES[0]).parent)
                self.text_tower = load_text_tower(weight_file(self, text_ckpt), config_path=folder, tokenizer=folder)
        self.patch: tuple[int, int, int] = tuple(self.options.get("patch", PATCH))  # type: ignore[assignment]
        self.max_queries = opts.max_queries
        self.to(device)

    def to(self, device: Any) -> None:
        self.device = torch.device(device)
        for m in (self.network, self.text_tower):
            if hasattr(m, "to"):
                m.to(self.device)
            if hasattr(m, "eval"):
                m.eval()
        self.text_cache: dict[tuple[str, str], torch.Tensor] = {}

    # ---- image ------------------------------------------------------------------------------
    def prepare(self, volume, preset, ctx: RunContext) -> SATState:
        ctx.report(0.0, "SAT: preprocessing")
        modality = sat_modality(preset.modality)
        opts = AdapterOptions.from_mapping(self.options)
        image, geo = preprocess(volume, modality, compat=bool(opts.compat_upstream))
        shift = "" if max(abs(o) for o in geo.offset) < 1e-6 else \
            f"; voxel 0 at input index {', '.join(f'{o:.3g}' for o in geo.offset)} (upstream centres this grid)"
        ctx.log(f"SAT grid {'x'.join(map(str, geo.shape))} at {', '.join(f'{s:g}' for s in geo.spacing)} mm "
                f"(cropped to the foreground from {'x'.join(map(str, geo.resampled_shape))}{shift})")
        return SATState(image.astype(np.float32), geo, modality.lower())

    def prompts_per_call(self, state: SATState) -> int:
        budget = int(AdapterOptions.from_mapping(self.options).memory_budget)
        return int(min(self.max_prompts_per_call, max(1, budget // (4 * state.image.size))))

    # ---- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def queries(self, texts: Sequence[str], modality: str) -> torch.Tensor:
        """(N, 768) query embeddings of lower-cased texts with the modality code; cached per text."""
        todo = [t for t in dict.fromkeys(texts) if (t, modality) not in self.text_cache]
        for first in range(0, len(todo), self.max_queries):
            chunk = todo[first : first + self.max_queries]
            emb = self.text_tower.embed(chunk, modality)
            for t, e in zip(chunk, emb):
                self.text_cache[(t, modality)] = e.detach().float()
        return torch.stack([self.text_cache[(t, modality)] for t in texts])

    def _autocast(self):
        """Option ``autocast``: True (default) = float16 on CUDA as upstream (``torch.cuda.amp.autocast``),
        float32 elsewhere; False = float32 everywhere; "bfloat16" on CUDA or a CPU; "float16" on CUDA only
        (``autocast_dtype``). Measured differences from float32: docs/sat.md, "Precision"."""
        try:
            dtype = autocast_dtype(AdapterOptions.from_mapping(self.options).autocast, self.device.type)
        except UsageError:  # float16 asked for on CUDA, now on the CPU after running out of GPU memory: float32
            dtype = None
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def decode(self, encoded: SATState, prompts: Sequence[Prompt], ctx: RunContext) -> list[Decoded]:
        texts = [normalize(p.text) for p in prompts]
        warnings = [check_target(p.text, encoded.modality) for p in prompts]
        for w in dict.fromkeys(w for w in warnings if w):
            ctx.log(w)
        ctx.check_cancel()
        q = self.queries(texts, encoded.modality)

        encoded.features.budget = cache_budget(AdapterOptions.from_mapping(self.options).feature_cache_bytes,
                                               self.device)
        order, batch = itertools.count(), max(1, ctx.batch_size)

        def encode(patches):  # sliding_window encodes the batches in a fixed order for a given batch size
            key = (str(self.device), batch, next(order))
            feats = encoded.features.get(key)
            if feats is None:
                with self._autocast():
                    feats = self.network.encode(patches)
                encoded.features.put(key, feats)
            return feats

        def decode(features, qq):
            with self._autocast():
                return self.network.decode(features, qq)

        probs = sliding_window(encoded.image, q, encode, decode, patch=self.patch, device=self.device,
                               batch_size=batch, max_queries=self.max_queries,
                               progress=lambda f: ctx.report(f, "SAT: patches"), check_cancel=ctx.check_cancel)
        out = []
        for n, w in enumerate(warnings):
            extra: dict[str, Any] = {"sat_grid": list(encoded.geo.shape), "sat_text": texts[n]}
            if w:
                extra["vocabulary_warning"] = w
            out.append(Decoded(SATMap(encoded.geo, probs[n].numpy()), None, extra))
        return out


    def free_memory(self, encoded: Any) -> None:
        if isinstance(encoded, SATState):
            encoded.features.clear()


AUTOCAST_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                   "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def autocast_dtype(value: Any, device_type: str):
    """The autocast dtype the option ``autocast`` asks for on ``device_type`` (None: float32)."""
    if value is True or value is None:
        return torch.float16 if device_type == "cuda" else None
    if value is False:
        return None
    key = str(value).lower()
    if key in ("float32", "fp32", "off", "none"):
        return None
    if key not in AUTOCAST_DTYPES:
        raise UsageError(f"SAT option autocast={value!r}: use True (float16 on CUDA, as upstream), False (float32), "
                         "'float16' (CUDA) or 'bfloat16'.")
    if device_type not in ("cuda", "cpu"):
        raise UsageError(f"SAT option autocast={value!r}: mixed precision is offered on CUDA and CPU only, not on "
                         f"{device_type}; use autocast=False.")
    if AUTOCAST_DTYPES[key] == torch.float16 and device_type == "cpu":
        raise UsageError("SAT option autocast='float16' on a CPU: PyTorch's CPU float16 3D convolutions are about "
                         "200x slower than float32. Use autocast='bfloat16' or float32 (the CPU default).")
    return AUTOCAST_DTYPES[key]


def biolord_dir(folder) -> Any:
    """A folder with the BioLORD-2023-C files under their own names (the catalog stores them flat,
    prefixed): symbolic links (copies where links are not allowed) in ``<folder>/biolord``, or in a
    temporary folder when the weights folder is read-only."""
    import shutil
    import tempfile
    from pathlib import Path

    dest = Path(folder) / "biolord"
    try:
        dest.mkdir(exist_ok=True)
    except OSError:
        dest = Path(tempfile.mkdtemp(prefix="textseg-biolord-"))
    for name in BIOLORD_FILES:
        src, dst = Path(folder) / (BIOLORD_PREFIX + name), dest / name
        if dst.exists() or dst.is_symlink():
            continue
        try:
            dst.symlink_to(src.resolve())
        except OSError:
            shutil.copyfile(src, dst)
    return dest
