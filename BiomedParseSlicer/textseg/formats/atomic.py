"""Outputs written atomically: a temp file beside the target, renamed over it only once it is complete,
so a failure or a cancel never leaves a half-written file, and nothing is overwritten unless asked."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from ..errors import OutputExistsError, UsageError

PathLike = Union[str, Path]

# Names Windows reserves for devices, with or without an extension ("con.nrrd" too): a file so named cannot be
# made or copied there, so names the engine derives (map files, nnU-Net case ids) must avoid them.
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)),
                              *(f"LPT{n}" for n in range(1, 10))})


def windows_reserved(name: str) -> bool:
    """Whether the file name ``name`` (its part before the first '.', any case) is a Windows device name."""
    return name.split(".", 1)[0].strip().upper() in WINDOWS_RESERVED


def check_writable(path: PathLike) -> None:
    """UsageError now, before minutes of work, if ``path`` could not be written later: its nearest existing folder
    is a file, or a folder this user cannot write into (``atomic_output`` makes the missing folders below it)."""
    path = Path(path).absolute()
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"Cannot write {path}: {folder} is a file, not a folder; choose another output path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write {path}: no permission to write into {folder}; choose another output path.")


@contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``.

    OutputExistsError if ``path`` exists and overwrite is False. On failure the temp file is
    removed and an existing output stays untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or pass --overwrite to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
