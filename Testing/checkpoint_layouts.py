"""Writing checkpoints the way the upstream trainers did (used by Testing/models/test_official_checkpoints.py and
benchmarks/bench_checkpoint_memory.py).

SAT's trainer (zhaoziheng/SAT train/trainer.py) saved ``{'step', 'model_state_dict', 'optimizer_state_dict'}``
with numpy 1, whose AdamW param groups held numpy float64 learning rates (train/scheduler.py): the pickle
names numpy's scalar ``numpy.core.multiarray.scalar``. numpy 2 writes ``numpy._core.multiarray.scalar``;
:func:`save_numpy1` writes the numpy 1 name, as the published files have it.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

NP_SCALAR = np.float64(0.0).__reduce__()[0]  # numpy's scalar reconstructor (numpy._core.multiarray.scalar on numpy 2)


class _Numpy1Pickler(pickle._Pickler):
    """The pure-Python pickler (its ``save_global`` can be overridden) writing numpy 1's module name."""

    def save_global(self, obj, name=None):
        if obj is NP_SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1_PICKLE = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="numpy1_pickle")


def save_numpy1(obj: Any, path: Path) -> None:
    """``torch.save`` with numpy scalars pickled under numpy 1's name."""
    torch.save(obj, path, pickle_module=NUMPY1_PICKLE)


def adamw_state(params: Iterable[torch.Tensor], lr: Any, step: float = 190000.0) -> dict:
    """An AdamW ``state_dict()`` for ``params`` (random moments, no optimizer step: cheap at full size)."""
    params = list(params)
    state = {i: {"step": torch.tensor(step), "exp_avg": torch.randn_like(p) * 1e-3,
                 "exp_avg_sq": torch.rand_like(p) * 1e-6} for i, p in enumerate(params)}
    group = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "foreach": None,
             "maximize": False, "capturable": False, "differentiable": False, "fused": None,
             "params": list(range(len(params)))}
    return {"state": state, "param_groups": [group]}
