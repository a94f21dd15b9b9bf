"""BiomedParse v1 existence test (upstream ``check_mask_stats``), recognition rules (NMS, combine).

Upstream, per 2D image (the 1024x1024 uint8 RGB model input) and predicted probability map p:
if max(255·p) <= 127 the four statistics are 0; else, over the pixels with 255·p >= 128,
(mean 255·p, mean R, mean G, mean B) / 256. Each statistic is tested with a one-sample K-S test
against Beta(a, b) from ``target_dist.json``; the adjusted p-value is (p1·p2·p3·p4)^0.25 and
"a lower p-value means likely not the class; recommended threshold 0.05".

For one sample x the K-S statistic is D = max(F(x), 1 - F(x)) and its exact p-value is
2·min(F(x), 1 - F(x)) (F = Beta cdf), which is what ``scipy.stats.kstest`` returns; we evaluate
it vectorised over slices. The adjusted p-value is returned unchanged as the existence score
(0..1): the predictor drops slices whose score is below the spec's threshold 0.05.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.special import betainc

from ....errors import WeightsError

TargetDist = dict[str, dict[str, list[list[float]]]]


def load_target_dist(path: Path) -> TargetDist:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        ok = isinstance(data, dict) and all(
            isinstance(v, dict) and all(np.asarray(p, float).shape == (4, 2) for p in v.values()) for v in data.values()
        )
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: not a BiomedParse target_dist.json ({exc}). Download it again: "
                           "`textseg models download biomedparse-v1`.") from None
    if not ok:
        raise WeightsError(f"{path}: not a BiomedParse target_dist.json (expected image type -> target -> 4 Beta "
                           "(a, b) pairs). Download it again: `textseg models download biomedparse-v1`.")
    return data


def find_params(dist: TargetDist, image_types: Sequence[str], target: str) -> Optional[tuple[str, str, np.ndarray]]:
    """(image type, target key, (4, 2) Beta parameters) of the first image type knowing the target."""
    t = target.strip().lower()
    for it in image_types:
        for key, params in dist.get(it, {}).items():
            if key.lower() == t:
                return it, key, np.asarray(params, np.float64)
    return None


def mask_stats(prob255: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Upstream ``mask_stats`` for a batch: prob255 (N, H, W) in 0..255, rgb (N, H, W, 3) uint8 -> (N, 4)."""
    n = prob255.shape[0]
    out = np.zeros((n, 4), np.float64)
    for k in range(n):
        m = prob255[k]
        if m.max() <= 127:
            continue
        sel = m >= 128
        out[k, 0] = m[sel].mean() / 256
        out[k, 1:] = rgb[k][sel].reshape(-1, 3).mean(0) / 256
    return out


def ks_pvalue_beta(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact one-sample (n = 1) K-S p-value of x against Beta(a, b): 2·min(F, 1 - F)."""
    f = betainc(a, b, np.clip(x, 0.0, 1.0))
    return np.minimum(1.0, 2.0 * np.minimum(f, 1.0 - f))


def adjusted_p_value(stats: np.ndarray, params: np.ndarray) -> np.ndarray:
    """(N, 4) statistics, (4, 2) Beta parameters -> (N,) adjusted p-values (product ** 0.25)."""
    ps = ks_pvalue_beta(stats, params[None, :, 0], params[None, :, 1])
    return np.prod(ps, axis=1) ** 0.25


# ---- recognition ("segment everything"), per 2D slice -------------------------------------------------
def non_maxima_suppression(probs: dict[str, np.ndarray], p_values: dict[str, float]) -> list[str]:
    """Upstream NMS: in descending p-value order keep a mask unless > 50 % of its area (p > 0.5)
    lies in an already kept mask; empty masks are dropped. Returns the kept targets."""
    kept: list[str] = []
    for t in sorted(probs, key=lambda t: p_values[t], reverse=True):
        region = probs[t] > 0.5
        area = int(region.sum())
        if area == 0:
            continue
        if not any(int((region & (probs[k] > 0.5)).sum()) > 0.5 * area for k in kept):
            kept.append(t)
    return kept


def combine_masks(probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Upstream ``combine_masks``: pixels with p > 0.1 vote for their most probable target; targets
    winning < 50 % of their own (p > 0.1) area are discarded, except the most confident target (highest
    mean p over its p > 0.1 area); each remaining pixel goes to the most probable kept target with p > 0.5.
    Ties go to the earlier target, as upstream's stable sort and max()."""
    names = list(probs)
    if not names:
        return {}
    stack = np.stack([probs[t] for t in names])
    cand = stack > 0.1
    area = cand.sum((1, 2))
    mean_p = np.where(area > 0, (stack * cand).sum((1, 2)) / np.maximum(area, 1), 0.0)
    any_cand = cand.any(0)
    winner = np.argmax(np.where(cand, stack, -np.inf), axis=0)
    won = np.array([(any_cand & (winner == i)).sum() for i in range(len(names))])
    best = int(np.argmax(mean_p))
    keep = [i for i in range(len(names)) if won[i] >= 0.5 * area[i] or i == best]
    masks = {names[i]: np.zeros(stack.shape[1:], np.uint8) for i in keep}
    sub = np.where(cand[keep] & (stack[keep] > 0.5), stack[keep], -np.inf)
    has = np.isfinite(sub).any(0)
    arg = np.argmax(sub, axis=0)
    for j, i in enumerate(keep):
        masks[names[i]][has & (arg == j)] = 1
    return masks
