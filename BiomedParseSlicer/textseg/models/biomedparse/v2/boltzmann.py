"""BoltzFormer's Boltzmann attention sampling (upstream ``BoltzFormerTextDecoder.forward_prediction_heads``).

Upstream draws with ``torch.rand_like`` on the global RNG, once per prediction head (initial head + after each
of the 9 layers), each of shape (B*P*heads, queries, HW). Passing a ``torch.Generator`` seeded with s gives
the same numbers as ``torch.manual_seed(s)`` before upstream's forward, provided the calls happen in the same
order and with the same shapes (the decoder must call this once per head, in layer order).
``deterministic=True`` is the full-attention option: no sampling, mask = (p < threshold); with upstream's
threshold 1.1 every position is blocked, so ``open_full_rows`` opens every row: full attention.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def boltzmann_weights(prob: Tensor, layer_id: int, *, threshold: float = 1.1, base_temp: float = 1.0) -> Tensor:
    """w ∝ exp(p / T) over the positions with p < threshold, T = base_temp / (2 + layer_id); (..., HW) sums to 1."""
    temp = base_temp / (2 + layer_id)
    weights = torch.exp(prob / temp) * (prob < threshold).float()
    return weights / weights.sum(dim=-1, keepdim=True)


def keep_probability(weights: Tensor, sample_ratio: float = 0.1) -> Tensor:
    """P(a position stays masked) = (1 - w)^n, n = int(HW * sample_ratio): n weighted draws that all miss it."""
    return (1 - weights) ** int(weights.shape[-1] * sample_ratio)


def boltzmann_attention_mask(prob: Tensor, layer_id: int, *, threshold: float = 1.1, sample_ratio: float = 0.1,
                             base_temp: float = 1.0, deterministic: bool = False,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Boolean attention mask (True = position NOT attended) from sigmoid mask probabilities ``prob`` (..., HW).

    A position with p < threshold stays masked when its uniform draw u < ``keep_probability`` (one draw per
    position, in upstream's order and shape). Upstream computes the same formula from mask logits that differ
    from ours by float rounding, so where u falls within that rounding of the keep probability (1 draw in 10^7 to
    10^8 at full size, depending on the weights) the two masks differ in that position (docs/biomedparse-v2.md).
    """
    below = prob < threshold
    if deterministic:
        return below
    weights = boltzmann_weights(prob, layer_id, threshold=threshold, base_temp=base_temp)
    still_masked = keep_probability(weights, sample_ratio)
    draw = torch.rand(weights.shape, dtype=weights.dtype, device=weights.device, generator=generator)
    return torch.logical_and(below, draw < still_masked)


def open_full_rows(mask: Tensor) -> Tensor:
    """Mask2Former rule: a query whose every position is masked attends everywhere instead."""
    mask = mask.clone()
    mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
    return mask
