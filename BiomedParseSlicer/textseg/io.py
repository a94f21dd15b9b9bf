"""Reading images into Volumes (SimpleITK), keeping spacing, origin and direction.

Supported: NIfTI, NRRD, MHA/MHD, a DICOM series folder, and 2D images (PNG/JPEG/TIFF/BMP, RGB
kept for pathology, fundus, endoscopy and dermoscopy). Anything else gives an InputError that
names the file and says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .errors import InputError
from .volume import Volume

PathLike = Union[str, Path]


DICOM_TAGS = {
    "0008|0060": "Modality",
    "0018|0015": "BodyPartExamined",
    "0008|103e": "SeriesDescription",
    "0020|000e": "SeriesInstanceUID",
    "0020|000d": "StudyInstanceUID",
    "0018|0050": "SliceThickness",
}
_NON_IMAGE_SUFFIXES = (".txt", ".json", ".csv", ".md", ".py", ".seg.nrrd")


def _from_sitk(img, source: str) -> Volume:
    import SimpleITK as sitk

    dim = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 4:
        raise InputError(f"{source} is a 4D image (size {img.GetSize()}); extract one 3D volume (one time point) first.")
    if dim not in (2, 3):
        raise InputError(f"{source} has {dim} dimensions; only 2D and 3D images are supported.")
    if ncomp not in (1, 3, 4):
        raise InputError(
            f"{source} has {ncomp} values per voxel; expected grey or RGB. "
            "Multi-channel/4D series (time, diffusion) are not supported: extract one 3D volume first."
        )
    if 0 in img.GetSize():
        raise InputError(f"{source} is empty (size {img.GetSize()}).")
    arr = sitk.GetArrayFromImage(img)
    if ncomp == 4:  # RGBA: alpha carries no image content
        arr = arr[..., :3]
    if dim == 2:
        spacing = tuple(img.GetSpacing()) + (1.0,)
        origin = tuple(img.GetOrigin()) + (0.0,)
        direction = np.eye(3)
        direction[:2, :2] = np.array(img.GetDirection()).reshape(2, 2)
        arr = arr[None]
    else:
        spacing, origin = img.GetSpacing(), img.GetOrigin()
        direction = np.array(img.GetDirection()).reshape(3, 3)
    return Volume(arr, spacing, origin, direction, {"source": source})


def _read_dicom_series(folder: Path):
    """The largest DICOM series of a folder; metadata with tags and the source files in k order."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(
            f"{folder}: the folder contains no DICOM image series. Give an image file (NIfTI, NRRD, MHA, "
            "PNG/JPEG/TIFF) or a folder holding one DICOM series."
        )
    by_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    sid = max(by_series, key=lambda k: len(by_series[k]))
    files = list(by_series[sid])
    notes = []
    if len(series) > 1:
        notes.append(f"{folder} holds {len(series)} DICOM series; using the largest ({len(files)} files).")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    img = reader.Execute()
    tags = {name: reader.GetMetaData(0, key).strip() for key, name in DICOM_TAGS.items() if reader.HasMetaDataKey(0, key)}
    return img, {"dicom": tags, "dicom_files": files, "notes": notes}


def _stream_length(fh, chunk: int = 1 << 22) -> int:
    n = 0
    while True:
        block = fh.read(chunk)
        if not block:
            return n
        n += len(block)


def _payload_complete(path: Path) -> bool:
    """False when a NIfTI/NRRD file ends before its pixel data does.

    ITK zero-fills the missing voxels of a truncated file without an error, which would silently
    turn half a scan into background: check the gzip stream and the expected payload size."""
    import gzip
    import struct
    import zlib

    name = path.name.lower()
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    try:
        if name.endswith((".nii", ".nii.gz")):
            opener = gzip.open if gz else open
            with opener(path, "rb") as fh:
                hdr = fh.read(348)
                if len(hdr) < 348:
                    return False
                endian = "<" if struct.unpack("<i", hdr[:4])[0] == 348 else ">"
                dims = struct.unpack(endian + "8h", hdr[40:56])
                bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
                vox_offset = struct.unpack(endian + "f", hdr[108:112])[0]
                expected = int(vox_offset) + int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]])) * bitpix // 8
                return 348 + _stream_length(fh) >= expected
        if name.endswith((".nrrd", ".seg.nrrd")):
            import nrrd

            with open(path, "rb") as fh:
                header = nrrd.read_header(fh)
                data_start = fh.tell()
            if header.get("data file") or header.get("datafile"):
                return True  # detached data: ITK reports a missing file itself
            dtype = nrrd.reader._determine_datatype(header)
            expected = int(np.prod(header["sizes"])) * dtype.itemsize
            encoding = header.get("encoding", "raw")
            with open(path, "rb") as fh:
                fh.seek(data_start)
                if encoding in ("gzip", "gz"):
                    return _stream_length(gzip.GzipFile(fileobj=fh)) >= expected
                if encoding == "raw":
                    return _stream_length(fh) >= expected
            return True
        if gz:
            with gzip.open(path, "rb") as fh:
                _stream_length(fh)
    except (EOFError, zlib.error, OSError, struct.error):
        return False
    except Exception:  # noqa: BLE001 - an unusual header: leave the verdict to ITK
        return True
    return True


def _keep_nifti_affine(vol: Volume, path: Path) -> None:
    """``metadata['nifti_affine']``: a NIfTI file's affine as nibabel (and so MONAI) reads its header (RAS; the
    stored float32 sform, else qform). SimpleITK's geometry can differ from it in the last float32 bit, which
    decides some of upstream SAT's grid (models/sat/preprocess.py)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        vol.metadata["nifti_affine"] = np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception:  # noqa: BLE001 - ITK read it; without nibabel's header SAT uses the volume's geometry
        pass


def _restore_nonfinite_nifti(vol: Volume, path: Path) -> None:
    """Put back the NaN/Inf voxels of a float NIfTI file that SimpleITK read as 0.

    SimpleITK 2.5 (ITK 5.4) turns non-finite voxels of float NIfTI images into 0 without a word, which
    would make "no data" look like water on a CT; nibabel reads them as stored."""
    if not path.name.lower().endswith((".nii", ".nii.gz")) or not np.issubdtype(vol.array.dtype, np.floating):
        return
    if vol.array.size and np.count_nonzero(vol.array) == vol.array.size:
        return  # no zero voxel: nothing was turned from NaN/Inf into 0, no second read needed
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:  # noqa: BLE001 - ITK read it; nibabel's opinion on odd headers is not needed
        return
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        return
    data = np.asanyarray(img.dataobj)
    if data.size != vol.array.size:  # vector/RGB images: not float grey data
        return
    bad = ~np.isfinite(data)
    if not bad.any():
        return
    # nibabel's axes are (i, j, k[, 1...]); the Volume's are (k, j, i)
    bad = bad.reshape(bad.shape[:3]).T.reshape(vol.array.shape[:3])
    values = data.reshape(data.shape[:3]).T.reshape(vol.array.shape[:3])
    if not np.issubdtype(vol.array.dtype, np.floating):
        vol.array = vol.array.astype(np.float32)
    vol.array[bad] = values[bad]


def _check_values(vol: Volume, source: str) -> None:
    vol.check_usable(source)
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        vol.metadata.setdefault("notes", []).append(f"{source}: {bad} NaN/infinite voxels (treated as background).")


def read_volume(path: PathLike) -> Volume:
    """Read an image file or DICOM series folder into a Volume; InputError on failure.

    DICOM series: the largest series of the folder; ``metadata["dicom"]`` holds Modality,
    BodyPartExamined, SeriesDescription and UIDs, ``metadata["dicom_files"]`` the source files in
    k order (for DICOM SEG). Rescale slope/intercept are applied (HU for CT)."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    extra: dict = {}
    try:
        if p.is_dir():
            img, extra = _read_dicom_series(p)
        else:
            if p.stat().st_size == 0:
                raise InputError(f"{p}: the file is empty (0 bytes).")
            if p.name.lower().endswith(_NON_IMAGE_SUFFIXES) and not p.name.lower().endswith(".seg.nrrd"):
                raise InputError(f"{p}: not an image file (NIfTI, NRRD, MHA, DICOM, PNG/JPEG/TIFF).")
            img = sitk.ReadImage(str(p))
            if not _payload_complete(p):
                raise InputError(
                    f"{p}: cannot be read as an image: the file ends before its pixel data does (truncated "
                    "download or copy?). Copy it again from the source."
                )
    except InputError:
        raise
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[-1][:200] if lines else "unknown reason"
        raise InputError(
            f"{p}: cannot be read as an image ({detail}). Supported: NIfTI, NRRD, MHA, a DICOM series folder, "
            "PNG/JPEG/TIFF. If it should be one of these, the file may be incomplete (truncated) or corrupt."
        ) from None
    vol = _from_sitk(img, str(p))
    vol.metadata.update(extra)
    if not p.is_dir():
        _restore_nonfinite_nifti(vol, p)
        _keep_nifti_affine(vol, p)
    if extra.get("dicom", {}).get("Modality"):
        vol.metadata["modality"] = extra["dicom"]["Modality"]
    _check_values(vol, str(p))
    return vol


def to_sitk(volume: Volume, array: np.ndarray = None):
    """A SimpleITK image of ``array`` (default: the volume's own) on the volume's grid."""
    import SimpleITK as sitk

    arr = volume.array if array is None else array
    img = sitk.GetImageFromArray(arr, isVector=arr.ndim == 4)
    img.SetSpacing(volume.spacing)
    img.SetOrigin(volume.origin)
    img.SetDirection(tuple(volume.direction.ravel()))
    return img


def write_image(volume: Volume, path: PathLike, array: np.ndarray = None) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(to_sitk(volume, array), str(path), useCompression=True)
