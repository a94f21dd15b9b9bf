"""Strict checkpoint checks shared by the model loaders."""

from __future__ import annotations

from typing import Mapping, Sequence


def _show(keys: Sequence[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def key_mismatch(own: Mapping, sd: Mapping) -> str:
    """'' when ``sd`` has exactly the tensors (names and shapes) of ``own``; else what differs:
    missing, unexpected and reshaped tensors (shapes only, so it works on the meta device)."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_show(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} with another shape: "
                     + _show([f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in wrong]))
    return "; ".join(parts)
