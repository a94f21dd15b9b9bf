"""Reading checkpoints safely and memory-mapped, and strict checks shared by the model loaders.

:func:`read_checkpoint` is the one ``torch.load`` of every model loader (BiomedParse v1/v2, SegVol, SAT and
its text encoder):

* ``weights_only=True`` always: torch's restricted unpickler builds tensors and plain containers, never
  arbitrary objects, so a file cannot run code when it is loaded.
* Before loading, torch's own list of the file's globals that its restricted unpickler does not allow
  (``torch.serialization.get_unsafe_globals_in_checkpoint``) is checked. The only ones accepted are numpy's
  scalar (under its numpy 1 name ``numpy.core.multiarray.scalar`` and its numpy 2 name
  ``numpy._core.multiarray.scalar``), ``numpy.dtype`` and numpy's dtype classes ``numpy.dtypes.*``: SAT's
  trainer saved the optimizer state, whose learning rates are numpy floats. Anything else is refused with a
  one-line message that names it. Those numpy names are allowed only for the one load, under a lock (torch
  keeps its allow-list process-wide).
* ``mmap=True`` for torch's zip format (every file saved by torch >= 1.6): tensors stay in the file's pages
  until used, so the optimizer state the official files carry (two thirds of BiomedParse v2's 4.46 GB) is
  never read, and a model built on the meta device takes the mapped tensors with ``assign=True``.

Torch older than 2.6 cannot allow numpy's scalar under its numpy 1 name (torch's allow-list takes
``(object, name)`` pairs from 2.6): files of tensors still load there; SAT's segmentation files are refused
with a message that says to upgrade torch.
"""

from __future__ import annotations

import pickle
import re
import threading
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import WeightsError

TORCH_FOR_NUMPY = (2, 6)  # torch.serialization.safe_globals with (object, name) pairs
_ALLOW_LOCK = threading.Lock()


def numpy_globals() -> dict[str, Any]:
    """Names a checkpoint may use for numpy's scalar and dtypes -> the objects to build them with."""
    import importlib

    import numpy as np

    scalar = np.float64(0.0).__reduce__()[0]  # numpy.core.multiarray.scalar (numpy 1) / numpy._core... (numpy 2)
    allowed: dict[str, Any] = {"numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar,
                               "numpy.dtype": np.dtype}
    try:
        dtypes = importlib.import_module("numpy.dtypes")  # numpy >= 1.25: one class per dtype
    except ImportError:
        dtypes = None
    for name in dir(dtypes):
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            allowed[f"numpy.dtypes.{name}"] = obj
    return allowed


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def numpy_allowlist_missing() -> Optional[str]:
    """None when this torch can allow numpy's scalar and dtypes for one load; else why not (for a message)."""
    import torch

    m = re.match(r"(\d+)\.(\d+)", _torch_version())
    recent = m is not None and (int(m.group(1)), int(m.group(2))) >= TORCH_FOR_NUMPY
    ser = torch.serialization
    if recent and hasattr(ser, "safe_globals") and hasattr(ser, "get_unsafe_globals_in_checkpoint"):
        return None
    return f"this is torch {_torch_version()}"


def _listed_globals(path: Path) -> Optional[set[str]]:
    """torch's list of the globals in ``path`` its weights-only unpickler does not allow; None if unknown."""
    import torch

    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is None:
        return None
    try:
        return set(lister(str(path)))
    except Exception:  # not torch's zip format, or a damaged file: the load says which
        return None


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def _refuse(path: Path, unexpected: Iterable[str], label: str) -> WeightsError:
    return WeightsError(
        f"{path.name} was not loaded: besides tensors it holds {_names(unexpected)}, which a {label} does not "
        f"contain and which loading could run as code. Use the official file, or one saved with "
        f"torch.save(model.state_dict()).")


def _too_old(path: Path, names: Iterable[str], why: str) -> WeightsError:
    return WeightsError(
        f"{path.name} holds numpy scalars in its optimizer state ({_names(names)}); loading it safely needs "
        f"torch >= {'.'.join(map(str, TORCH_FOR_NUMPY))} ({why}): upgrade torch (in 3D Slicer with the PyTorch "
        "extension, elsewhere `pip install -U torch`).")


def read_checkpoint(path: Union[str, Path], label: str, fix: str) -> Any:
    """``torch.load`` of ``path`` on the CPU: weights only, memory-mapped when the file is in torch's zip
    format, numpy's scalar and dtypes allowed (only they). ``label`` names what the file should be in
    messages ("SAT segmentation checkpoint"); ``fix`` says what to do with an unreadable file. Raises a
    one-line WeightsError for a file holding other globals, and for a truncated or corrupt file."""
    import torch

    path = Path(path)
    mapped = zipfile.is_zipfile(path)
    listed = _listed_globals(path) if mapped else None
    allowed = numpy_globals()
    numpy_used: list[str] = []
    if listed is not None:
        unexpected = listed - set(allowed)
        if unexpected:
            raise _refuse(path, unexpected, label)
        numpy_used = sorted(listed)
        if numpy_used and numpy_allowlist_missing():
            raise _too_old(path, numpy_used, numpy_allowlist_missing() or "")
    try:
        if numpy_used:
            with _ALLOW_LOCK, torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        named = set(re.findall(r"GLOBAL ([\w.]+)", str(exc)))  # torch that cannot list globals names one here
        if named and named <= set(allowed):
            raise _too_old(path, named, numpy_allowlist_missing() or f"torch {_torch_version()} refused them") from None
        if named:
            raise _refuse(path, named - set(allowed), label) from None
        raise _unreadable(path, label, fix, exc) from None
    except Exception as exc:  # truncated zip, HTML error page, LFS pointer, not a checkpoint at all
        raise _unreadable(path, label, fix, exc) from None


def _unreadable(path: Path, label: str, fix: str, exc: BaseException) -> WeightsError:
    detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return WeightsError(f"{path.name} is not a readable {label} ({type(exc).__name__}: {detail}); the file is "
                        f"probably truncated or corrupt: {fix}")


def assign_state_dict(model: Any, sd: Mapping[str, Any]) -> None:
    """``model.load_state_dict(sd, strict=True, assign=True)`` with every tensor in the model's own dtype.

    Assigning keeps the (memory-mapped) checkpoint tensors instead of copying them into the model's own,
    so a load needs about one model's worth of memory, not two; the model's random initial tensors are
    freed as they are replaced. Call after checking the keys (``key_mismatch``)."""
    own = model.state_dict()
    sd = {k: (v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


# ---- strict key checks -------------------------------------------------------------------------------
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
