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


def boltzmann_attention_mask(prob: Tensor, layer_id: int, *, threshold: float = 1.1, sample_ratio: float = 0.1,
                             base_temp: float = 1.0, deterministic: bool = False,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Boolean attention mask (True = position NOT attended) from sigmoid mask probabilities ``prob`` (..., HW).

    T = base_temp / (2 + layer_id); w ∝ exp(p / T) over positions with p < threshold; a position stays masked
    with probability (1 - w)^n, n = int(HW * sample_ratio), decided by one uniform draw per position.
    """
    below = prob < threshold
    if deterministic:
        return below
    temp = base_temp / (2 + layer_id)
    weights = torch.exp(prob / temp) * below.float()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    still_masked = (1 - weights) ** int(prob.shape[-1] * sample_ratio)
    draw = torch.rand(weights.shape, dtype=weights.dtype, device=weights.device, generator=generator)
    return torch.logical_and(below, draw < still_masked)


def open_full_rows(mask: Tensor) -> Tensor:
    """Mask2Former rule: a query whose every position is masked attends everywhere instead."""
    mask = mask.clone()
    mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
    return mask
