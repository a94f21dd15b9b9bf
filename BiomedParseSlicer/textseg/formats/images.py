"""Reading images into Volumes (SimpleITK), keeping spacing, origin and direction.

Supported: NIfTI (1 and 2), NRRD, MHA/MHD, DICOM (a series folder or one file) and 2D images
(PNG/JPEG/TIFF/BMP, RGB kept for pathology, fundus, endoscopy and dermoscopy). Anything else, and
every damaged or inconsistent file, gives an InputError that names the file and says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..errors import InputError
from ..volume import Volume

PathLike = Union[str, Path]


_NON_IMAGE_SUFFIXES = (".txt", ".json", ".csv", ".md", ".py", ".seg.nrrd")


def _from_sitk(img, source: str) -> Volume:
    import SimpleITK as sitk

    dim = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 4:
        raise InputError(f"{source} is a 4D image (size {img.GetSize()}); extract one 3D volume (one time point) "
                         f"first.")
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
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return
        data = np.asanyarray(img.dataobj)
    except Exception:  # noqa: BLE001 - ITK read it; nibabel's opinion on odd headers is not needed
        return
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


def read_volume(path: PathLike, isolate: Optional[bool] = None) -> Volume:
    """Read an image file or DICOM series folder into a Volume; InputError on failure.

    DICOM series: the largest series of the folder, its geometry checked file by file
    (``textseg.formats.dicom_series``); ``metadata["dicom"]`` holds Modality, BodyPartExamined,
    SeriesDescription and UIDs, ``metadata["dicom_files"]`` the source files in k order (for DICOM
    SEG). Rescale slope/intercept are applied (HU for CT). ``metadata["notes"]`` says what the reader
    had to decide (e.g. a copied slice used once, a gantry tilt resampled).

    Headers are checked against the file before ITK/GDCM reads it (``textseg.formats.image_checks``), and the
    reading itself runs in a child process with memory and time limits (``textseg.formats.read_isolated``),
    so a damaged file is one InputError, never a crash or a hang. ``isolate=False`` (or
    ``$TEXTSEG_READ_IN_PROCESS=1``) reads in this process: same checks, no limits."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    if isolate is None:
        isolate = os.environ.get("TEXTSEG_READ_IN_PROCESS", "").strip().lower() not in ("1", "true", "yes")
    if isolate:
        from .read_isolated import read_in_child

        return read_in_child(p, read_here)
    return read_here(p)


def read_here(p: Path, budget: Optional[Callable[[int], None]] = None) -> Volume:
    """``read_volume`` in this process. ``budget(nbytes)`` is told the image's size before its pixels are
    read (the reader child sets its memory limit from it)."""
    import SimpleITK as sitk

    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK/GDCM warning blocks are not for the user
    try:
        return _read_checked(Path(p), budget)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)


def _read_checked(p: Path, budget: Optional[Callable[[int], None]]) -> Volume:
    from .dicom_series import read_dicom_file, read_dicom_folder
    from .image_checks import check_file

    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    if p.is_dir():
        d = read_dicom_folder(p, budget)
        vol = Volume(d.array, d.spacing, d.origin, d.direction, {"source": str(p), **d.extra})
    else:
        if p.stat().st_size == 0:
            raise InputError(f"{p}: the file is empty (0 bytes).")
        if p.name.lower().endswith(_NON_IMAGE_SUFFIXES) and not p.name.lower().endswith(".seg.nrrd"):
            raise InputError(f"{p}: not an image file (NIfTI, NRRD, MHA, DICOM, PNG/JPEG/TIFF).")
        declared = check_file(p)
        if declared.fmt == "dicom":
            d = read_dicom_file(p, budget)
            vol = Volume(d.array, d.spacing, d.origin, d.direction, {"source": str(p), **d.extra})
        else:
            vol = _from_sitk(_itk_read(p, declared, budget), str(p))
            if declared.notes:
                vol.metadata.setdefault("notes", []).extend(declared.notes)
            _restore_nonfinite_nifti(vol, p)
            _keep_nifti_affine(vol, p)
    if vol.metadata.get("dicom", {}).get("Modality"):
        vol.metadata["modality"] = vol.metadata["dicom"]["Modality"]
    _check_values(vol, str(p))
    return vol


def _itk_read(p: Path, declared, budget: Optional[Callable[[int], None]]):
    """ITK's reading with the ImageIO of the checked format; its header must agree with the check."""
    import SimpleITK as sitk

    from .image_checks import check_memory

    tmp = None
    try:
        reader = sitk.ImageFileReader()
        reader.SetImageIO(declared.itk_io)
        if declared.nifti2:
            tmp = _nifti2_as_nifti1(p)
        reader.SetFileName(str(tmp or p))
        reader.ReadImageInformation()
        itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * 2, reader.GetPixelID())).itemsize
        nbytes = int(np.prod(reader.GetSize(), dtype=np.float64)) * itemsize
        if declared.payload_bytes is None:
            check_memory(nbytes, str(p), f"its {'x'.join(map(str, reader.GetSize()))} pixels")
        elif nbytes > 8 * declared.payload_bytes + (1 << 20):
            raise InputError(f"{p}: ITK reads a header of {'x'.join(map(str, reader.GetSize()))} voxels from this "
                             f"file, more than the file holds; the file is damaged.")
        if budget:
            budget(nbytes)
        return reader.Execute()
    except InputError:
        raise
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[-1][:200] if lines else "unknown reason"
        raise InputError(
            f"{p}: cannot be read as an image ({detail}). Supported: NIfTI, NRRD, MHA, a DICOM series folder, "
            "PNG/JPEG/TIFF. If it should be one of these, the file may be incomplete (truncated) or corrupt."
        ) from None
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp.parent, ignore_errors=True)


def _nifti2_as_nifti1(p: Path) -> Path:
    """A NIfTI-2 file as a temporary NIfTI-1 file with the same header fields and stored values, so that
    ITK (which reads NIfTI-1 only) applies exactly its NIfTI-1 rules for geometry and scaling."""
    import tempfile

    import nibabel as nib

    img = nib.load(str(p))
    if any(d > 32767 for d in img.shape):
        raise InputError(f"{p}: a NIfTI-2 image of size {img.shape}; textseg reads NIfTI-2 images up to 32767 voxels "
                         "per axis.")
    hdr = nib.Nifti1Header.from_header(img.header)
    data = np.asanyarray(img.dataobj.get_unscaled())
    out = nib.Nifti1Image(data, None, header=hdr)
    out.header.set_slope_inter(*img.header.get_slope_inter())
    folder = Path(tempfile.mkdtemp(prefix="textseg-nifti2-"))
    path = folder / "image.nii"
    nib.save(out, str(path))
    return path


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
