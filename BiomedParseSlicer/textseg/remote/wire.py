"""What travels between ``textseg.remote.client`` and ``textseg.remote.server`` (torch- and fastapi-free).

* Volumes go up as NRRD (pynrrd; raw encoding, LPS space, optionally gzip as HTTP
  ``Content-Encoding``), keyed by the sha256 of the NRRD bytes.
* Results come down as a ``.seg.nrrd`` (masks, names, provenance tags; textseg.formats.segments) plus a
  JSON document holding what a seg.nrrd cannot carry exactly (existence, present, message,
  extra, the prompt) and an ``.npz`` of arrays: each mask bit-packed (exact) and, per prompt,
  an optional probability map, sparse (bitmap of non-zero voxels + their values), uint8-quantized
  by default or float32 on request. gzip travels only where the client asks for it.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import math
import re
import socket
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..errors import InputError

API_VERSION = 1  # bump when the HTTP API changes incompatibly
API_HEADER = "X-Textseg-API"
VERSION_HEADER = "X-Textseg-Version"

# ---- strings both ends share ---------------------------------------------------------------------
# A job's states (``state`` of GET /v1/jobs/{id}); a client waits until one of FINAL_STATES.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)
# How a job's probability maps come back (``probabilities`` of a job, ``probability`` of a result record):
# quantized to uint8 (textseg.analysis.confidence's rule), exact float32, or not at all (the mask stands for them).
UINT8, FLOAT32, NO_PROBABILITIES = "uint8", "float32", "none"
PROBABILITY_MODES = (UINT8, FLOAT32, NO_PROBABILITIES)
# The fields of a job request (POST /v1/jobs); the server refuses any other.
JOB_FIELDS = ("volume", "model", "modality", "site", "slices", "prompts", "threshold", "keep_absent", "probabilities",
              "recognize")
# Error codes a client acts on (every error answer is {"error": code, "message", "status"}).
VOLUME_NOT_FOUND = "volume_not_found"  # upload the image (again) and retry
WEIGHTS_MISSING = "weights_missing"  # the server lacks the model's weights: textseg.errors.WeightsError
NO_MAPS = "no_probabilities"  # a re-threshold of a job that kept no probability maps
# The keys of one result record (result.json's ``results``): see result_record / result_from_record.
RECORD_KEYS = ("index", "prompt", "existence", "present", "provenance", "message", "extra", "voxel_count", "objects",
               "complete", "probability")
# A client's own random token: on a server without per-client keys (and under one shared key) it is what
# separates one client's jobs and images from another's. RemotePredictor sends one per process.
CLIENT_HEADER = "X-Textseg-Client"
CLIENT_TOKEN = re.compile(r"[A-Za-z0-9_.~-]{16,128}")
# Limits of one job's prompts (the server refuses more; the client checks before sending).
MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 1000
MAX_PROMPT_POINTS = 1000
_SPACES = {"left-posterior-superior": "LPS", "LPS": "LPS", "right-anterior-superior": "RAS", "RAS": "RAS"}


def volume_to_nrrd(volume) -> bytes:
    """A Volume as NRRD bytes (raw encoding, LPS). No file paths or metadata are included."""
    import nrrd

    arr = np.ascontiguousarray(volume.array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    axes = volume.direction @ np.diag(volume.spacing)  # columns: i, j, k axis vectors in mm
    directions = [list(axes[:, a]) for a in range(3)]
    header: dict[str, Any] = {"space": "left-posterior-superior", "space origin": np.array(volume.origin),
                              "encoding": "raw", "endian": "little"}
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


class UploadTooLarge(InputError):
    """An uploaded image whose decoded voxels exceed the server's limit (HTTP 413)."""


# NRRD pixel types (the NRRD0005 spec's names and aliases) -> numpy; "block" is not accepted.
_NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
_NRRD_DTYPE = {name: code for code, names in _NRRD_TYPES.items() for name in names}
_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
_NOT_SELF_CONTAINED = ("datafile", "data file", "lineskip", "line skip", "byteskip", "byte skip")


def nrrd_to_volume(fh, source: str = "upload", max_bytes: Optional[int] = None):
    """Parse a self-contained NRRD stream into a Volume; InputError saying what is wrong otherwise.

    Only the header is parsed by pynrrd. The voxels are decoded here because pynrrd's read_data
    follows ``data file:`` (any path the server can open: another client's volume, /dev/zero) and
    inflates gzip/bzip2 without bound. So: no ``data file``/skips (the data must follow the
    header), raw, gzip or bzip2 only, the declared size is checked against ``max_bytes``
    (UploadTooLarge) before anything is decoded, and decompression stops at the declared size."""
    import nrrd

    from ..volume import Volume, ras_to_lps, split_matrix

    try:
        header = nrrd.read_header(fh)
    except Exception as exc:  # noqa: BLE001 - pynrrd raises many kinds on garbage
        raise InputError(f"{source} is not a readable NRRD image ({str(exc)[:200]}). Send a NRRD file (raw or "
                         f"gzip).") from None
    if any(k in header and (k in ("datafile", "data file") or header[k]) for k in _NOT_SELF_CONTAINED):
        raise InputError(f"{source} is not self-contained: it names a separate data file or skips lines/bytes ('data "
                         f"file', 'line skip', 'byte skip'). Send one NRRD file with the voxels attached after its "
                         f"header.")
    encoding = _ENCODINGS.get(str(header.get("encoding", "")).lower())
    if encoding is None:
        raise InputError(f"{source} has NRRD encoding '{str(header.get('encoding'))[:40]}'; send raw, gzip or bzip2.")
    code = _NRRD_DTYPE.get(str(header.get("type", "")).lower())
    if code is None:
        raise InputError(f"{source} has NRRD pixel type '{str(header.get('type'))[:40]}'; a numeric type is expected.")
    sizes = [int(n) for n in np.asarray(header.get("sizes", []), dtype=np.int64).ravel()]
    if header.get("dimension") != len(sizes) or any(n < 1 for n in sizes):
        raise InputError(f"{source} is not a readable NRRD image (its 'dimension' does not match its {len(sizes)} "
                         f"positive 'sizes'). Send a NRRD file (raw or gzip).")
    if len(sizes) not in (3, 4):
        raise InputError(f"{source} has {len(sizes)} dimensions; a 3D image (or 3D RGB) is expected.")
    dtype = np.dtype(code)
    if dtype.itemsize > 1:
        endian = header.get("endian")
        if endian not in ("little", "big"):
            raise InputError(f"{source} needs 'endian: little' (or big) for its {header['type']} voxels.")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    nbytes = math.prod(sizes) * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise UploadTooLarge(f"{source} declares {'x'.join(map(str, sizes))} {header['type']} voxels "
                             f"({nbytes / 2**20:,.0f} MiB "
                             f"decoded), more than this server accepts ({max_bytes / 2**20:,.0f} MiB). Crop it, or ask "
                             f"the administrator to raise --max-upload-mb.")
    data = np.frombuffer(_read_voxels(fh, encoding, nbytes, source), dtype).reshape(sizes[::-1])
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    rgb = data.ndim == 4 and data.shape[-1] in (3, 4)
    if data.ndim != 3 and not rgb:
        raise InputError(f"{source} has shape {data.shape}; a 3D image (or 3D RGB) is expected.")
    space = header.get("space", "left-posterior-superior")
    if space not in _SPACES:
        raise InputError(f"{source} is in space '{str(space)[:40]}'; LPS or RAS is expected.")
    to_lps = ras_to_lps if _SPACES[space] == "RAS" else (lambda p: np.asarray(p, dtype=float))
    dirs = header.get("space directions")
    if dirs is None:
        axes = np.diag([float(s) for s in header.get("spacings", (1.0, 1.0, 1.0))[-3:]])
    else:
        rows = [r for r in np.asarray(dirs, dtype=float) if np.isfinite(r).all()]
        if len(rows) != 3:
            raise InputError(f"{source}: 'space directions' must give three spatial axes.")
        axes = to_lps(np.array(rows)).T  # rows: the i, j, k axis vectors
    origin = to_lps(header.get("space origin", (0.0, 0.0, 0.0)))
    spacing, origin, direction = split_matrix(np.column_stack([axes, origin]))
    if not (np.isfinite(spacing).all() and (np.array(spacing) > 0).all() and np.isfinite(origin).all()):
        raise InputError(f"{source}: voxel spacing/origin are not finite positive numbers.")
    return Volume(data, spacing, origin, direction)


def _read_voxels(fh, encoding: str, nbytes: int, source: str):
    """Exactly ``nbytes`` of voxel data from the rest of ``fh``, decoding at most nbytes + 1 bytes."""
    import bz2
    import zlib

    short = InputError(f"{source} ends before its voxel data is complete (truncated upload or wrong sizes).")
    extra = InputError(f"{source} holds more data than its header declares; check its sizes and type.")
    if encoding == "raw":
        out = np.empty(nbytes, np.uint8)  # read straight into the array's buffer: no zero-fill, no second copy
        view, got = memoryview(out), 0
        while got < nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise short
            got += n
        if fh.read(1):
            raise extra
        return out
    else:
        out = bytearray()
        try:
            if encoding == "gzip":
                dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
                pending = b""
                while len(out) <= nbytes and not dec.eof:
                    pending = pending or fh.read(1 << 20)
                    if not pending:
                        break  # the body ended inside the stream
                    out += dec.decompress(pending, nbytes + 1 - len(out))
                    pending = dec.unconsumed_tail
            else:
                bdec = bz2.BZ2Decompressor()
                while len(out) <= nbytes and not bdec.eof:
                    data = fh.read(1 << 20) if bdec.needs_input else b""
                    if bdec.needs_input and not data:
                        break
                    out += bdec.decompress(data, nbytes + 1 - len(out))
        except (zlib.error, OSError, EOFError, ValueError):
            raise InputError(f"{source}: its {encoding} voxel data is corrupt; send the file again.") from None
    if len(out) > nbytes:
        raise extra
    if len(out) < nbytes:
        raise short
    return out


def prompt_limits_error(prompts: Any) -> Optional[str]:
    """Why ``prompts`` (a list of text / dicts / Prompts) exceeds a job's limits, or None. Never quotes a prompt."""
    if len(prompts) > MAX_PROMPTS:
        return f"A job takes at most {MAX_PROMPTS} prompts; this one has {len(prompts)}. Split them over several jobs."
    for n, p in enumerate(prompts, 1):
        text = p if isinstance(p, str) else (p.get("text") if isinstance(p, dict) else getattr(p, "text", ""))
        points = p.get("points") if isinstance(p, dict) else getattr(p, "points", None)
        if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
            return f"Prompt {n} has {len(text):,} characters; at most {MAX_PROMPT_CHARS} are accepted."
        if isinstance(points, (list, tuple)) and len(points) > MAX_PROMPT_POINTS:
            return f"Prompt {n} has {len(points):,} points; at most {MAX_PROMPT_POINTS} are accepted."
    return None


def is_loopback(host: str, resolve: bool = False) -> bool:
    """Whether ``host`` (an address in any form the socket layer takes, e.g. 127.1, [::1], ::ffff:127.0.0.1,
    or localhost) is a loopback address. With ``resolve``, other names count when every address they resolve
    to is loopback (what a server will bind); without it they do not."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        ip = None
        if re.fullmatch(r"[0-9a-fx.]+", h) and not h.endswith("."):
            try:  # the classic inet_aton forms the socket layer accepts: 127.1, 0x7f.1, 2130706433
                ip = ipaddress.ip_address(socket.inet_aton(h))
            except OSError:
                ip = None
    if ip is not None:
        mapped = getattr(ip, "ipv4_mapped", None)
        return bool((mapped or ip).is_loopback)
    if not resolve:
        return False
    try:
        infos = socket.getaddrinfo(h, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- results ----------------------------------------------------------------------------------
def result_record(index: int, r, probability: Optional[str]) -> dict[str, Any]:
    """JSON-able description of one PromptResult (the arrays travel separately); keys: RECORD_KEYS.
    ``probability``: the mode its map travels in (None: no map)."""
    record = {
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
    return record


def result_from_record(record: dict[str, Any], mask: np.ndarray, probability: Optional[np.ndarray]):
    """The PromptResult a record describes, with its ``mask`` and ``probability`` (None: not kept)."""
    from ..predictor import PromptResult
    from ..prompts import Prompt

    return PromptResult(Prompt.from_any(record["prompt"]), probability, mask, record["existence"], record["present"],
                        record["provenance"], record["message"], record["extra"],
                        complete=record.get("complete", True), objects=record.get("objects") or [])


def mask_key(n: int) -> str:
    return f"mask_{n}"


def encode_mask(mask: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Result ``n``'s mask, bit-packed (exact; C order of the (k, j, i) array)."""
    return {mask_key(n): np.packbits(np.asarray(mask, dtype=bool).ravel())}


def decode_mask(arrays: dict[str, np.ndarray], n: int, shape) -> np.ndarray:
    """Result ``n``'s mask as uint8 0/1 of ``shape``."""
    return unpack_mask(arrays[mask_key(n)], shape)


def quantize(prob: np.ndarray, mode: str) -> np.ndarray:
    """A probability map as it travels: ``float32`` as is, else uint8 by textseg.analysis.confidence.to_uint8
    (the engine's one quantization rule: round half up, |error| <= 1/510, NaN -> 0)."""
    if mode == FLOAT32:
        return np.asarray(prob, dtype=np.float32)
    from ..analysis.confidence import to_uint8

    return to_uint8(prob)


def encode_probability(prob: np.ndarray, mode: str, n: int) -> dict[str, np.ndarray]:
    """Sparse: a bitmap of the non-zero voxels + their (quantized) values. Models put ~0 almost
    everywhere, so this is a fraction of the dense size without costing a compressor."""
    q = quantize(prob, mode).ravel()
    nz = q != 0
    return {f"probnz_{n}": np.packbits(nz), f"probv_{n}": q[nz]}


def has_probability(arrays: dict[str, np.ndarray], n: int) -> bool:
    return f"probnz_{n}" in arrays and f"probv_{n}" in arrays


def decode_probability(arrays: dict[str, np.ndarray], n: int, shape, keep_uint8: bool = False) -> np.ndarray:
    """Result ``n``'s probability map: float32 0..1, or with ``keep_uint8`` the uint8 map (0..255 = 0..1, what
    textseg.analysis.confidence keeps) without a float32 copy; a float32 map is then quantized by its rule."""
    nz = unpack_mask(arrays[f"probnz_{n}"], (int(np.prod(shape)),)).view(bool)
    values = arrays[f"probv_{n}"]
    if keep_uint8:
        out = np.zeros(nz.shape, np.uint8)
        out[nz] = values if values.dtype == np.uint8 else quantize(values, UINT8)
    else:
        out = np.zeros(nz.shape, np.float32)
        out[nz] = dequantize(values)
    return out.reshape(tuple(shape))


def dequantize(arr: np.ndarray) -> np.ndarray:
    """A map as it travelled, back as float32 0..1 (uint8: textseg.analysis.confidence.to_float, q / 255)."""
    if arr.dtype == np.uint8:
        from ..analysis.confidence import to_float

        return to_float(arr)
    return np.asarray(arr, dtype=np.float32)


def load_npz(data: bytes) -> dict[str, np.ndarray]:
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


def client_headers() -> dict[str, str]:
    return {API_HEADER: str(API_VERSION), VERSION_HEADER: __version__, "User-Agent": f"textseg-client/{__version__}"}


def version_mismatch_message(client_api: str, client_version: str) -> str:
    return (
        f"This textseg server speaks API {API_VERSION} (textseg {__version__}); your client speaks API "
        f"{client_api} (textseg {client_version or 'unknown'}). Install a matching textseg on the client "
        f"(pip install 'textseg=={__version__}') or ask the server's administrator to upgrade."
    )


def summarize(results: list[Any]) -> str:
    return ", ".join(f"{r.name}: {r.voxel_count} voxels" for r in results)


# ---- re-threshold of a finished job (POST /v1/jobs/{id}/rethreshold) ----------------------------------
RETHRESHOLD_FIELDS = ("threshold", "segments", "keep_absent", "band")  # the request's fields


def mask_to_text(mask: np.ndarray) -> str:
    """A mask in JSON: base64 of its bit-packed voxels (C order of the (k, j, i) array, numpy's bit order)."""
    import base64

    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool).ravel())).decode("ascii")


def mask_from_text(text: str, shape) -> np.ndarray:
    """The inverse of mask_to_text: a bool array of ``shape``."""
    import base64

    n = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=n).reshape(tuple(shape)).astype(bool)


def rethreshold_record(record: dict[str, Any], mask: np.ndarray, threshold: float,
                       confidence: dict[str, Any]) -> dict[str, Any]:
    """One segment of a re-threshold: which result it is, its new mask and the model's confidence in it."""
    from ..prompts import Prompt

    name = (record.get("extra") or {}).get("name") or Prompt.from_any(record["prompt"]).label
    return {"index": record["index"], "name": name, "prompt": record["prompt"], "threshold": threshold,
            "voxel_count": int(np.count_nonzero(mask)), "confidence": _jsonable(confidence),
            "mask": mask_to_text(mask)}
