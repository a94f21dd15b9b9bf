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


def _from_sitk(img, source: str) -> Volume:
    import SimpleITK as sitk

    dim = img.GetDimension()
    if dim == 4 or (dim == 3 and img.GetNumberOfComponentsPerPixel() > 4):
        raise InputError(f"{source} is a 4D image ({img.GetSize()}); extract one 3D volume first.")
    arr = sitk.GetArrayFromImage(img)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 2:
        spacing = tuple(img.GetSpacing()) + (1.0,)
        origin = tuple(img.GetOrigin()) + (0.0,)
        d2 = np.array(img.GetDirection()).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d2
        arr = arr[None]
    elif dim == 3:
        spacing, origin = img.GetSpacing(), img.GetOrigin()
        direction = np.array(img.GetDirection()).reshape(3, 3)
    else:
        raise InputError(f"{source} has {dim} dimensions; only 2D and 3D images are supported.")
    if ncomp > 1 and arr.ndim == 3:  # 2D RGB read as [j, i, c] -> [1, j, i, c]
        pass
    if ncomp not in (1, 3, 4):
        raise InputError(f"{source} has {ncomp} components per pixel; expected grey or RGB.")
    return Volume(arr, spacing, origin, direction, {"source": source})


def read_volume(path: PathLike) -> Volume:
    """Read an image file or DICOM series folder into a Volume; InputError on failure."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder.")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(p))
            if not series:
                raise InputError(f"{p}: folder contains no DICOM series. Give an image file or a DICOM series folder.")
            files = reader.GetGDCMSeriesFileNames(str(p), series[0])
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(
            f"{p}: cannot be read as an image ({first[:200]}). Supported: NIfTI, NRRD, MHA, a DICOM series "
            "folder, PNG/JPEG/TIFF. Is the file complete (not truncated)?"
        ) from None
    vol = _from_sitk(img, str(p))
    vol.check_usable(str(p))
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
