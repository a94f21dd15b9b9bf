"""deepbet behind the predictor contract (prompt 'brain' on T1 MRI).

The network is the package's TorchScript pair (bounding-box model at 128^3, mask model at 256^3).
The steps follow ``deepbet.BrainExtraction.run_model`` and ``postprocess`` (largest connected
component, fill voids); the image is handed over in nibabel's closest-canonical RAS order, as
deepbet does itself, built from our canonical (closest-LPS) array by two flips and a transpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...prompts import Prompt
from ...volume import canonical_to_ras, ras_to_canonical
from ..base import Decoded, RunContext, VolumeAdapter, weight_file


class DeepBetAdapter(VolumeAdapter):
    max_prompts_per_call = 1

    def load(self, device: Any) -> None:
        import torch

        self.device = device
        self.model = torch.jit.load(str(weight_file(self, "model.pt")), map_location=device).eval()
        self.bbox_model = torch.jit.load(str(weight_file(self, "bbox_model.pt")), map_location=device).eval()

    def to(self, device: Any) -> None:
        self.device = device
        self.model.to(device)
        self.bbox_model.to(device)

    def prepare(self, volume, preset, ctx: RunContext) -> Any:
        return np.ascontiguousarray(canonical_to_ras(np.asarray(volume.array, dtype=np.float32)))

    def encode(self, state: Any, ctx: RunContext) -> Any:
        """deepbet has no prompt-independent stage to reuse; the whole network runs here once."""
        from deepbet.bet import BrainExtraction

        ctx.report(0.1, "deepbet: locating the brain")
        runner = BrainExtraction.__new__(BrainExtraction)  # reuse upstream's run_model/postprocess
        runner.model, runner.bbox_model, runner.bbox = self.model, self.bbox_model, None
        prob = runner.run_model(state.copy())
        ctx.check_cancel()
        ctx.report(0.8, "deepbet: postprocessing")
        mask = runner.postprocess(prob > 0.5)
        # Keep the probabilities but make the 0.5 threshold reproduce deepbet's postprocessed mask.
        out = np.where(mask, np.maximum(prob, 0.5), np.minimum(prob, np.float32(0.4999))).astype(np.float32)
        return ras_to_canonical(out)

    def decode(self, encoded: Any, prompts: Sequence[Prompt], ctx: RunContext) -> list[Decoded]:
        return [Decoded(encoded) for _ in prompts]
