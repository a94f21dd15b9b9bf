"""Reading DICOM: a series folder (or one file) into an array whose geometry is checked file by file.

GDCM's series sorting (``ImageSeriesReader``) trusts the first two slices and drops files it cannot
parse: a damaged file, a duplicate, a missing slice, a slice without ImagePositionPatient or with
another orientation, pixel spacing or frame of reference, and a gantry tilt all gave a volume with the
wrong geometry and no word. Here every file's header is read with pydicom first and the geometry is
built from all of them:

* files are grouped by SeriesInstanceUID (the largest series is used; a note names the others);
* all slices must share size, pixel spacing, orientation and frame of reference, and each must have a
  position; they are sorted along the slice normal and every position must lie on the regular grid
  built from the first and last slice (within 0.01 mm or 1 % of the slice step): a gap, a missing or
  out-of-place slice is refused, naming the files;
* two files at one position: the same SOP instance (a copy) is used once with a note, different
  instances (several echoes/phases/time points in one series) are refused;
* gantry/detector tilt (slices stacked along a direction that is not their normal) is resampled onto a
  grid perpendicular to the slices, with the same slice planes, by linear interpolation (SimpleITK), and
  said in a note; tilts above 45 degrees are refused;
* one slice: the slice spacing comes from SpacingBetweenSlices, else SliceThickness, with a note;
* each file's pixel data must match its transfer syntax (an RLE/JPEG label over raw bytes crashes
  GDCM) and hold the declared number of bytes; the whole series must fit in memory;
* each file is decoded on its own by GDCM (an unreadable file is named), its size and position are
  checked against the grid, and the slices go into one array in grid order.
"""

from __future__ import annotations

import math
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import InputError
from .image_checks import _looks_like_raw_dicom, _one_line, check_memory

TAGS = ("Modality", "BodyPartExamined", "SeriesDescription", "SeriesInstanceUID", "StudyInstanceUID", "SliceThickness")
POSITION_TOL_MM = 0.01  # positions are written with ~1e-6 mm rounding; 0.01 mm is far below a voxel
POSITION_TOL_REL = 0.01  # ... or 1 % of the slice step, whichever is larger
ORIENTATION_TOL = 1e-3  # direction cosines
TILT_MIN_SHIFT_MM = 0.01  # in-plane drift over the whole stack below which there is no tilt
PIXEL_DATA = 0x7FE00010

_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_RLE = {"1.2.840.10008.1.2.5"}
_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
         "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}

Budget = Optional[Callable[[int], None]]


@dataclass
class _File:
    path: Path
    ds: Any
    sop: str
    frames: int
    position: Optional[np.ndarray] = None
    orientation: Optional[np.ndarray] = None  # 6 cosines
    decoded_bytes: int = 0


@dataclass
class DicomImage:
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    extra: dict[str, Any]


# ---- entry points ----------------------------------------------------------------------------------------
def read_dicom_folder(folder: Path, budget: Budget = None) -> DicomImage:
    """The largest DICOM series of ``folder`` (not recursive)."""
    files, other_series, non_images, skipped_series = _scan(folder)
    if not files:
        raise InputError(
            f"{folder}: the folder contains no DICOM image series. Give an image file (NIfTI, NRRD, MHA, "
            "PNG/JPEG/TIFF) or a folder holding one DICOM series.")
    notes = []
    if other_series:
        notes.append(f"{folder} holds {other_series + 1} DICOM series; using the largest ({len(files)} files)"
                     f"{'; ' + skipped_series if skipped_series else ''}.")
    if non_images:
        notes.append(f"{folder}: {len(non_images)} DICOM file(s) hold no image (reports, directories, ...) and were "
                     f"not used ({_names(non_images, 20)}).")
    return _read(files, str(folder), notes, budget)


def read_dicom_file(path: Path, budget: Budget = None) -> DicomImage:
    f = _header(path)
    if f is None:
        raise InputError(f"{path}: not a DICOM file.")
    if PIXEL_DATA not in f.ds:
        raise InputError(f"{path}: the DICOM file holds no image (SOP class {f.ds.get('SOPClassUID', '?')}).")
    return _read([f], str(path), [], budget)


# ---- scanning -----------------------------------------------------------------------------------------------
def _header(path: Path) -> Optional[_File]:
    """The file's header (pixel values not loaded), None if it is not DICOM; InputError if it is damaged."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise InputError(f"{path}: cannot be opened ({exc.strerror}).") from None
    preamble = head[128:132] == b"DICM"
    if not preamble and not _looks_like_raw_dicom(head):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), defer_size="64 KB", force=not preamble)
            meta = getattr(ds, "file_meta", None)
            sop = str(ds.get("SOPInstanceUID", "") or "") or (
                str(meta.get("MediaStorageSOPInstanceUID", "") or "") if meta is not None else "")
            frames = _int(ds, "NumberOfFrames", path, default=1)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        raise InputError(f"{path}: damaged DICOM file ({_one_line(exc)}); remove it from the folder or copy the series "
                         f"again.") from None
    return _File(path, ds, sop, max(frames, 1))


def _scan(folder: Path):
    """The files of the largest series; the number of other series; DICOM files without an image; a text naming
    the files of the other series. A DICOM file whose data set ends before its pixel data (pydicom stops
    quietly at damage) is refused: it may be a slice."""
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder ({exc.strerror}).") from None
    by_series: dict[str, list[_File]] = {}
    non_images: list[Path] = []
    for p in entries:
        f = _header(p)
        if f is None:
            continue  # not DICOM (README, checksums, ...): not a slice
        if PIXEL_DATA not in f.ds:
            if _is_image_class(f.ds):
                raise InputError(f"{p}: damaged DICOM file: it has no pixel data (its data set ends early); remove it "
                                 "from the folder or copy the series again.")
            non_images.append(p)
            continue
        by_series.setdefault(str(f.ds.get("SeriesInstanceUID", "") or ""), []).append(f)
    if not by_series:
        return [], 0, non_images, ""
    uid = max(sorted(by_series), key=lambda u: len(by_series[u]))
    others = sorted(u for u in by_series if u != uid)
    skipped = "; ".join(f"{len(by_series[u])} file(s) of series {u or '(no UID)'} ({_names(by_series[u])})"
                        for u in others[:3]) + (f"; {len(others) - 3} more series" if len(others) > 3 else "")
    return by_series[uid], len(others), non_images, ("not used: " + skipped) if skipped else ""


def _is_image_class(ds: Any) -> bool:
    """True for an image storage SOP class, and when the SOP class is missing (a data set cut short)."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = str(ds.get("SOPClassUID", "") or "") or str((meta.get("MediaStorageSOPClassUID", "") if meta is not None
                                                       else "") or "")
    if not uid:
        return True
    return "Image Storage" in UID(uid).name


# ---- attribute access on possibly damaged headers ----------------------------------------------------------------
def _int(ds: Any, keyword: str, path: Path, default: Optional[int] = None) -> int:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            if default is None:
                raise InputError(f"{path}: the DICOM file has no {keyword}.")
            return default
        return int(value)
    except InputError:
        raise
    except Exception:  # noqa: BLE001
        raise InputError(f"{path}: invalid {keyword} ({str(ds.get(keyword, ''))[:40]!r}).") from None


def _floats(ds: Any, keyword: str, path: Path, n: int) -> Optional[np.ndarray]:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
            return None
        vals = np.array([float(v) for v in (value if hasattr(value, "__iter__") and not isinstance(value, str)
                                                 else [value])], dtype=float)
    except Exception:  # noqa: BLE001
        raise InputError(f"{path}: invalid {keyword} ({str(ds.get(keyword, ''))[:60]!r}).") from None
    if vals.size != n or not np.all(np.isfinite(vals)):
        raise InputError(f"{path}: invalid {keyword} ({str(ds.get(keyword, ''))[:60]!r}: {n} numbers expected).")
    return vals


def _float(ds: Any, keyword: str, path: Path) -> Optional[float]:
    v = _floats(ds, keyword, path, 1)
    return None if v is None else float(v[0])


def _names(paths: Sequence[Any], limit: int = 3) -> str:
    names = [Path(p.path if isinstance(p, _File) else p).name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- pixel data against the transfer syntax ----------------------------------------------------------------------
def _check_pixels(f: _File) -> int:
    """Raise InputError when the pixel data cannot be what the header says; return the decoded bytes."""
    ds, path = f.ds, f.path
    meta = getattr(ds, "file_meta", None)
    ts = str((meta.get("TransferSyntaxUID", "") if meta is not None else "") or "1.2.840.10008.1.2")
    rows, cols = _int(ds, "Rows", path), _int(ds, "Columns", path)
    bits = _int(ds, "BitsAllocated", path)
    spp = _int(ds, "SamplesPerPixel", path, default=1)
    if rows < 1 or cols < 1 or rows > 65535 or cols > 65535:
        raise InputError(f"{path}: invalid image size {rows}x{cols} (Rows x Columns).")
    if bits not in (1, 8, 16, 32, 64):
        raise InputError(f"{path}: invalid BitsAllocated {bits}.")
    if spp not in (1, 3):
        raise InputError(f"{path}: {spp} samples per pixel; textseg reads grey (1) and RGB (3) DICOM images.")
    if f.frames > 1 << 16:
        raise InputError(f"{path}: invalid NumberOfFrames {f.frames}.")
    voxels = rows * cols * f.frames * spp
    stored = (voxels + 7) // 8 if bits == 1 else voxels * bits // 8
    raw = ds._dict.get(PIXEL_DATA)  # pydicom keeps the undecoded element: its length and file offset
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None:  # already a DataElement (small files): look at its value
        value = ds[PIXEL_DATA].value
        length = 0xFFFFFFFF if getattr(ds[PIXEL_DATA], "is_undefined_length", False) else len(value or b"")
    undefined = length == 0xFFFFFFFF
    name = getattr(meta.get("TransferSyntaxUID"), "name",
                   ts) if meta is not None and meta.get("TransferSyntaxUID") else ts
    size = path.stat().st_size
    if ts in _NATIVE:
        if undefined:
            raise InputError(f"{path}: the pixel data is compressed (encapsulated) but the transfer syntax "
                             f"({name}) says uncompressed; the file is damaged or mislabelled.")
        if length < stored:
            raise InputError(f"{path}: the pixel data holds {length} bytes but {rows}x{cols}"
                             f"{'x' + str(f.frames) if f.frames > 1 else ''} pixels of {bits} bits need {stored}; "
                             "the file is damaged.")
        if tell is not None and tell + stored > size:
            raise InputError(f"{path}: cannot be read as an image: the file ends before its pixel data does "
                             "(truncated download or copy?). Copy it again from the source.")
    elif ts in _RLE or ts in _JPEG or ts in _J2K:
        if not undefined:
            raise InputError(f"{path}: the transfer syntax ({name}) says compressed, but the pixel data is stored as "
                             f"plain bytes; the file is damaged or mislabelled (GDCM crashes on such files, so it is "
                             f"not read).")
        if tell is None:
            raise InputError(f"{path}: cannot locate the compressed pixel data.")
        frags = _fragments(path, tell, size)
        firsts = frags if len(frags) == f.frames else frags[:1]
        for start, flen in firsts:
            _check_codestream(path, ts, name, start, flen, spp, bits, rows, cols)
    else:
        raise InputError(f"{path}: transfer syntax {name} is not supported; convert the series to an "
                         "uncompressed or JPEG/JPEG 2000/RLE transfer syntax.")
    outbytes = 8 if bits > 16 else 4  # what GDCM hands over (rescaled values may widen the type)
    return voxels * outbytes


def _fragments(path: Path, tell: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the fragments of encapsulated pixel data (after the basic offset table)."""
    out = []
    with open(path, "rb") as fh:
        fh.seek(tell)
        pos, first = tell, True
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: cannot be read as an image: the file ends inside its compressed pixel "
                                 "data (truncated download or copy?). Copy it again from the source.")
            tag, n = head[:4], struct.unpack("<I", head[4:])[0]
            if tag == b"\xfe\xff\xdd\xe0":
                break
            if tag != b"\xfe\xff\x00\xe0" or n == 0xFFFFFFFF or pos + 8 + n > size:
                raise InputError(f"{path}: the compressed pixel data is damaged (bad item at byte {pos}).")
            if not first:
                out.append((pos + 8, n))
            first = False
            pos += 8 + n
            fh.seek(pos)
            if len(out) > 1 << 20:
                raise InputError(f"{path}: the compressed pixel data is damaged (too many fragments).")
    if not out:
        raise InputError(f"{path}: the compressed pixel data holds no fragment; the file is damaged.")
    return out


def _check_codestream(path: Path, ts: str, name: str, start: int, flen: int, spp: int, bits: int,
                      rows: int, cols: int) -> None:
    """The first fragment of a frame must start like the transfer syntax's codestream and, for JPEG and
    JPEG 2000, declare the header's image size (GDCM allocates by the header and crashes or over-allocates
    on a mismatch)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        head = fh.read(min(flen, 1 << 16))
    bad = f"{path}: the pixel data is not a {name} stream; the file is damaged or mislabelled (GDCM crashes on such " \
          "files, so it is not read)."
    found: Optional[tuple[int, int]] = None
    if ts in _RLE:
        if len(head) < 64:
            raise InputError(bad)
        nseg, *offsets = struct.unpack("<16I", head[:64])
        expected = spp * max(bits // 8, 1)
        used = offsets[:nseg] if 1 <= nseg <= 15 else []
        if nseg != expected or not used or used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) \
                or used[-1] >= flen:
            raise InputError(bad)
    elif ts in _JPEG:
        if not head.startswith(b"\xff\xd8"):
            raise InputError(bad)
        found = _jpeg_size(head)
    elif ts in _J2K:
        if head.startswith(b"\xff\x4f\xff\x51") and len(head) >= 24:
            xs, ys, xo, yo = struct.unpack(">4I", head[8:24])
            found = (ys - yo, xs - xo)
        elif head[4:12] == b"jP  \r\n\x87\n":
            i = head.find(b"ihdr")
            if i > 0 and len(head) >= i + 12:
                found = struct.unpack(">2I", head[i + 4:i + 12])
        else:
            raise InputError(bad)
    if found is not None and tuple(found) != (rows, cols):
        raise InputError(f"{path}: the compressed image is {found[0]}x{found[1]} pixels but the header says {rows}x"
                         f"{cols} (Rows x Columns); the file is damaged.")


def _jpeg_size(head: bytes) -> Optional[tuple[int, int]]:
    """(rows, columns) from a JPEG / JPEG-LS frame header, None if not within ``head``."""
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        seg = struct.unpack(">H", head[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if i + 9 > len(head):
                return None
            rows, cols = struct.unpack(">2H", head[i + 5:i + 9])
            return rows, cols
        i += 2 + seg
    return None


# ---- geometry -----------------------------------------------------------------------------------------------------
def _consistent(files: Sequence[_File], value: Callable[[_File], Any], same: Callable[[Any, Any], bool],
                what: str, show: Callable[[Any], str], source: str) -> Any:
    groups: list[tuple[Any, list[_File]]] = []
    for f in files:
        v = value(f)
        for g in groups:
            if same(g[0], v):
                g[1].append(f)
                break
        else:
            groups.append((v, [f]))
    if len(groups) > 1:
        groups.sort(key=lambda g: -len(g[1]))
        parts = "; ".join(f"{show(v)} in {len(fs)} file(s) ({_names(fs)})" for v, fs in groups[:3])
        raise InputError(f"{source}: the slices of the series differ in {what}: {parts}. One volume needs one "
                         f"{what}; remove the files that do not belong (or split the series).")
    return groups[0][0]


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:g}" for x in np.round(v, 4)) + ")"


def _read(files: list[_File], source: str, notes: list[str], budget: Budget) -> DicomImage:
    for f in files:
        f.decoded_bytes = _check_pixels(f)
        f.position = _floats(f.ds, "ImagePositionPatient", f.path, 3)
        f.orientation = _floats(f.ds, "ImageOrientationPatient", f.path, 6)
    if any(f.frames > 1 for f in files):
        if len(files) > 1:
            raise InputError(f"{source}: the series mixes {len(files)} files of which some hold several frames "
                             f"({_names([f for f in files if f.frames > 1])}); textseg reads one multi-frame file "
                             "or a series of single-frame files.")
        return _read_multiframe(files[0], source, notes, budget)
    size = _consistent(files, lambda f: (_int(f.ds, "Rows", f.path), _int(f.ds, "Columns", f.path)),
                       lambda a, b: a == b, "image size", lambda v: f"{v[0]}x{v[1]}", source)
    spp = _consistent(files, lambda f: _int(f.ds, "SamplesPerPixel", f.path, default=1), lambda a, b: a == b,
                      "samples per pixel", str, source)
    spacing_rc = _consistent(files, lambda f: _floats(f.ds, "PixelSpacing", f.path, 2),
                             lambda a, b: (a is None and b is None) or (a is not None and b is not None
                                                                         and np.allclose(a, b, rtol=1e-4, atol=1e-6)),
                             "pixel spacing", lambda v: "none" if v is None else f"{v[0]:g} x {v[1]:g} mm", source)
    _consistent(files, lambda f: str(f.ds.get("FrameOfReferenceUID", "") or ""), lambda a, b: a == b,
                "frame of reference", lambda v: v or "none", source)
    if spacing_rc is None:
        spacing_rc = np.array([1.0, 1.0])
        notes.append(f"{source}: no PixelSpacing; 1 mm pixels assumed.")
    if np.any(spacing_rc <= 0):
        raise InputError(f"{source}: invalid PixelSpacing {_fmt(spacing_rc)}.")
    missing_pos = [f for f in files if f.position is None]
    missing_ori = [f for f in files if f.orientation is None]
    if len(files) > 1 and missing_pos:
        raise InputError(f"{source}: {len(missing_pos)} of {len(files)} slices have no ImagePositionPatient "
                         f"({_names(missing_pos)}), so their place in the volume is unknown; remove them or "
                         "re-export the series with positions.")
    if len(files) > 1 and missing_ori:
        raise InputError(f"{source}: {len(missing_ori)} of {len(files)} slices have no ImageOrientationPatient "
                         f"({_names(missing_ori)}); the series' geometry is unknown.")
    if missing_ori:
        iop = np.array([1.0, 0, 0, 0, 1, 0])
        notes.append(f"{source}: no ImageOrientationPatient; axial orientation assumed.")
    else:
        iop = _consistent(files, lambda f: f.orientation, lambda a, b: np.allclose(a, b, atol=ORIENTATION_TOL),
                          "orientation", _fmt, source)
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise InputError(f"{source}: invalid ImageOrientationPatient {_fmt(iop)} (the row and column directions "
                         "must be perpendicular unit vectors).")
    r = r / np.linalg.norm(r)
    c = c - (c @ r) * r
    c = c / np.linalg.norm(c)
    n = np.cross(r, c)
    if missing_pos:
        pos = [np.zeros(3)]
        notes.append(f"{source}: no ImagePositionPatient; origin (0, 0, 0) assumed.")
    else:
        pos = [f.position for f in files]
    d = np.array([p @ n for p in pos])
    inst = [_instance(f.ds) for f in files]
    order = sorted(range(len(files)), key=lambda i: (d[i], inst[i]))
    files = [files[i] for i in order]
    pos = [pos[i] for i in order]
    files, pos = _drop_copies(files, pos, n, source, notes)
    px_i, px_j = float(spacing_rc[1]), float(spacing_rc[0])  # PixelSpacing = (between rows, between columns)
    tilt = None
    if len(files) == 1:
        sz, how = _single_slice_spacing(files[0], source)
        notes.append(f"{source}: one slice; slice spacing {sz:g} mm from {how}.")
    else:
        first, last = pos[0], pos[-1]
        step = (last - first) / (len(files) - 1)
        step_n = float(step @ n)
        tol = max(POSITION_TOL_MM, POSITION_TOL_REL * step_n)
        off = [float(np.linalg.norm(p - (first + k * step))) for k, p in enumerate(pos)]
        if max(off) > tol:
            raise InputError(_uneven_message(source, files, pos, n, step_n))
        shift = step - step_n * n
        drift = float(np.linalg.norm(shift)) * (len(files) - 1)
        sz = step_n
        if drift > TILT_MIN_SHIFT_MM:
            angle = math.degrees(math.atan2(float(np.linalg.norm(shift)), step_n))
            if angle > 45:
                raise InputError(f"{source}: the slices are stacked {angle:.1f} degrees off their normal; this is not "
                                 "a gantry tilt textseg can correct. Check the series' positions.")
            tilt = (angle, drift, step)
    est = sum(f.decoded_bytes for f in files)
    check_memory(est, source, f"its {len(files)} slices of {size[0]}x{size[1]} pixels")
    if budget:
        budget(est)
    array = _decode(files, size, spp, source, pos, r, c, px_i, px_j)
    direction = np.stack([r, c, n], axis=1)
    origin = pos[0]
    extra: dict[str, Any] = {"dicom": _tags(files[0].ds), "dicom_files": [str(f.path) for f in files], "notes": notes}
    if tilt is not None:
        angle, drift, step = tilt
        array = _untilt(array, (px_i, px_j, sz), origin, direction, step)
        extra["dicom_resampled"] = {"tilt_degrees": round(angle, 4), "in_plane_shift_mm": round(drift, 4)}
        notes.append(f"{source}: gantry/detector tilt of {angle:.2f} degrees: the slices were resampled onto a grid "
                     f"perpendicular to them (same slice planes, linear interpolation; the last slice moved "
                     f"{drift:.1f} mm in-plane).")
    return DicomImage(array, (px_i, px_j, sz), tuple(float(x) for x in origin), direction, extra)


def _instance(ds: Any) -> int:
    """InstanceNumber, only to order copies at one position (0 when absent or invalid)."""
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except Exception:  # noqa: BLE001
        return 0


def _drop_copies(files: list[_File], pos: list[np.ndarray], n: np.ndarray, source: str, notes: list[str]):
    keep_f, keep_p, copies = [files[0]], [pos[0]], []
    for f, p in zip(files[1:], pos[1:]):
        if float(np.linalg.norm(p - keep_p[-1])) < POSITION_TOL_MM and len(files) > 1:
            prev = keep_f[-1]
            if f.sop and f.sop == prev.sop:
                copies.append((f, prev))
                continue
            raise InputError(f"{source}: two different images at the same position {_fmt(p)} ({prev.path.name} and "
                             f"{f.path.name}): the series holds more than one volume (several echoes, phases or time "
                             "points) or a duplicated slice; keep the files of one volume in the folder.")
        keep_f.append(f)
        keep_p.append(p)
    if copies:
        notes.append(f"{source}: {len(copies)} file(s) are copies of another file of the series (same SOP Instance "
                     "UID and position) and were used once: " + ", ".join(f"{a.path.name} = {b.path.name}"
                                                                         for a, b in copies[:3]) + ".")
    return keep_f, keep_p


def _uneven_message(source: str, files: list[_File], pos: list[np.ndarray], n: np.ndarray, step_n: float) -> str:
    d = [float(p @ n) for p in pos]
    gaps = np.diff(d)
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    inplane = [float(np.linalg.norm((b - a) - ((b - a) @ n) * n)) for a, b in zip(pos, pos[1:])]
    if np.allclose(gaps, typical, atol=max(POSITION_TOL_MM, POSITION_TOL_REL * typical)):
        i = int(np.argmax(np.abs(np.array(inplane) - float(np.median(inplane)))))
        return (f"{source}: the slices are not on a regular grid: between {files[i].path.name} and "
                f"{files[i + 1].path.name} the position moves {inplane[i]:.2f} mm within the slice plane where the "
                f"other slices move {float(np.median(inplane)):.2f} mm; the series is damaged or mixes acquisitions.")
    missing = gaps[worst] / typical - 1 if typical > 0 else 0
    hint = f" ({round(missing)} slice(s) missing?)" if missing > 0.5 and abs(missing - round(missing)) < 0.1 else ""
    return (f"{source}: the slices are not evenly spaced: {gaps[worst]:.3f} mm between {files[worst].path.name} and "
            f"{files[worst + 1].path.name}, {typical:.3f} mm between the others{hint}. textseg does not resample "
            "uneven series: add the missing slices, or convert the series with a tool that resamples it (3D "
            "Slicer, dcm2niix) and give that file.")


def _single_slice_spacing(f: _File, source: str) -> tuple[float, str]:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        v = _float(f.ds, key, f.path)
        if v is not None and v > 0:
            return v, key
    return 1.0, "no SpacingBetweenSlices or SliceThickness (1 mm assumed)"


def _tags(ds: Any) -> dict[str, str]:
    out = {}
    for key in TAGS:
        if key in ds:
            try:
                out[key] = str(ds.get(key) if ds.get(key) is not None else "").strip()
            except Exception:  # noqa: BLE001
                continue
    return out


# ---- pixels ---------------------------------------------------------------------------------------------------------
def _itk_read(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        detail = re.sub(r"^.*?ERROR: \w+\(0x[0-9a-f]+\): ", "", _one_line(exc, 300))[:120]
        raise InputError(f"{path}: GDCM cannot decode this DICOM file ({detail}); it is damaged"
                         f"{_trailing(path)}. Remove it from the folder or copy the series again.") from None


def _trailing(path: Path) -> str:
    """' (N bytes follow its pixel data)' when a few bytes that are no DICOM element follow the pixel data."""
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), defer_size="64 KB")
        raw = ds._dict.get(PIXEL_DATA)
        size = path.stat().st_size
        if raw is None or getattr(raw, "value_tell", None) is None:
            return ""
        if raw.length == 0xFFFFFFFF:
            frags = _fragments(path, raw.value_tell, size)
            end = frags[-1][0] + frags[-1][1] + 8  # the sequence delimitation item follows the last fragment
        else:
            end = raw.value_tell + raw.length
        extra = size - end
        return f" ({extra} bytes follow its pixel data)" if 0 < extra < 8 else ""
    except Exception:  # noqa: BLE001 - only for the wording of an error
        return ""


def _decode(files: list[_File], size: tuple[int, int], spp: int, source: str, pos: list[np.ndarray],
            r: np.ndarray, c: np.ndarray, px_i: float, px_j: float) -> np.ndarray:
    import SimpleITK as sitk

    rows, cols = size
    array = None
    for k, f in enumerate(files):
        img = _itk_read(f.path)
        if img.GetSize()[:2] != (cols, rows) or (img.GetDimension() == 3 and img.GetSize()[2] != 1):
            raise InputError(f"{f.path}: GDCM reads {img.GetSize()} pixels where the header says {cols}x{rows}; the "
                             f"file is damaged.")
        if f.position is not None and len(img.GetOrigin()) == 3 and \
                np.linalg.norm(np.array(img.GetOrigin()) - f.position) > POSITION_TOL_MM:
            raise InputError(f"{f.path}: GDCM places this slice at {_fmt(np.array(img.GetOrigin()))}, its header at "
                             f"{_fmt(f.position)}; the file is damaged.")
        a = sitk.GetArrayViewFromImage(img)
        if img.GetDimension() == 3:
            a = a[0]
        if array is None:
            array = np.empty((len(files),) + a.shape, a.dtype)
        elif a.shape != array.shape[1:]:
            raise InputError(f"{f.path}: {a.shape} values per slice where the other slices have {array.shape[1:]}.")
        if a.dtype != array.dtype and np.result_type(array.dtype, a.dtype) != array.dtype:
            array = array.astype(np.result_type(array.dtype, a.dtype))
        array[k] = a
    assert array is not None
    return array


def _untilt(array: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray, direction: np.ndarray,
            step: np.ndarray) -> np.ndarray:
    """Resample a sheared stack (slice k at origin + k * step) onto the orthogonal grid with the same planes."""
    import SimpleITK as sitk

    sheared_dir = direction.copy()
    sheared_dir[:, 2] = step / np.linalg.norm(step)
    src = sitk.GetImageFromArray(array.astype(np.float32, copy=False), isVector=array.ndim == 4)
    src.SetSpacing((spacing[0], spacing[1], float(np.linalg.norm(step))))
    src.SetOrigin(tuple(float(x) for x in origin))
    src.SetDirection(tuple(sheared_dir.ravel()))
    ref = sitk.Image(src.GetSize(), src.GetPixelID(), src.GetNumberOfComponentsPerPixel())
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(float(x) for x in origin))
    ref.SetDirection(tuple(direction.ravel()))
    fill = float(array.min())
    out = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, fill))
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(array.dtype)
    return out


def _read_multiframe(f: _File, source: str, notes: list[str], budget: Budget) -> DicomImage:
    """One multi-frame file: GDCM decodes it; per-frame positions (enhanced objects), where present, must
    form a regular grid, and give the geometry."""
    import SimpleITK as sitk

    check_memory(f.decoded_bytes, source, f"its {f.frames} frames")
    if budget:
        budget(f.decoded_bytes)
    img = _itk_read(f.path)
    array = sitk.GetArrayFromImage(img)
    if array.ndim == 2:
        array = array[None]
    spacing = tuple(float(s) for s in img.GetSpacing())
    origin = tuple(float(o) for o in img.GetOrigin())
    direction = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    pos = _frame_positions(f)
    if pos is not None and len(pos) == array.shape[0] and len(pos) > 1:
        n = direction[:, 2]
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
        step_n = float(step @ n)
        tol = max(POSITION_TOL_MM, POSITION_TOL_REL * abs(step_n))
        if any(float(np.linalg.norm(p - (pos[0] + k * step))) > tol for k, p in enumerate(pos)) or \
                float(np.linalg.norm(step - step_n * n)) * (len(pos) - 1) > TILT_MIN_SHIFT_MM or abs(step_n) < tol:
            raise InputError(f"{source}: the frames of this multi-frame file are not on a regular grid (positions "
                             f"{_fmt(pos[0])} .. {_fmt(pos[-1])}); textseg does not resample them.")
        if step_n < 0:
            array = array[::-1].copy()
            origin = tuple(float(x) for x in pos[-1])
        else:
            origin = tuple(float(x) for x in pos[0])
        spacing = (spacing[0], spacing[1], abs(step_n))
    elif array.shape[0] > 1:
        notes.append(f"{source}: a multi-frame image without per-frame positions; slice spacing {spacing[2]:g} mm as "
                     "GDCM reads it.")
    declared = _multiframe_pixel_spacing(f)
    if declared is not None and not np.allclose([declared[1], declared[0]], spacing[:2], rtol=1e-4):
        raise InputError(f"{source}: GDCM reads a pixel spacing of {spacing[0]:g} x {spacing[1]:g} mm where the header "
                         f"says {declared[1]:g} x {declared[0]:g} mm; the multi-frame file is incomplete or damaged.")
    extra = {"dicom": _tags(f.ds), "notes": notes}
    return DicomImage(np.ascontiguousarray(array), spacing, origin, direction, extra)


def _multiframe_pixel_spacing(f: _File) -> Optional[np.ndarray]:
    """PixelSpacing of a multi-frame file: top level, else the shared functional groups' pixel measures."""
    top = _floats(f.ds, "PixelSpacing", f.path, 2)
    if top is not None:
        return top
    try:
        shared = f.ds.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
        return _floats(measures[0], "PixelSpacing", f.path, 2) if measures else None
    except InputError:
        raise
    except Exception:  # noqa: BLE001
        return None


def _frame_positions(f: _File) -> Optional[list[np.ndarray]]:
    try:
        groups = f.ds.get("PerFrameFunctionalGroupsSequence")
        if not groups:
            return None
        out = []
        for item in groups:
            seq = item.get("PlanePositionSequence")
            if not seq:
                return None
            p = _floats(seq[0], "ImagePositionPatient", f.path, 3)
            if p is None:
                return None
            out.append(p)
        return out
    except InputError:
        raise
    except Exception:  # noqa: BLE001
        return None


def dicom_file_list_size(folder: Path) -> int:
    """Total bytes of the regular files of a folder (for a read's time limit)."""
    total = 0
    try:
        for p in folder.iterdir():
            try:
                if p.is_file():
                    total += p.stat().st_size
            except OSError:
                continue
    except OSError:
        pass
    return total

