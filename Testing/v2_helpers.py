"""A tiny random BiomedParse v2 (official checkpoint layout), a small CT and a CPU predictor on them: shared by
the recognition tests (models/), the Ray server tests (remote/) and the Slicer Logic tests (slicer/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from textseg.volume import Volume


def make_v2_weights(d: Path) -> Path:
    """A tiny random BiomedParse v2 checkpoint (official layout) in folder ``d``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("textseg.models.biomedparse.focal")
    from textseg.models.biomedparse.v2.loader import LOSS_KEYS
    from textseg.models.biomedparse.v2.model import REDUCED, build_v2

    torch.manual_seed(11)
    model = build_v2(REDUCED)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # livelier random logits: some targets pass, some do not
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    sd.update({"model." + k: torch.ones(3) for k in LOSS_KEYS})
    torch.save({"state_dict": sd}, d / "biomedparse_v2.ckpt")
    return d


def ct_volume():
    rng = np.random.default_rng(5)
    arr = rng.integers(-200, 300, size=(5, 24, 30)).astype(np.int16)
    return Volume(arr, spacing=(0.8, 0.9, 2.5), origin=(3.0, 4.0, 5.0), direction=np.diag([1.0, -1.0, 1.0]))


def v2_predictor(weights, **options):
    from textseg.models.biomedparse.v2.model import REDUCED
    from textseg.predictor import Predictor

    return Predictor("biomedparse-v2", device="cpu", weights_dir=weights, seed=3, config=REDUCED, batch_size=2,
                     **options)
