"""Checks of an image file's header against its own data before ITK/GDCM sees it.

ITK and GDCM trust headers: a NRRD field line of ~1000 characters that fails to parse, a MetaImage
with ``NDims = -1`` or ``99999``, or RLE-labelled DICOM pixels that are not an RLE stream crash the
process (SIGSEGV/SIGFPE) or spin; a NIfTI or NRRD declaring 1024^3 voxels in a 5 KB file allocates
gigabytes before it fails; a truncated file or a MetaImage whose ``CompressedData = True`` covers raw
bytes is read with the missing part zero-filled or as garbage. These checks read only headers and
count (compressed) payload bytes, in pure Python, and raise an InputError that says what is wrong.
``check_file`` returns what the file declares (format, the ITK ImageIO to use, the payload size) so
that the caller can check memory and pin ITK to the format that was checked.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np

from ..errors import InputError

MiB = 1 << 20
GiB = 1 << 30
HEADER_LIMIT = 1 << 20  # no legitimate text header (NRRD, MetaImage) is larger
NRRD_FIELD_LINE_LIMIT = 900  # teem/ITK crash on unparsable field lines of ~1000 characters

# ITK ImageIO per format: ITK is pinned to the reader whose header was checked (it would otherwise
# pick one by content, e.g. NRRD for any file starting with "NRRD000").
ITK_IO = {"nifti": "NiftiImageIO", "nrrd": "NrrdImageIO", "meta": "MetaImageIO", "dicom": "GDCMImageIO",
          "png": "PNGImageIO", "jpeg": "JPEGImageIO", "tiff": "TIFFImageIO", "bmp": "BMPImageIO"}
SUPPORTED = "NIfTI, NRRD, MHA/MHD, DICOM, PNG/JPEG/TIFF/BMP, or a DICOM series folder"


@dataclass
class Declared:
    """What a file's header declares."""

    fmt: str
    payload_bytes: Optional[int] = None  # decoded pixel bytes (None: known only once ITK reads the header)
    notes: list[str] = field(default_factory=list)
    nifti2: bool = False

    @property
    def itk_io(self) -> str:
        return ITK_IO[self.fmt]


def sniff(path: Path) -> Optional[str]:
    """The format of a file by its name and first bytes, or None."""
    name = path.name.lower()
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "meta"
    if name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")):
        return "nifti"
    if head[128:132] == b"DICM" or name.endswith(".dcm") or _looks_like_raw_dicom(head):
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head.startswith(b"BM") and name.endswith(".bmp"):
        return "bmp"
    if name.endswith(".nrrd") or name.endswith(".nhdr"):
        return "nrrd"
    return None


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM file without the 128-byte preamble (old ACR-NEMA style): starts with group 0002 or 0008."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] < b"\x00\x02"


def check_file(path: Path) -> Declared:
    """Check a single image file; InputError naming the problem, else what it declares."""
    fmt = sniff(path)
    if fmt is None:
        raise InputError(f"{path}: not an image file textseg reads (unknown format). Supported: {SUPPORTED}.")
    if fmt == "nifti":
        return check_nifti(path)
    if fmt == "nrrd":
        return check_nrrd(path)
    if fmt == "meta":
        return check_metaimage(path)
    return Declared(fmt)  # DICOM files are checked by dicom_series; 2D formats once ITK read the header


# ---- memory -----------------------------------------------------------------------------------
def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (Linux MemAvailable; None where unknown), capped by
    $TEXTSEG_READ_MAX_MEMORY_MB."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    cap = os.environ.get("TEXTSEG_READ_MAX_MEMORY_MB")
    if cap:
        try:
            avail = min(avail or 1 << 62, int(float(cap) * MiB))
        except ValueError:
            pass
    return avail


def check_memory(nbytes: int, source: str, what: str) -> None:
    """Refuse an image whose pixels (read once by ITK, copied once into numpy) do not fit in memory."""
    avail = available_memory()
    if avail is not None and 2 * nbytes > avail:
        raise InputError(f"{source}: {what} need {_size(nbytes)} of memory (twice that while reading) but only "
                         f"{_size(avail)} is available; free memory or crop/downsample the image first.")


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _shape_text(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


# ---- payload counting ----------------------------------------------------------------------------
def _count(read: Callable[[int], bytes], need: int, chunk: int = 1 << 22) -> int:
    """Bytes a stream yields, stopping once ``need`` bytes were seen (no bound on what follows)."""
    n = 0
    while n < need:
        block = read(min(chunk, need - n))
        if not block:
            break
        n += len(block)
    return n


def _inflate_count(fh: BinaryIO, need: int, wbits: int) -> int:
    """Bytes a deflate stream (gzip: wbits 31, zlib or gzip: 47) inflates to, up to ``need``; several gzip members
    are followed. zlib checks each member's CRC at its end (zlib.error when the data are damaged: ITK reads
    damaged data as zeros without a word). Output is discarded in bounded pieces."""
    d = zlib.decompressobj(wbits)
    n = 0
    while n < need:
        buf = fh.read(1 << 22)
        if not buf:
            break
        while buf and n < need:
            n += len(d.decompress(buf, 1 << 24))
            buf = d.unconsumed_tail
            if d.eof:
                buf = d.unused_data + buf
                if not buf.strip(b"\0"):
                    return n  # zero padding after the last member
                d = zlib.decompressobj(wbits)
    return n


def _stream_bytes(fh: BinaryIO, encoding: str, need: int) -> int:
    """Decoded bytes available from ``fh`` (at the payload's start) for a gzip/zlib/bzip2/raw payload, up to
    ``need``; a damaged compressed stream raises zlib.error/OSError/ValueError."""
    if encoding == "raw":
        return _count(fh.read, need)
    if encoding == "gzip":
        return _inflate_count(fh, need, 31)
    if encoding == "bzip2":
        return _count(bz2.BZ2File(fh).read, need)
    if encoding == "zlib":  # MetaImage: zlib or gzip header (MetaIO inflates with automatic header detection)
        return _inflate_count(fh, need, 47)
    raise ValueError(f"unknown encoding {encoding}")


def _truncated(path: Path, have: Optional[int], need: int, what: str = "pixel data") -> InputError:
    counts = f"{have} of {need} bytes; " if have is not None else ""
    return InputError(f"{path}: cannot be read as an image: the file ends before its {what} does ({counts}"
                      "truncated download or copy?). Copy it again from the source.")


# ---- NIfTI ------------------------------------------------------------------------------------------
# datatype code -> (bytes per voxel, name); codes missing here are refused
_NIFTI_TYPES = {2: (1, "uint8"), 4: (2, "int16"), 8: (4, "int32"), 16: (4, "float32"), 64: (8, "float64"),
                128: (3, "RGB24"), 256: (1, "int8"), 512: (2, "uint16"), 768: (4, "uint32"), 1024: (8, "int64"),
                1280: (8, "uint64"), 2304: (4, "RGBA32")}
_NIFTI_REFUSED = {1: "1-bit binary", 32: "complex64", 1536: "float128", 1792: "complex128", 2048: "complex256"}


def _open_maybe_gz(path: Path) -> BinaryIO:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")  # type: ignore[return-value]


def check_nifti(path: Path) -> Declared:
    """NIfTI-1, NIfTI-2 or Analyze 7.5 header: dimensions, datatype, offset; the payload must be there."""
    name = path.name.lower()
    hdr_path = path
    if name.endswith((".img", ".img.gz")):  # the header lives beside the image file
        stem = path.name[: -len(".img.gz")] if name.endswith(".gz") else path.name[:-4]
        found = [path.with_name(stem + s) for s in (".hdr", ".hdr.gz") if path.with_name(stem + s).exists()]
        if not found:
            raise InputError(f"{path}: the header file {stem}.hdr of this NIfTI/Analyze image pair is missing.")
        hdr_path = found[0]
    try:
        with _open_maybe_gz(hdr_path) as fh:
            raw = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{hdr_path}: cannot be read as an image (damaged gzip stream: {exc}). "
                         "If it should be NIfTI, the file may be truncated or corrupt.") from None
    if len(raw) < 348:
        raise _truncated(hdr_path, len(raw), 348, "NIfTI header")
    endian = None
    for e in "<>":
        size = struct.unpack(e + "i", raw[:4])[0]
        if size in (348, 540):
            endian, hsize = e, size
            break
    if endian is None:
        raise InputError(f"{hdr_path}: cannot be read as an image: not a NIfTI header (it starts with "
                         f"{raw[:4].hex()}, not a header size of 348 or 540). Supported: {SUPPORTED}.")
    if hsize == 540:
        if len(raw) < 540:
            raise _truncated(hdr_path, len(raw), 540, "NIfTI-2 header")
        magic = raw[4:12]
        datatype, bitpix = struct.unpack(endian + "2h", raw[12:16])
        dims = struct.unpack(endian + "8q", raw[16:80])
        vox_offset = struct.unpack(endian + "q", raw[168:176])[0]
        single = magic[:3] == b"n+2"
        if magic[:3] not in (b"n+2", b"ni2"):
            raise InputError(f"{hdr_path}: header size 540 but no NIfTI-2 magic ({magic!r}); the file is damaged.")
    else:
        magic = raw[344:348]
        dims = struct.unpack(endian + "8h", raw[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
        vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
        single = magic[:3] == b"n+1"
        if magic[:3] not in (b"n+1", b"ni1") and not name.endswith((".hdr", ".hdr.gz", ".img", ".img.gz")):
            raise InputError(f"{hdr_path}: not a NIfTI-1 file (magic {magic!r} is neither 'n+1' nor 'ni1'); "
                             "the file is damaged or another format with a .nii name.")
    if hsize == 540:
        pixdim = struct.unpack(endian + "8d", raw[104:168])
        qcode, scode = struct.unpack(endian + "2i", raw[344:352])
        quatern = struct.unpack(endian + "6d", raw[352:400])
        srow = struct.unpack(endian + "12d", raw[400:496])
    else:
        pixdim = struct.unpack(endian + "8f", raw[76:108])
        qcode, scode = struct.unpack(endian + "2h", raw[252:256])
        quatern = struct.unpack(endian + "6f", raw[256:280])
        srow = struct.unpack(endian + "12f", raw[280:328])
    for name, values, used in (("pixdim", pixdim[:4], True), ("qform (quatern/qoffset)", quatern, qcode > 0),
                               ("sform (srow)", srow, scode > 0)):
        if used and not all(math.isfinite(v) for v in values):
            raise InputError(f"{hdr_path}: invalid NIfTI header: its {name} holds NaN or infinite numbers, so its "
                             "geometry is unknown (ITK can hang on such headers).")
    nd = dims[0]
    if not 1 <= nd <= 7:
        raise InputError(f"{hdr_path}: invalid NIfTI header: dim[0] = {nd} (the number of dimensions must be 1 to 7).")
    shape = [int(d) for d in dims[1 : nd + 1]]
    if any(d < 1 for d in shape):
        raise InputError(f"{hdr_path}: invalid NIfTI header: dimensions {shape} (each must be at least 1).")
    if datatype in _NIFTI_REFUSED:
        raise InputError(f"{hdr_path}: {_NIFTI_REFUSED[datatype]} voxels are not supported; convert the image "
                         "to an integer or float type.")
    if datatype not in _NIFTI_TYPES:
        raise InputError(f"{hdr_path}: invalid NIfTI header: unknown datatype code {datatype}.")
    itemsize, tname = _NIFTI_TYPES[datatype]
    size = list(shape) + [1] * (7 - len(shape))
    if size[3] > 1 and max(size[4:]) == 1:
        raise InputError(f"{path} is a 4D image (size {tuple(shape)}); extract one 3D volume (one time point) first.")
    if max(size[3:]) > 1 and not (size[3] == 1 and size[4] in (3, 4) and max(size[5:]) == 1):
        raise InputError(f"{path} has dimensions {tuple(shape)}; only 2D and 3D images (grey or RGB) are supported. "
                         "Multi-channel/4D series (time, diffusion) are not supported: extract one 3D volume first.")
    if max(shape) > 1 << 31:
        raise InputError(f"{hdr_path}: invalid NIfTI header: dimensions {shape}.")
    if not (vox_offset == vox_offset) or vox_offset < 0 or vox_offset > 1 << 40:
        raise InputError(f"{hdr_path}: invalid NIfTI header: vox_offset {vox_offset}.")
    if single and vox_offset < hsize:
        raise InputError(f"{hdr_path}: invalid NIfTI header: the pixel data offset ({vox_offset:g}) lies inside the "
                         f"{hsize}-byte header; the file is damaged.")
    payload = itemsize
    for d in shape:
        payload *= d
    notes = []
    if bitpix != 8 * itemsize:
        notes.append(f"{path}: the NIfTI header's bitpix ({bitpix}) does not match its datatype {tname} "
                     f"({8 * itemsize} bits); read as {tname}, as the datatype says.")
    check_memory(payload, str(path), f"its {_shape_text(shape)} {tname} voxels")
    data_path = hdr_path
    if not single:  # .hdr/.img pair: the data is in the .img file
        base = hdr_path.name[: -len(".hdr.gz")] if hdr_path.name.lower().endswith(".gz") else hdr_path.name[:-4]
        cands = [hdr_path.with_name(base + s) for s in (".img", ".img.gz", ".IMG")]
        data_path = next((c for c in cands if c.exists()), None)
        if data_path is None:
            raise InputError(f"{hdr_path}: the image file {base}.img of this NIfTI/Analyze pair is missing.")
    need = int(vox_offset) + payload
    try:
        with open(data_path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            have = _inflate_count(fh, need, 31) if gz else _count(fh.read, need)
    except EOFError:  # the gzip stream stops before its end marker
        raise _truncated(data_path, None, payload) from None
    except (OSError, zlib.error) as exc:
        raise InputError(f"{data_path}: cannot be read as an image (damaged compressed data: {exc}); the file may be "
                         "truncated or corrupt. Copy it again from the source.") from None
    if have < need:
        raise _truncated(data_path, max(0, have - int(vox_offset)), payload)
    return Declared("nifti", payload, notes, nifti2=hsize == 540)


# ---- NRRD -------------------------------------------------------------------------------------------
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2",
                   "ascii": "text", "text": "text", "txt": "text", "hex": "hex"}
_NRRD_SPATIAL_KINDS = {"domain", "space", "time"}


def _read_text_header(path: Path, end: Callable[[list[str]], bool], what: str) -> tuple[list[str], int]:
    """Header lines of a text header and the byte offset after it (the header ends where ``end`` says or at
    the end of the file); it must end within HEADER_LIMIT."""
    with open(path, "rb") as fh:
        blob = fh.read(HEADER_LIMIT)
    lines, pos = [], 0
    while True:
        nl = blob.find(b"\n", pos)
        if nl < 0:
            if len(blob) >= HEADER_LIMIT:
                raise InputError(f"{path}: the {what} header does not end within {HEADER_LIMIT // MiB} MiB; "
                                 "the file is damaged or not an image.")
            if pos < len(blob):
                lines.append(blob[pos:].rstrip(b"\r").decode("latin-1"))
            return lines, len(blob)
        line = blob[pos:nl].rstrip(b"\r").decode("latin-1")
        pos = nl + 1
        lines.append(line)
        if end(lines):
            return lines, pos


def check_nrrd(path: Path) -> Declared:
    import nrrd

    lines, data_start = _read_text_header(path, lambda ls: ls[-1] == "" and len(ls) > 1, "NRRD")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if not lines:
        raise InputError(f"{path}: not a NRRD file (empty header).")
    if not re.match(r"^NRRD000[1-5]$", lines[0].strip()):
        raise InputError(f"{path}: not a NRRD file (its first line is {lines[0][:40]!r}, not NRRD0001..NRRD0005).")
    for n, line in enumerate(lines[1:], start=2):
        if line.startswith("#") or ":=" in line:
            continue
        if len(line) > NRRD_FIELD_LINE_LIMIT:
            raise InputError(f"{path}: NRRD header line {n} is {len(line)} characters long; header fields are short, "
                             "so the file is damaged (ITK crashes on such lines, so it is not read).")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = nrrd.read_header(lines)
        dtype = nrrd.reader._determine_datatype(header)
    except Exception as exc:  # noqa: BLE001 - pynrrd raises NRRDError, ValueError, KeyError, ...
        raise InputError(f"{path}: invalid NRRD header ({_one_line(exc)}).") from None
    sizes = [int(s) for s in header["sizes"]]
    if int(header["dimension"]) != len(sizes) or not 1 <= len(sizes) <= 16 or any(s < 1 for s in sizes):
        raise InputError(f"{path}: invalid NRRD header: dimension {header['dimension']} with sizes {sizes}.")
    _check_nrrd_geometry(path, header)
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    spatial = [s for s, k in zip(sizes, kinds) if k in _NRRD_SPATIAL_KINDS
               or k == "none"] if "kinds" in header else sizes
    if len(spatial) > 3 and max(spatial[3:]) > 1:
        raise InputError(f"{path} is a 4D image (size {tuple(sizes)}); extract one 3D volume (one time point) first.")
    payload = dtype.itemsize
    for s in sizes:
        payload *= s
    encoding = _NRRD_ENCODINGS.get(str(header.get("encoding", "raw")).lower())
    if encoding is None:
        raise InputError(f"{path}: unsupported NRRD encoding '{header.get('encoding')}'.")
    check_memory(payload, str(path), f"its {_shape_text(sizes)} {dtype.name} voxels")
    data_file = header.get("data file") or header.get("datafile")
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)) or 0)
    line_skip = int(header.get("line skip", header.get("lineskip", 0)) or 0)
    if data_file:
        data_path = _nrrd_data_file(path, str(data_file))
        start = 0
    else:
        data_path, start = path, data_start
    if encoding in ("text", "hex"):
        return Declared("nrrd", payload)  # ITK parses the numbers and fails on too few itself
    try:
        with open(data_path, "rb") as fh:
            fh.seek(start)
            for _ in range(line_skip):
                if not fh.readline(HEADER_LIMIT):
                    break
            if byte_skip == -1:  # the data are the last bytes of the file (raw only)
                fh.seek(0, os.SEEK_END)
                have = fh.tell() - start
            else:
                if byte_skip < 0:
                    raise InputError(f"{path}: invalid NRRD header: byte skip {byte_skip}.")
                if encoding == "raw":
                    fh.seek(byte_skip, os.SEEK_CUR)
                have = _stream_bytes(fh, encoding, payload)
    except InputError:
        raise
    except EOFError:
        raise _truncated(data_path, None, payload) from None
    except (OSError, zlib.error, ValueError) as exc:
        raise InputError(f"{data_path}: cannot be read as an image (damaged {encoding} data: {_one_line(exc)}); "
                         "the file may be truncated or corrupt. Copy it again from the source.") from None
    if have < payload:
        raise _truncated(data_path, have, payload)
    return Declared("nrrd", payload)


def _check_nrrd_geometry(path: Path, header: dict) -> None:
    """Space directions (of the axes that have one) and spacings must be finite and non-zero, the origin finite."""
    dirs = header.get("space directions")
    if dirs is not None:
        for axis, d in enumerate(np.asarray(dirs, dtype=float)):
            if np.all(np.isnan(d)):
                continue  # 'none': a non-spatial axis
            if not np.all(np.isfinite(d)) or not np.linalg.norm(d) > 0:
                raise InputError(f"{path}: invalid NRRD header: the space direction of axis {axis + 1} is "
                                 f"{tuple(float(x) for x in d)} (it must be a non-zero vector).")
    spacings = header.get("spacings")
    if spacings is not None:
        sp = np.asarray(spacings, dtype=float)
        if np.any(np.isinf(sp)) or np.any(sp[np.isfinite(sp)] <= 0):
            raise InputError(f"{path}: invalid NRRD header: spacings {tuple(float(x) for x in sp)} (they must be "
                             "positive).")
    origin = header.get("space origin")
    if origin is not None and not np.all(np.isfinite(np.asarray(origin, dtype=float))):
        raise InputError(f"{path}: invalid NRRD header: space origin {tuple(origin)} (it must be finite).")


def _nrrd_data_file(path: Path, spec: str) -> Path:
    """The detached data file of a NRRD header: one regular file (not a device, pipe or list)."""
    if spec.strip().upper().startswith("LIST") or "%" in spec or len(spec.split()) > 1:
        raise InputError(f"{path}: NRRD data split over several files ('data file: {spec[:80]}') is not supported; "
                         "save the image as a single .nrrd or .nii.gz.")
    data = Path(spec.strip())
    data = data if data.is_absolute() else path.parent / data
    if not data.is_file():
        raise InputError(f"{path}: its data file {data.name} is missing or not a regular file.")
    return data


# ---- MetaImage --------------------------------------------------------------------------------------
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def check_metaimage(path: Path) -> Declared:
    lines, data_start = _read_text_header(
        path, lambda ls: ls[-1].strip().lower().startswith("elementdatafile"), "MetaImage")
    if not lines or not lines[-1].strip().lower().startswith("elementdatafile"):
        raise InputError(f"{path}: invalid MetaImage header: no ElementDataFile line (it must end the header).")
    fields: dict[str, str] = {}
    names: dict[str, str] = {}  # lower-case key -> as written
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_]+)\s*[=:]\s*(.*?)\s*$", line)
        if m:
            key = m.group(1).lower()
            if key in fields and key in ("ndims", "dimsize", "elementtype", "elementnumberofchannels",
                                         "compresseddata", "headersize"):
                raise InputError(f"{path}: invalid MetaImage header: {m.group(1)} is given twice.")
            fields[key] = m.group(2)
            names[key] = m.group(1)
    ndims = _int_field(path, fields, "ndims")
    if ndims is None:
        raise InputError(f"{path}: invalid MetaImage header: NDims is missing.")
    if not 2 <= ndims <= 4:
        raise InputError(f"{path}: invalid MetaImage header: NDims = {ndims} (textseg reads 2D and 3D images).")
    dims = _ints(path, fields, "dimsize")
    if dims is None or len(dims) != ndims or any(d < 1 for d in dims) or max(dims) > 1 << 31:
        raise InputError(f"{path}: invalid MetaImage header: DimSize = {fields.get('dimsize')!r} for NDims = {ndims}.")
    if ndims == 4 and dims[3] > 1:
        raise InputError(f"{path} is a 4D image (size {tuple(dims)}); extract one 3D volume (one time point) first.")
    _check_meta_geometry(path, fields, names, ndims)
    etype = fields.get("elementtype", "").upper()
    if etype not in _MET_TYPES:
        raise InputError(f"{path}: invalid MetaImage header: ElementType = {fields.get('elementtype')!r}.")
    channels = _int_field(path, fields, "elementnumberofchannels")
    channels = 1 if channels is None else channels
    if not 1 <= channels <= 4:
        raise InputError(f"{path} has {channels} values per voxel; expected grey or RGB. Multi-channel/4D series "
                         "(time, diffusion) are not supported: extract one 3D volume first.")
    payload = _MET_TYPES[etype] * channels
    for d in dims:
        payload *= d
    check_memory(payload, str(path), f"its {_shape_text(dims)} {etype} voxels")
    compressed = fields.get("compresseddata", "false").strip().lower() == "true"
    spec = fields.get("elementdatafile", "").strip()
    header_size = _int_field(path, fields, "headersize") or 0
    if spec.upper() == "LOCAL":
        data_path, start = path, data_start
    else:
        if spec.upper().startswith("LIST") or "%" in spec or len(spec.split()) > 1:
            raise InputError(f"{path}: MetaImage data split over several files (ElementDataFile = {spec[:80]}) is not "
                             "supported; save the image as a single .mha or .nii.gz.")
        data_path = Path(spec) if Path(spec).is_absolute() else path.parent / spec
        if not data_path.is_file():
            raise InputError(f"{path}: its data file {Path(spec).name} is missing or not a regular file.")
        start = 0
    try:
        with open(data_path, "rb") as fh:
            if header_size == -1 and not compressed:
                fh.seek(0, os.SEEK_END)
                have = fh.tell() - start
            else:
                fh.seek(start + max(header_size, 0))
                if compressed:
                    magic = fh.read(2)
                    fh.seek(-len(magic), os.SEEK_CUR)
                    if not _zlib_or_gzip_header(magic):
                        raise InputError(f"{path}: the MetaImage header says CompressedData = True but the data is "
                                         "not a zlib/gzip stream; the file is damaged.")
                have = _stream_bytes(fh, "zlib" if compressed else "raw", payload)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"{data_path}: cannot be read as an image (damaged compressed data: {_one_line(exc)}); "
                         "the file may be truncated or corrupt. Copy it again from the source.") from None
    if have < payload:
        raise _truncated(data_path, have, payload)
    return Declared("meta", payload)


def _check_meta_geometry(path: Path, fields: dict[str, str], names: dict[str, str], ndims: int) -> None:
    """Spacing, origin and orientation must be finite, spacing positive and the matrix invertible (ITK's own
    refusals of these name the numbers, not the field)."""
    def numbers(key: str, n: int) -> Optional[list[float]]:
        if key not in fields:
            return None
        try:
            vals = [float(v) for v in fields[key].split()]
        except ValueError:
            vals = []
        if len(vals) < n or not all(math.isfinite(v) for v in vals[:n]):
            raise InputError(f"{path}: invalid MetaImage header: {names[key]} = {fields[key][:60]!r} ({n} finite "
                             f"numbers expected).")
        return vals[:n]
    for key in ("elementspacing", "elementsize"):
        sp = numbers(key, ndims)
        if sp is not None and min(sp) <= 0:
            raise InputError(f"{path}: invalid MetaImage header: {names[key]} = {fields[key][:60]!r} (voxel sizes must "
                             f"be positive).")
    for key in ("offset", "position", "origin"):
        numbers(key, ndims)
    for key in ("transformmatrix", "rotation", "orientation"):
        m = numbers(key, ndims * ndims)
        if m is not None and abs(np.linalg.det(np.array(m).reshape(ndims, ndims))) < 1e-6:
            raise InputError(f"{path}: invalid MetaImage header: {names[key]} = {fields[key][:80]!r} is not an "
                             f"orientation (its axes are not independent).")


def _zlib_or_gzip_header(b: bytes) -> bool:
    if len(b) < 2:
        return False
    if b == b"\x1f\x8b":
        return True
    return (b[0] & 0x0F) == 8 and (b[0] >> 4) <= 7 and ((b[0] << 8) | b[1]) % 31 == 0


def _int_field(path: Path, fields: dict[str, str], key: str) -> Optional[int]:
    if key not in fields:
        return None
    try:
        return int(fields[key].split()[0])
    except (ValueError, IndexError):
        raise InputError(f"{path}: invalid MetaImage header: {key} = {fields[key][:40]!r}.") from None


def _ints(path: Path, fields: dict[str, str], key: str) -> Optional[list[int]]:
    if key not in fields:
        return None
    try:
        return [int(v) for v in fields[key].split()]
    except ValueError:
        raise InputError(f"{path}: invalid MetaImage header: {key} = {fields[key][:40]!r}.") from None


def _one_line(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]
