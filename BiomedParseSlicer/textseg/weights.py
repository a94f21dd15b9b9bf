"""Where model weights live and whether they are present (download/verify/import: issue #3).

Cache folder: ``$TEXTSEG_HOME`` or ``~/.textseg``; each model has ``<home>/models/<model id>/``.
Files shipped inside a PyPI package (deepbet) are found in that package; nothing is downloaded.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import List, Optional

from .catalog import ModelSpec, WeightFile
from .errors import WeightsError


def home() -> Path:
    return Path(os.environ.get("TEXTSEG_HOME") or Path.home() / ".textseg").expanduser()


def model_dir(spec: ModelSpec) -> Path:
    return home() / "models" / spec.id


def locate(spec: ModelSpec, wf: WeightFile, weights_dir: Optional[Path] = None) -> Optional[Path]:
    """The local path of one catalog file, or None when it is not present."""
    if wf.package:
        try:
            p = Path(str(metadata.distribution(wf.package).locate_file(wf.package_path or wf.name)))
        except metadata.PackageNotFoundError:
            return None
        return p if p.is_file() else None
    p = Path(weights_dir or model_dir(spec)) / wf.name
    return p if p.is_file() else None


def missing_files(spec: ModelSpec, weights_dir: Optional[Path] = None) -> List[WeightFile]:
    return [wf for wf in spec.files if locate(spec, wf, weights_dir) is None]


def is_ready(spec: ModelSpec, weights_dir: Optional[Path] = None) -> bool:
    return not missing_files(spec, weights_dir)


def require_weights(spec: ModelSpec, weights_dir: Optional[Path] = None) -> Path:
    """The model's weights folder; WeightsError naming the missing files and the fix otherwise."""
    missing = missing_files(spec, weights_dir)
    if missing:
        names = ", ".join(wf.name for wf in missing)
        pkgs = sorted({wf.package for wf in missing if wf.package})
        if pkgs:
            fix = f"install the package that ships them: pip install {' '.join(pkgs)}"
        else:
            fix = (
                f"download them with `textseg models download {spec.id}`, or import a file you "
                f"downloaded yourself with `textseg models import {spec.id} FILE`"
            )
        raise WeightsError(f"Model '{spec.id}' is missing weight file(s) {names} in {weights_dir or model_dir(spec)}: {fix}.")
    return Path(weights_dir or model_dir(spec))
