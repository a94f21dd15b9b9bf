"""Uploaded images: ``PUT /v1/volumes/{sha256}`` (a self-contained NRRD, named by its sha256) and
``HEAD/GET`` (does the server hold it for this client)."""

from __future__ import annotations

import hashlib
import uuid
import zlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..api_errors import ApiError, disk_full_error
from ..backend import disk_full
from ..wire import VOLUME_NOT_FOUND
from .common import NOT_HELD, caller, check_sha, manager

router = APIRouter()


@router.head("/v1/volumes/{sha}")
@router.get("/v1/volumes/{sha}")
async def volume_info(sha: str, request: Request):
    v = manager(request).get_volume(check_sha(sha), caller(request).owner, touch=False)
    if v is None:
        raise ApiError(404, VOLUME_NOT_FOUND, NOT_HELD)
    return {"volume": v.sha, "shape": list(v.shape), "dtype": v.dtype, **v.geometry}


@router.put("/v1/volumes/{sha}", status_code=201)
async def upload(sha: str, request: Request):
    m = manager(request)
    sha, owner = check_sha(sha), caller(request).owner
    if m.get_volume(sha, owner) is not None:
        return JSONResponse({"volume": sha, "known": True}, status_code=200)
    limit = m.settings.max_upload_bytes
    enc = request.headers.get("content-encoding", "identity").lower()
    if enc not in ("identity", "gzip"):
        raise ApiError(415, "unsupported_encoding",
                       f"Content-Encoding '{enc[:40]}' is not supported; send raw or gzip.")
    tmp = m.uploads_dir / f"{uuid.uuid4().hex}.nrrd"
    try:
        digest, size = await receive(request, tmp, enc == "gzip", limit)
        if digest != sha:
            raise ApiError(400, "hash_mismatch",
                           f"The upload's sha256 is {digest}, not {sha} as named: the body was changed "
                           "or truncated in transit. Upload it again.")
        v = await run_in_threadpool(m.add_volume, sha, tmp, owner)
    finally:
        tmp.unlink(missing_ok=True)
    return {"volume": v.sha, "known": False, "shape": list(v.shape), "dtype": v.dtype, "bytes": size}


async def receive(request, path: Path, gzipped: bool, limit: int) -> tuple[str, int]:
    """Stream the body to ``path`` (decoding gzip), hashing it; 413 past ``limit`` decoded bytes, 507 when the
    disk is full (the caller removes ``path``)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, "too_large",
                       f"The image is larger than this server accepts ({limit / 2**20:.0f} MiB decoded). "
                       "Crop it or ask the administrator to raise --max-upload-mb.")
    if declared and declared.isdigit() and int(declared) > limit and not gzipped:
        raise too_big
    h = hashlib.sha256()
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    size = 0
    try:
        with open(path, "wb") as fh:  # the try is outside: closing (flushing) may be what hits the full disk
            async for chunk in request.stream():
                data = dec.decompress(chunk, limit + 1 - size) if dec is not None else chunk
                if dec is not None and dec.unconsumed_tail:
                    raise too_big
                size += len(data)
                if size > limit:
                    raise too_big
                h.update(data)
                fh.write(data)
            if dec is not None:
                tail = dec.flush()
                size += len(tail)
                if size > limit:
                    raise too_big
                h.update(tail)
                fh.write(tail)
                if not dec.eof:
                    raise ApiError(400, "bad_gzip", "The gzip body is truncated: upload it again.")
    except zlib.error:
        raise ApiError(400, "bad_gzip", "The body is not valid gzip although Content-Encoding says so.") from None
    except OSError as exc:
        if disk_full(exc):
            raise disk_full_error("the upload") from None
        raise
    return h.hexdigest(), size

