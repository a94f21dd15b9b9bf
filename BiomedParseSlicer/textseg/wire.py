"""What travels between ``textseg.client`` and ``textseg.server`` (torch- and fastapi-free).

* Volumes go up as NRRD (pynrrd; raw encoding, LPS space, optionally gzip as HTTP
  ``Content-Encoding``), keyed by the sha256 of the NRRD bytes.
* Results come down as a ``.seg.nrrd`` (masks, names, provenance tags; textseg.writers) plus a
  JSON document holding what a seg.nrrd cannot carry exactly (existence, present, message,
  extra, the prompt) and an ``.npz`` of arrays: each mask bit-packed (exact) and, per prompt,
  an optional probability map, sparse (bitmap of non-zero voxels + their values), uint8-quantized
  by default or float32 on request. gzip travels only where the client asks for it.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Dict, List, Optional

import numpy as np

from . import __version__
from .errors import InputError

API_VERSION = 1  # bump when the HTTP API changes incompatibly
API_HEADER = "X-Textseg-API"
VERSION_HEADER = "X-Textseg-Version"
PROBABILITY_MODES = ("uint8", "float32", "none")
_SPACES = {"left-posterior-superior": (1, 1, 1), "LPS": (1, 1, 1), "right-anterior-superior": (-1, -1, 1), "RAS": (-1, -1, 1)}


def volume_to_nrrd(volume) -> bytes:
    """A Volume as NRRD bytes (raw encoding, LPS). No file paths or metadata are included."""
    import nrrd

    arr = np.ascontiguousarray(volume.array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    axes = volume.direction @ np.diag(volume.spacing)  # columns: i, j, k axis vectors in mm
    directions = [list(axes[:, a]) for a in range(3)]
    header: Dict[str, Any] = {"space": "left-posterior-superior", "space origin": np.array(volume.origin), "encoding": "raw", "endian": "little"}
    if arr.ndim == 4:
        header["kinds"] = ["vector", "domain", "domain", "domain"]
        header["space directions"] = np.array([[np.nan] * 3] + directions)
    else:
        header["kinds"] = ["domain"] * 3
        header["space directions"] = np.array(directions)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    buf = io.BytesIO()
    nrrd.write(buf, arr, header, index_order="C")
    data = buf.getvalue()
    end = data.index(b"\n\n")  # drop pynrrd's comment lines (one is a timestamp): same image, same bytes, same key
    head = b"\n".join(line for line in data[:end].split(b"\n") if not line.startswith(b"#"))
    return head + data[end:]


def nrrd_to_volume(fh, source: str = "upload"):
    """Parse an NRRD stream into a Volume; InputError saying what is wrong otherwise."""
    import nrrd

    from .volume import Volume

    try:
        header = nrrd.read_header(fh)
        data = nrrd.read_data(header, fh, index_order="C")
    except Exception as exc:  # noqa: BLE001 - pynrrd raises many kinds on garbage
        raise InputError(f"{source} is not a readable NRRD image ({str(exc)[:200]}). Send a NRRD file (raw or gzip).") from None
    rgb = data.ndim == 4 and data.shape[-1] in (3, 4)
    if data.ndim != 3 and not rgb:
        raise InputError(f"{source} has shape {data.shape}; a 3D image (or 3D RGB) is expected.")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise InputError(f"{source} has pixel type {data.dtype}; a numeric image is expected.")
    space = header.get("space", "left-posterior-superior")
    if space not in _SPACES:
        raise InputError(f"{source} is in space '{space}'; LPS or RAS is expected.")
    dirs = header.get("space directions")
    if dirs is None:
        axes = np.diag([float(s) for s in header.get("spacings", (1.0, 1.0, 1.0))[-3:]])
    else:
        rows = [r for r in np.asarray(dirs, dtype=float) if np.isfinite(r).all()]
        if len(rows) != 3:
            raise InputError(f"{source}: 'space directions' must give three spatial axes.")
        axes = np.array(rows).T * np.array(_SPACES[space])[:, None]
    origin = np.asarray(header.get("space origin", (0.0, 0.0, 0.0)), dtype=float) * np.array(_SPACES[space])
    spacing = np.linalg.norm(axes, axis=0)
    if not (np.isfinite(spacing).all() and (spacing > 0).all() and np.isfinite(origin).all()):
        raise InputError(f"{source}: voxel spacing/origin are not finite positive numbers.")
    return Volume(data, tuple(spacing), tuple(origin), axes / spacing)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- results ----------------------------------------------------------------------------------
def result_record(index: int, r, probability: Optional[str]) -> Dict[str, Any]:
    """JSON-able description of one PromptResult (the arrays travel separately)."""
    return {
        "index": index,
        "prompt": r.prompt.to_dict(),
        "existence": None if r.existence is None else float(r.existence),
        "present": bool(r.present),
        "provenance": _jsonable(r.provenance),
        "message": r.message,
        "extra": _jsonable(r.extra),
        "voxel_count": r.voxel_count,
        "objects": _jsonable(r.objects),
        "complete": bool(r.complete),
        "probability": probability,
    }


def quantize(prob: np.ndarray, mode: str) -> np.ndarray:
    if mode == "float32":
        return np.asarray(prob, dtype=np.float32)
    tmp = np.multiply(prob, np.float32(255.0), dtype=np.float32)  # in place from here: few passes, no temporaries
    np.clip(tmp, 0.0, 255.0, out=tmp)
    tmp += np.float32(0.5)
    return tmp.astype(np.uint8)  # round half up: |error| <= 1/510 after dequantize


def encode_probability(prob: np.ndarray, mode: str, n: int) -> Dict[str, np.ndarray]:
    """Sparse: a bitmap of the non-zero voxels + their (quantized) values. Models put ~0 almost
    everywhere, so this is a fraction of the dense size without costing a compressor."""
    q = quantize(prob, mode).ravel()
    nz = q != 0
    return {f"probnz_{n}": np.packbits(nz), f"probv_{n}": q[nz]}


def decode_probability(arrays: Dict[str, np.ndarray], n: int, shape) -> np.ndarray:
    nz = unpack_mask(arrays[f"probnz_{n}"], (int(np.prod(shape)),)).view(bool)
    values = arrays[f"probv_{n}"]
    out = np.zeros(nz.shape, np.float32)
    out[nz] = dequantize(values)
    return out.reshape(tuple(shape))


def dequantize(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return np.asarray(arr, dtype=np.float32)


def load_npz(data: bytes) -> Dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def unpack_mask(packed: np.ndarray, shape) -> np.ndarray:
    n = int(np.prod(shape))
    return np.unpackbits(packed, count=n).reshape(tuple(shape)).astype(np.uint8, copy=False)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def client_headers() -> Dict[str, str]:
    return {API_HEADER: str(API_VERSION), VERSION_HEADER: __version__, "User-Agent": f"textseg-client/{__version__}"}


def version_mismatch_message(client_api: str, client_version: str) -> str:
    return (
        f"This textseg server speaks API {API_VERSION} (textseg {__version__}); your client speaks API "
        f"{client_api} (textseg {client_version or 'unknown'}). Install a matching textseg on the client "
        f"(pip install 'textseg=={__version__}') or ask the server's administrator to upgrade."
    )


def summarize(results: List[Any]) -> str:
    return ", ".join(f"{r.name}: {r.voxel_count} voxels" for r in results)
