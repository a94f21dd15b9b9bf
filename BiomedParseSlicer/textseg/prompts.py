"""Prompts: text, optionally with a box and/or points given in physical coordinates.

Boxes and points are physical (LPS millimetres, what ITK/DICOM use; the Slicer module converts
from RAS markups). The engine maps them onto each model's grid, so a prompt means the same
region whatever the orientation of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .errors import UsageError

Point3 = tuple[float, float, float]


@dataclass(frozen=True)
class Prompt:
    text: str = ""
    box: Optional[tuple[Point3, Point3]] = None  # two opposite corners, LPS mm
    points: tuple[Point3, ...] = ()  # LPS mm
    point_labels: tuple[int, ...] = ()  # 1 = inside the target, 0 = outside

    def __post_init__(self) -> None:
        text = " ".join(str(self.text).split())
        object.__setattr__(self, "text", text)
        if self.box is not None:
            box = np.asarray(self.box, dtype=float)
            if box.shape != (2, 3) or not np.isfinite(box).all():
                raise UsageError(f"A box prompt is two corner points (x, y, z) in mm; got {self.box!r}.")
            object.__setattr__(self, "box", (tuple(box[0]), tuple(box[1])))
        pts = np.asarray(self.points, dtype=float).reshape(-1, 3) if len(self.points) else np.zeros((0, 3))
        if not np.isfinite(pts).all():
            raise UsageError("Point prompts must be finite (x, y, z) coordinates in mm.")
        object.__setattr__(self, "points", tuple(tuple(p) for p in pts))
        labels = tuple(int(v) for v in self.point_labels) if self.point_labels else (1,) * len(pts)
        if len(labels) != len(pts) or any(v not in (0, 1) for v in labels):
            raise UsageError("Each point prompt needs a label: 1 (inside the target) or 0 (outside).")
        object.__setattr__(self, "point_labels", labels)
        if not text and self.box is None and not len(pts):
            raise UsageError("An empty prompt: type a target (e.g. 'liver'), or give a box or points.")

    @property
    def kinds(self) -> tuple[str, ...]:
        k = []
        if self.text:
            k.append("text")
        if self.box is not None:
            k.append("box")
        if self.points:
            k.append("point")
        return tuple(k)

    @property
    def label(self) -> str:
        """A name for the segment made from this prompt."""
        if self.text:
            return self.text
        return "box prompt" if self.box is not None else "point prompt"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"text": self.text}
        if self.box is not None:
            d["box"] = [list(c) for c in self.box]
        if self.points:
            d["points"] = [list(p) for p in self.points]
            d["point_labels"] = list(self.point_labels)
        return d

    @staticmethod
    def from_any(p: Union[str, Prompt, dict[str, Any]]) -> Prompt:
        if isinstance(p, Prompt):
            return p
        if isinstance(p, str):
            return Prompt(p)
        if isinstance(p, dict):
            unknown = set(p) - {"text", "box", "points", "point_labels"}
            if unknown:
                raise UsageError(f"Unknown prompt fields {sorted(unknown)}; use text, box, points, point_labels.")
            return Prompt(
                p.get("text", ""),
                tuple(map(tuple, p["box"])) if p.get("box") is not None else None,  # type: ignore[arg-type]
                tuple(map(tuple, p.get("points") or ())),
                tuple(p.get("point_labels") or ()),
            )
        raise UsageError(f"A prompt is text or a dict with text/box/points; got {type(p).__name__}.")


def parse_prompts(prompts: Union[str, Sequence[Union[str, Prompt, dict[str, Any]]]]) -> list[Prompt]:
    """Prompts from a list, or from text with one target per line (blank lines ignored)."""
    if isinstance(prompts, str):
        prompts = [line for line in prompts.splitlines() if line.strip()]
    out = [Prompt.from_any(p) for p in prompts]
    if not out:
        raise UsageError("No prompts given: type at least one target, one per line (e.g. 'liver').")
    return out
