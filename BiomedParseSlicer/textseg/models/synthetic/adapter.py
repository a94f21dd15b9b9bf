"""Weight-free thresholding adapters for plumbing tests (see the package docstring)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import UsageError
from ...prompts import Prompt
from ..base import Decoded, ModelAdapter, RunContext, SliceAdapter, SliceDecoded, VolumeAdapter
from ..options import AdapterOptions

RANGES = {"bone": (200.0, 3000.0), "air": (-2000.0, -500.0), "fat": (-150.0, -50.0), "soft tissue": (-50.0, 150.0)}
SIDES = ("left", "right", "superior", "inferior", "anterior", "posterior")


def parse(text: str) -> tuple[float, float, str]:
    t = text.lower().strip()
    side = ""
    for s in SIDES:
        if t.endswith(" " + s):
            side, t = s, t[: -len(s) - 1].strip()
    if t == "nothing":
        return (np.inf, np.inf, side)
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\.\.(-?\d+(?:\.\d+)?)", t)
    if m:
        return (float(m.group(1)), float(m.group(2)), side)
    if t in RANGES:
        return (*RANGES[t], side)
    raise UsageError(f"synthetic model: unknown prompt '{text}'")


def side_mask(shape_kji: tuple[int, int, int], side: str) -> np.ndarray:
    """Half of a canonical (closest-LPS) grid: i runs to the left, j posterior, k superior."""
    m = np.zeros(shape_kji, bool)
    k, j, i = shape_kji
    if side == "left":
        m[:, :, i // 2 :] = True
    elif side == "right":
        m[:, :, : i // 2] = True
    elif side == "posterior":
        m[:, j // 2 :, :] = True
    elif side == "anterior":
        m[:, : j // 2, :] = True
    elif side == "superior":
        m[k // 2 :] = True
    elif side == "inferior":
        m[: k // 2] = True
    else:
        m[:] = True
    return m


def _box_mask(volume, prompt: Prompt) -> np.ndarray:
    """Voxels of the canonical grid inside the prompt's physical box (LPS mm)."""
    corners = volume.physical_to_index(np.array(prompt.box))
    lo = np.floor(corners.min(0) + 0.5).astype(int)
    hi = np.floor(corners.max(0) + 0.5).astype(int)
    m = np.zeros(volume.shape, bool)
    lo = np.maximum(lo, 0)
    if (hi < 0).any():  # box entirely before the image: nothing inside
        return m
    m[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = True
    return m


class _Base(ModelAdapter):
    """Options: ``delay`` (seconds per step, for cancel tests); ``fits`` (simulated GPU memory:
    on a cuda device, a batch larger than ``fits`` raises torch's OutOfMemoryError; 0 = nothing fits)."""

    def load(self, device: Any) -> None:
        self.device = device
        opts = AdapterOptions.from_mapping(self.options)
        self.delay = float(opts.delay)
        self.fits = opts.fits
        self.calls = {"encode": 0, "decode": 0, "oom": 0, "to": []}

    def to(self, device: Any) -> None:
        self.device = device
        self.calls["to"].append(str(device))

    def _simulate_memory(self, ctx: RunContext, batch: int) -> None:
        if self.fits is not None and getattr(ctx.device, "type", "cpu") == "cuda" and batch > self.fits:
            import torch

            self.calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated: batch {batch} > {self.fits})")

    def prepare(self, volume, preset, ctx: RunContext) -> Any:
        arr = np.asarray(volume.array, dtype=np.float32)
        if arr.ndim == 4:
            arr = arr[..., :3].mean(-1)
        return {"volume": volume, "array": arr}

    def _prob(self, state, prompt: Prompt, sl=slice(None)) -> np.ndarray:
        arr = state["array"][sl]
        lo, hi, side = parse(prompt.text) if prompt.text else (-np.inf, np.inf, "")
        m = (arr >= lo) & (arr <= hi) & side_mask(state["array"].shape, side)[sl]
        if prompt.box is not None:
            m &= _box_mask(state["volume"], prompt)[sl]
        return m.astype(np.float32)


class Synthetic3D(_Base, VolumeAdapter):
    max_prompts_per_call = 1

    def encode(self, state: Any, ctx: RunContext) -> Any:
        self._simulate_memory(ctx, ctx.batch_size)
        self.calls["encode"] += 1
        return state

    def decode(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[Decoded]:
        out = []
        for p in prompts:
            self.calls["decode"] += 1
            steps = 10
            for s in range(steps):  # a long-ish operation with progress and cancel points
                ctx.check_cancel()
                if self.delay:
                    time.sleep(self.delay / steps)
                ctx.report((s + 1) / steps)
            prob = self._prob(encoded, p)
            out.append(Decoded(prob, existence=1.0 if prob.any() else 0.0))
        return out


class Synthetic2D(_Base, SliceAdapter):
    def num_slices(self, state: Any) -> int:
        return state["array"].shape[0]

    def slice_shape(self, state: Any) -> tuple:
        return state["array"].shape[1:3]

    def encode_slices(self, state: Any, indices: Sequence[int], ctx: RunContext) -> Any:
        self._simulate_memory(ctx, len(indices))
        self.calls["encode"] += 1
        if self.delay:
            time.sleep(self.delay)
        return (state, list(indices))

    def decode_slices(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[SliceDecoded]:
        state, idx = encoded
        out = []
        for p in prompts:
            self.calls["decode"] += 1
            prob = self._prob(state, p, slice(idx[0], idx[-1] + 1))
            out.append(SliceDecoded(prob, existence=prob.reshape(len(idx), -1).max(1)))
        return out
