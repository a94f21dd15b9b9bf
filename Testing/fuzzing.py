"""Seeded mutation fuzzing of the image readers (used by test_reader_fuzz.py and benchmarks/fuzz_readers.py).

Seeds are small valid files built here: NIfTI (.nii, .nii.gz), NRRD (raw, gzip), MetaImage (raw, zlib),
a 4-slice DICOM series (uncompressed, JPEG 2000, JPEG lossless, RLE; headers from the real CT series when
it is there) and a DICOM SEG. Each case applies one to three mutations (byte flips, truncation, junk,
header fields set to hostile values, DICOM attributes changed, files copied or removed) and reads the
result with ``read_volume`` (``read_segments`` for SEG). ``judge`` classifies the outcome:

* ``read``: a volume whose geometry the case's independent oracle confirms (pydicom's positions of every
  file for DICOM; the header's dimensions from nibabel / pynrrd / the MetaImage text otherwise; the seed's
  exact geometry and voxels when only pixel bytes changed);
* ``refused``: a TextsegError with a one-line message;
* a failure: an exception of another class, a message over several lines, or the reader's safety net
  (a crash by a signal, the time or memory limit), or a read whose geometry the oracle contradicts.
"""

from __future__ import annotations

import gzip
import logging
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

NETS = ("image reader crashed", "image reader was killed", "image reader stopped", "took longer than",
        "needs more memory than its header declares")
FORMATS = ("nifti", "nrrd", "meta", "dicom", "seg")
HOSTILE_NUMBERS = ["-1", "0", "1", "2", "3", "4", "5", "7", "99999", "2147483647", "-2147483648",
                   "4294967296", "1e308", "-1e-308", "nan", "inf", "", "abc", "1.5", "65535", "1000000"]


@dataclass
class Case:
    fmt: str
    path: Path
    mutations: list[str]
    seed_geometry: Optional[tuple] = None  # (shape, spacing, origin, direction, array) when only pixel bytes changed
    declared: Optional[tuple[int, ...]] = None  # (i, j, k) sizes from an independent header parse, if any


@dataclass
class Outcome:
    kind: str  # read / refused / FAIL
    detail: str = ""


# ---- seeds ----------------------------------------------------------------------------------------------------
def _phantom(shape=(5, 6, 7), dtype=np.int16) -> np.ndarray:
    a = (np.arange(np.prod(shape)) % 97 - 40).astype(dtype).reshape(shape)
    a[1:4, 2:5, 2:6] = 300
    return a


def make_image_seeds(folder: Path) -> dict[str, tuple[Path, Any]]:
    """name -> (path, reference Volume) of small valid NIfTI/NRRD/MetaImage files."""
    import SimpleITK as sitk

    from textseg.formats.images import read_volume

    folder.mkdir(parents=True, exist_ok=True)
    arr = _phantom()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    t = math.radians(20)
    img.SetDirection((math.cos(t), -math.sin(t), 0, math.sin(t), math.cos(t), 0, 0, 0, 1))
    seeds = {}
    for name, comp in (("s.nii", False), ("s.nii.gz", True), ("s.nrrd", False), ("z.nrrd", True), ("s.mha", False),
                       ("z.mha", True)):
        p = folder / name
        sitk.WriteImage(img, str(p), useCompression=comp)
        seeds[name] = (p, read_volume(p, isolate=False))
    return seeds


def _real_header(shared: Optional[Path]):
    import pydicom

    if shared is not None and shared.exists():
        return pydicom.dcmread(sorted(shared.iterdir())[0], stop_before_pixels=True)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    # the patient and study module's type 2 attributes (present, may be empty): a DICOM SEG copies them
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "FUZZ-1", "Fuzz^Seed", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "", "", "", ""
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.SliceThickness = "2"
    ds.PixelSpacing = [0.75, 0.75]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def make_dicom_seeds(folder: Path, shared_series: Optional[Path]) -> dict[str, Path]:
    """4-slice 16x16 series: uncompressed, JPEG 2000, JPEG lossless (GDCM's encoders), RLE (pydicom's)."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    base = _real_header(shared_series)
    seeds = {}
    for codec in ("native", "JPEG2000", "JPEG", "RLE"):
        out = folder / f"dicom_{codec}"
        out.mkdir(parents=True, exist_ok=True)
        series_uid = generate_uid()
        for k in range(4):
            pix = (np.arange(256, dtype=np.uint16).reshape(16, 16) * (k + 1)) % 3000
            ds = pydicom.Dataset()
            ds.update(base)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = base.file_meta.MediaStorageSOPClassUID
            ds.SOPClassUID = base.file_meta.MediaStorageSOPClassUID
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = series_uid
            ds.Rows = ds.Columns = 16
            ds.SamplesPerPixel = 1
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.ImagePositionPatient = [-100.0, -120.0, -50.0 + 2.0 * k]
            ds.InstanceNumber = k + 1
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = pix.tobytes()
            ds["PixelData"].VR = "OW"
            path = out / f"IM{k:03d}.dcm"
            if codec == "RLE":
                ds.compress(RLELossless, pix)
            elif codec != "native":
                tmp = folder / f"enc_{codec}.dcm"
                w = sitk.ImageFileWriter()
                w.SetFileName(str(tmp))
                w.SetImageIO("GDCMImageIO")
                w.UseCompressionOn()
                w.SetCompressor(codec)
                w.Execute(sitk.GetImageFromArray(pix.astype(np.uint16)[None]))
                enc = pydicom.dcmread(tmp)
                ds.file_meta.TransferSyntaxUID = enc.file_meta.TransferSyntaxUID
                ds.PixelData = enc.PixelData
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
                tmp.unlink()
            ds.save_as(path, enforce_file_format=True)
        seeds[f"dicom_{codec}"] = out
    return seeds


def make_seg_seed(folder: Path, series: Path) -> Path:
    from textseg.formats.dicomseg import write_dicom_seg
    from textseg.formats.images import read_volume
    from textseg.formats.segments import Segment

    vol = read_volume(series)
    m = np.zeros(vol.shape, np.uint8)
    m[1:3, 4:10, 3:12] = 1
    return write_dicom_seg(folder / "seg_seed.dcm", vol, [Segment("liver", m), Segment("spleen", 1 - m)])


# ---- mutations ----------------------------------------------------------------------------------------------------
def _header_len(data: bytes, fmt: str) -> int:
    if fmt == "nrrd":
        i = data.find(b"\n\n")
        return i + 2 if i > 0 else len(data)
    if fmt == "meta":
        i = data.find(b"ElementDataFile")
        j = data.find(b"\n", i)
        return j + 1 if j > 0 else len(data)
    return 352


def _bytes_mutation(rng: np.random.Generator, data: bytes, hlen: int) -> tuple[bytes, str, bool]:
    """One byte-level mutation; the flag says whether only pixel bytes (after the header) changed."""
    op = rng.integers(6)
    b = bytearray(data)
    if op == 0 and len(b):  # flip bytes in the header
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(0, max(1, min(hlen, len(b)))))] = int(rng.integers(256))
        return bytes(b), "flip header bytes", False
    if op == 1 and len(b) > hlen:  # flip bytes in the pixel data
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(hlen, len(b)))] = int(rng.integers(256))
        return bytes(b), "flip pixel bytes", True
    if op == 2:
        cut = int(rng.integers(0, max(1, len(b))))
        return bytes(b[:cut]), f"truncate at {cut}", False
    if op == 3:
        return bytes(b) + rng.bytes(int(rng.integers(1, 64))), "append junk", False
    if op == 4 and len(b) > 8:
        i = int(rng.integers(0, len(b)))
        return bytes(b[:i]) + rng.bytes(int(rng.integers(1, 16))) + bytes(b[i:]), "insert bytes", False
    i = int(rng.integers(0, max(1, len(b))))
    return bytes(b[:i]) + bytes(b[i + int(rng.integers(1, 32)):]), "delete bytes", False


def _text_field_mutation(rng: np.random.Generator, data: bytes, fmt: str) -> tuple[bytes, str]:
    hlen = _header_len(data, fmt)
    head, body = data[:hlen], data[hlen:]
    lines = head.split(b"\n")
    idx = [i for i, ln in enumerate(lines) if ln and not ln.startswith((b"NRRD", b"#"))
           and not ln.startswith(b"ElementDataFile")]
    if not idx:
        return data, "no field"
    i = int(rng.choice(idx))
    line = lines[i]
    sep = b":" if fmt == "nrrd" else b"="
    key, _, value = line.partition(sep)
    op = rng.integers(6)
    if op == 0:
        tokens = value.split()
        if tokens:
            tokens[int(rng.integers(len(tokens)))] = str(rng.choice(HOSTILE_NUMBERS)).encode()
        lines[i] = key + sep + b" " + b" ".join(tokens)
        what = f"field {key.strip().decode(errors='replace')} number"
    elif op == 1:
        lines[i] = key + sep + b" " + str(rng.choice(HOSTILE_NUMBERS)).encode()
        what = f"field {key.strip().decode(errors='replace')} value"
    elif op == 2:
        lines[i] = line + b" " + b"x" * int(rng.integers(900, 1200))
        what = "long line"
    elif op == 3:
        lines.insert(i, line)
        what = "duplicate line"
    elif op == 4:
        del lines[i]
        what = "delete line"
    else:
        choices = {b"nrrd": [b"encoding: gzip", b"encoding: raw", b"encoding: bzip2", b"type: double", b"type: uchar",
                             b"dimension: 4", b"data file: /dev/zero", b"endian: big", b"kinds: vector domain domain",
                             b"foo: bar"],
                   b"meta": [b"CompressedData = True", b"CompressedData = False", b"ElementType = MET_DOUBLE",
                             b"ElementNumberOfChannels = 3", b"NDims = 2", b"NDims = 4", b"HeaderSize = -1",
                             b"BinaryDataByteOrderMSB = True", b"ElementDataFile = /dev/zero"]}[fmt.encode()]
        lines.insert(i, bytes(rng.choice(choices)))
        what = "inserted field"
    return b"\n".join(lines) + body, what


NIFTI_FIELDS = {"dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"),
                "vox_offset": (108, "f"), "scl_slope": (112, "f"), "qform_code": (252, "h"), "sform_code": (254, "h"),
                "quatern": (256, "6f"), "srow": (280, "12f"), "sizeof_hdr": (0, "i")}
NIFTI_VALUES = [-1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 128, 256, 512, 1024, 2304, 32767, -32768, 348, 352, 540]
NIFTI_FLOATS = [0.0, -1.0, 1e30, -1e30, float("nan"), float("inf"), 1e-30, 352.0, 1e9]


def _nifti_field_mutation(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    gz = data[:2] == b"\x1f\x8b"
    raw = bytearray(gzip.decompress(data) if gz else data) if not gz or _gz_ok(data) else bytearray(data)
    name = str(rng.choice(list(NIFTI_FIELDS)))
    off, fmt = NIFTI_FIELDS[name]
    n = int(fmt[:-1]) if len(fmt) > 1 else 1
    idx = int(rng.integers(n))
    kind = fmt[-1]
    size = struct.calcsize(kind)
    value = rng.choice(NIFTI_FLOATS) if kind == "f" else int(rng.choice(NIFTI_VALUES))
    pos = off + idx * size
    if pos + size <= len(raw):
        try:
            raw[pos:pos + size] = struct.pack("<" + kind, value)
        except struct.error:
            raw[pos:pos + size] = struct.pack("<" + kind, 0)
    out = bytes(raw)
    return (gzip.compress(out, 1) if gz else out), f"nifti {name}[{idx}] = {value}"


def _gz_ok(data: bytes) -> bool:
    try:
        gzip.decompress(data)
        return True
    except Exception:  # noqa: BLE001
        return False


def mutate_file(rng: np.random.Generator, seed_path: Path, out: Path, fmt: str, seed_volume) -> Case:
    data = seed_path.read_bytes()
    muts: list[str] = []
    pixels_only = True
    for _ in range(int(rng.integers(1, 4))):
        r = rng.random()
        if fmt == "nifti" and r < 0.5:
            data, what = _nifti_field_mutation(rng, data)
            pixels_only = False
        elif fmt in ("nrrd", "meta") and r < 0.5:
            data, what = _text_field_mutation(rng, data, fmt)
            pixels_only = False
        else:
            gz = seed_path.name.endswith(".gz") and data[:2] == b"\x1f\x8b" and _gz_ok(data)
            if gz and rng.random() < 0.7:  # mutate inside the gzip stream
                inner, what, only = _bytes_mutation(rng, gzip.decompress(data), 352)
                data = gzip.compress(inner, 1)
            else:
                data, what, only = _bytes_mutation(rng, data, _header_len(data, fmt) if not gz else 10)
                only = only and not gz and "z." not in seed_path.name  # compressed payload: any flip may break it
            pixels_only = pixels_only and only
        muts.append(what)
    out.write_bytes(data)
    case = Case(fmt, out, muts)
    if pixels_only:
        case.seed_geometry = (seed_volume.shape, seed_volume.spacing, seed_volume.origin, seed_volume.direction)
    case.declared = _declared(out, fmt)
    return case


def _declared(path: Path, fmt: str) -> Optional[tuple[int, ...]]:
    """(i, j, k) sizes from a parser independent of the reader's checks (None if it cannot tell)."""
    try:
        if fmt == "nifti":
            import nibabel as nib

            quiet = nib.imageglobals.logger
            level, quiet.level = quiet.level, logging.CRITICAL + 1  # its header-fix reports are not for the log
            try:
                shape = nib.load(str(path)).header.get_data_shape()
            finally:
                quiet.level = level
            return tuple(int(s) for s in shape[:3])
        if fmt == "nrrd":
            import nrrd

            with open(path, "rb") as fh:
                return tuple(int(s) for s in nrrd.read_header(fh)["sizes"][:3])
        if fmt == "meta":
            for line in path.read_bytes().split(b"\n"):
                if line.startswith(b"DimSize"):
                    return tuple(int(v) for v in line.split(b"=")[1].split()[:3])
    except Exception:  # noqa: BLE001
        return None
    return None


DICOM_EDITS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated",
               "SamplesPerPixel", "TransferSyntaxUID", "NumberOfFrames", "FrameOfReferenceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "RescaleSlope", "PixelData", "SliceThickness", "delete"]
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.100", "1.2.3"]


def _dicom_attr_mutation(rng: np.random.Generator, path: Path) -> str:
    key = str(rng.choice(DICOM_EDITS))
    try:
        return _edit(rng, path, key)
    except Exception as exc:  # noqa: BLE001 - e.g. an attribute an earlier mutation removed: the file stays as it was
        return f"{key} (not applicable: {type(exc).__name__})"


def _edit(rng: np.random.Generator, path: Path, key: str) -> str:
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        what = key
        if key == "ImagePositionPatient":
            p = [float(x) for x in ds.ImagePositionPatient]
            op = rng.integers(4)
            if op == 0:
                p[int(rng.integers(3))] += float(rng.choice([0.005, 0.3, 1.0, 2.0, -2.0, 7.5, 1e6]))
                ds.ImagePositionPatient = p
            elif op == 1:
                del ds.ImagePositionPatient
            elif op == 2:
                ds.ImagePositionPatient = p[:2]
            else:
                ds["ImagePositionPatient"].value = ["nan", "1", "2"]
        elif key == "ImageOrientationPatient":
            op = rng.integers(3)
            if op == 0:
                t = math.radians(float(rng.choice([0.01, 2, 15, 30, 60, 90])))
                ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(t), 8), round(math.sin(t), 8)]
            elif op == 1:
                del ds.ImageOrientationPatient
            else:
                ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
        elif key == "PixelSpacing":
            ds.PixelSpacing = [float(rng.choice([0, -1, 0.5, 1e9])), 0.75]
        elif key in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
            setattr(ds, key, int(rng.choice([0, 1, 3, 8, 12, 15, 17, 32, 64, 4096, 65535])))
        elif key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = str(rng.choice(SYNTAXES))
        elif key == "NumberOfFrames":
            ds.NumberOfFrames = int(rng.choice([0, 2, 4, 99999]))
        elif key in ("FrameOfReferenceUID", "SeriesInstanceUID"):
            setattr(ds, key, pydicom.uid.generate_uid())
        elif key == "SOPInstanceUID":
            ds.SOPInstanceUID = ""
            ds.file_meta.MediaStorageSOPInstanceUID = ""
        elif key == "RescaleSlope":
            ds.RescaleSlope = str(rng.choice(["0", "1e9", "-1", "0.5", "nan"]))
        elif key == "PixelData":
            pd = ds["PixelData"]
            val = bytes(pd.value)
            cut = int(rng.integers(0, max(1, len(val))))
            pd.value = val[:cut] if rng.random() < 0.5 else val + rng.bytes(int(rng.integers(1, 64)))
        elif key == "SliceThickness":
            ds.SliceThickness = str(rng.choice(["0", "-3", "1e9", ""]))
        else:
            tag = str(rng.choice(["ImagePositionPatient", "PixelSpacing", "Rows", "PixelData", "Modality",
                                  "FrameOfReferenceUID", "InstanceNumber"]))
            if tag in ds:
                delattr(ds, tag)
            what = f"delete {tag}"
        try:
            ds.save_as(path)
        except Exception:  # noqa: BLE001 - pydicom refuses to write some combinations: leave the file as it was
            return f"{what} (not writable)"
    return what


def mutate_series(rng: np.random.Generator, seed: Path, out: Path) -> Case:
    shutil.copytree(seed, out)
    files = sorted(out.iterdir())
    muts = []
    for _ in range(int(rng.integers(1, 3))):
        f = files[int(rng.integers(len(files)))]
        if not f.exists():
            continue
        op = rng.random()
        if op < 0.6:
            muts.append(f"{f.name}: {_dicom_attr_mutation(rng, f)}")
        elif op < 0.7:
            shutil.copy(f, out / f"copy_{f.name}")
            muts.append(f"copy {f.name}")
        elif op < 0.8:
            f.unlink()
            muts.append(f"remove {f.name}")
        else:
            data, what, _ = _bytes_mutation(rng, f.read_bytes(), 1200)
            f.write_bytes(data)
            muts.append(f"{f.name}: {what}")
    return Case("dicom", out, muts)


def mutate_seg(rng: np.random.Generator, seed: Path, out: Path) -> Case:
    shutil.copy(seed, out)
    muts = []
    for _ in range(int(rng.integers(1, 3))):
        if rng.random() < 0.5:
            data, what, _ = _bytes_mutation(rng, out.read_bytes(), 4000)
            out.write_bytes(data)
            muts.append(what)
        else:
            muts.append(_seg_attr_mutation(rng, out))
    return Case("seg", out, muts)


def _seg_attr_mutation(rng: np.random.Generator, path: Path) -> str:
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            op = int(rng.integers(6))
            if op == 0 and "PerFrameFunctionalGroupsSequence" in ds:
                fg = ds.PerFrameFunctionalGroupsSequence[int(rng.integers(len(ds.PerFrameFunctionalGroupsSequence)))]
                p = fg.PlanePositionSequence[0]
                p.ImagePositionPatient = [float(x) + float(rng.choice([0.3, 2.0,
                                                                       -5.0])) for x in p.ImagePositionPatient]
                what = "frame position"
            elif op == 1:
                ds.NumberOfFrames = int(rng.choice([0, 1, 99999]))
                what = "NumberOfFrames"
            elif op == 2:
                ds.Rows = int(rng.choice([0, 1, 65535]))
                what = "Rows"
            elif op == 3 and "SegmentSequence" in ds:
                del ds.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence
                what = "segment category"
            elif op == 4:
                ds.SegmentationType = str(rng.choice(["FRACTIONAL", "LABELMAP", "X"]))
                what = "SegmentationType"
            else:
                ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0, 0]
                what = "pixel spacing"
            ds.save_as(path)
            return what
        except Exception as exc:  # noqa: BLE001
            return f"attr mutation not writable ({type(exc).__name__})"


# ---- judging -------------------------------------------------------------------------------------------------------
def judge(case: Case, read: Callable[[Path], Any]) -> Outcome:
    from textseg.errors import TextsegError

    try:
        result = read(case.path)
    except TextsegError as exc:
        msg = str(exc)
        if "\n" in msg:
            return Outcome("FAIL", f"message of several lines: {msg[:300]!r}")
        if any(net in msg for net in NETS):
            return Outcome("FAIL", f"safety net: {msg[:300]}")
        return Outcome("refused", msg)
    except Exception as exc:  # noqa: BLE001
        return Outcome("FAIL", f"{type(exc).__name__}: {str(exc)[:300]}")
    problem = _check(case, result)
    return Outcome("FAIL", problem) if problem else Outcome("read")


def _check(case: Case, result: Any) -> Optional[str]:
    if case.fmt == "seg":
        ref, segs = result
        return None if all(s.mask.shape == ref.shape for s in segs) else "segment masks off the SEG's grid"
    vol = result
    if case.fmt == "dicom":
        return _check_dicom(case, vol)
    if case.seed_geometry is not None:
        shape, spacing, origin, direction = case.seed_geometry
        if vol.shape != shape or not np.allclose(vol.spacing, spacing) or not np.allclose(vol.origin, origin) \
                or not np.allclose(vol.direction, direction):
            return f"pixel bytes changed but the geometry did: {vol.shape} {vol.spacing} {vol.origin}"
    if case.declared is not None:
        size = vol.size if not vol.is_2d else vol.size[:2]
        if tuple(size) != tuple(case.declared[: len(size)]):
            return f"size {vol.size} but the header declares {case.declared}"
    return None


def _check_dicom(case: Case, vol) -> Optional[str]:
    import warnings

    import pydicom

    files = vol.metadata.get("dicom_files") or []
    notes = " ".join(vol.metadata.get("notes", []))
    if len(files) != vol.shape[0]:
        return f"{len(files)} files for {vol.shape[0]} slices"
    resampled = bool(vol.metadata.get("dicom_resampled"))
    n = vol.direction[:, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        used = set()
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            used.add(Path(f).name)
            if len(files) > 1:
                try:
                    pos = np.array([float(x) for x in ds.ImagePositionPatient])
                    assert pos.shape == (3,) and np.all(np.isfinite(pos))
                except Exception:  # noqa: BLE001
                    return f"slice {k} ({Path(f).name}) has no valid ImagePositionPatient but was read"
                exp = vol.index_to_physical([[0, 0, k]])[0]
                off = abs(float((pos - exp) @ n)) if resampled else float(np.linalg.norm(pos - exp))
                if off > 1e-3 + 0.01 * vol.spacing[2]:
                    return f"slice {k} ({Path(f).name}) at {pos}, the volume puts it at {exp}"
            if "ImageOrientationPatient" in ds:
                try:
                    iop = np.array([float(x) for x in ds.ImageOrientationPatient])
                    assert iop.shape == (6,)
                except Exception:  # noqa: BLE001
                    return f"{Path(f).name} has an invalid ImageOrientationPatient but was read"
                if not (np.allclose(iop[:3], vol.direction[:, 0], atol=2e-3) and
                        np.allclose(iop[3:], vol.direction[:, 1], atol=2e-3)):
                    return f"{Path(f).name}: orientation {iop} but direction {vol.direction.T[:2]}"
            if "PixelSpacing" in ds:
                try:
                    ps = [float(x) for x in ds.PixelSpacing]
                    assert len(ps) == 2
                except Exception:  # noqa: BLE001
                    return f"{Path(f).name} has an invalid PixelSpacing but was read"
                if not np.allclose([ps[1], ps[0]], vol.spacing[:2], rtol=1e-3):
                    return f"{Path(f).name}: pixel spacing {ps} but spacing {vol.spacing}"
        for f in sorted(case.path.iterdir()):  # no slice of the series dropped without a word
            if f.name in used:
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "(no UID)")
            if f.name not in notes and not ("not used:" in notes and f"series {uid}" in notes):
                return f"{f.name} is a DICOM file of the folder that is neither used nor named in a note"
    return None


def run_cases(rng: np.random.Generator, work: Path, seeds: dict[str, Any], counts: dict[str, int],
              read_image: Callable[[Path], Any], read_seg: Callable[[Path], Any]):
    """Yield (case, outcome) for counts[fmt] mutations of each format."""
    by_fmt = {"nifti": [k for k in seeds if k.startswith("s.nii")],
              "nrrd": [k for k in seeds if k.endswith(".nrrd")],
              "meta": [k for k in seeds if k.endswith(".mha")],
              "dicom": [k for k in seeds if k.startswith("dicom_")],
              "seg": [k for k in seeds if k == "seg"]}
    for fmt, n in counts.items():
        names = by_fmt[fmt]
        if not names:
            continue
        for i in range(n):
            name = names[i % len(names)]
            target = work / f"{fmt}_{i:05d}"
            if fmt == "dicom":
                case = mutate_series(rng, seeds[name], target)
            elif fmt == "seg":
                case = mutate_seg(rng, seeds[name], target.with_suffix(".dcm"))
            else:
                path, vol = seeds[name]
                case = mutate_file(rng, path, target.with_name(target.name + "_" + name), fmt, vol)
            yield case, judge(case, read_seg if fmt == "seg" else read_image)
