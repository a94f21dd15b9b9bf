"""Any segmentation file by its name: ``read_segments`` reads a ``.seg.nrrd``, a DICOM SEG or a label map,
``write_segmentation`` writes one of them by extension. The formats themselves live in ``segments``
(.seg.nrrd, label maps) and ``dicomseg`` (DICOM SEG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ..volume import Volume
from .dicomseg import read_dicom_seg, write_dicom_seg
from .segments import LABELMAP_SUFFIXES, PathLike, Segment, read_labelmap, read_seg_nrrd, write_labelmap, write_seg_nrrd


def read_segments(path: PathLike, labels: Optional[PathLike] = None, lazy: bool = False
                  ) -> tuple[Volume, Sequence[Segment]]:
    """Any segmentation textseg reads: ``.seg.nrrd``/``.seg.nhdr`` (Slicer, overlaps kept), a DICOM
    SEG file (``.dcm``), or a label map (NIfTI/NRRD/MHA) with an optional labels JSON (``lazy``:
    see ``read_labelmap``). Returns the segmentation's own grid and its segments."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".seg.nrrd", ".seg.nhdr")):
        return read_seg_nrrd(p)
    if name.endswith(".dcm") or (p.is_file() and _is_dicom_seg(p)):
        return read_dicom_seg(p)
    if not name.endswith(LABELMAP_SUFFIXES):
        raise InputError(f"{p}: unknown segmentation format. Give a .seg.nrrd, a DICOM SEG (.dcm) or a label map "
                         f"({', '.join(LABELMAP_SUFFIXES)}) with its labels JSON.")
    return read_labelmap(p, labels, lazy)


def _is_dicom_seg(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def write_segmentation(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False) -> Path:
    """Write by extension: ``.seg.nrrd`` (layers), ``.dcm`` (DICOM SEG) or a label map + labels JSON."""
    name = Path(path).name.lower()
    if name.endswith((".seg.nrrd", ".seg.nhdr")):
        return write_seg_nrrd(path, reference, segments, overwrite)
    if name.endswith(".dcm"):
        return write_dicom_seg(path, reference, segments, overwrite)
    if name.endswith(LABELMAP_SUFFIXES):
        return write_labelmap(path, reference, segments, overwrite)
    raise InputError(f"{path}: unknown output format. Use .seg.nrrd, .nii.gz (label map) or .dcm (DICOM SEG).")
