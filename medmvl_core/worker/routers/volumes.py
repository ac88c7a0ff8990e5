"""POST /v1/volumes (raw array bytes + X-MedMVL-Meta) and DELETE /v1/volumes/{id}.

The body streams into one buffer of the size the meta declares (peak memory ~1x the upload):
a declared size over the limit is refused before the body is read, a body longer than declared
as soon as it passes it.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from fastapi import APIRouter, Depends, Header, Request

from medmvl_core.engine.errors import RequestError
from medmvl_core.errors import MedMVLError
from medmvl_core.worker.deps import get_state, require_token
from medmvl_core.worker.models import ERROR_RESPONSES, DeletedOut, VolumeOut
from medmvl_core.worker.state import WorkerState
from medmvl_core.worker.volumes import meta_nbytes, parse_meta

logger = logging.getLogger(__name__)

router = APIRouter(tags=["volumes"], dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)


async def read_into_buffer(request: Request, size: int) -> np.ndarray:
    """The request body in a new uint8 array of exactly ``size`` bytes (pages are touched only
    as the body arrives)."""
    buf = np.empty(size, dtype=np.uint8)
    n = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        if n + len(chunk) > size:
            raise RequestError(f"the body is longer than dtype x shape in X-MedMVL-Meta "
                               f"({size} bytes)", code="shape_mismatch")
        buf[n:n + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        n += len(chunk)
    if n != size:
        raise RequestError(f"body has {n} bytes but X-MedMVL-Meta's dtype x shape needs {size}",
                           code="shape_mismatch")
    return buf


@router.post("/volumes", response_model=VolumeOut, openapi_extra={"requestBody": {
    "required": True, "description": "the array's raw little-endian bytes, C order",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(request: Request, state: WorkerState = Depends(get_state),
                 x_medmvl_meta: str | None = Header(
                     None, description='JSON {"dtype", "shape", "spacing", "origin", "direction", '
                                       '"modality"}')) -> dict:
    meta = parse_meta(x_medmvl_meta)
    size, limit = meta_nbytes(meta), state.settings.max_upload_bytes
    if size > limit:
        raise MedMVLError(f"dtype {meta['dtype']} x shape {meta['shape']} is {size} bytes, over "
                          f"the upload limit of {limit} bytes; downsample or crop the volume",
                          code="too_large")
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) != size:
        raise RequestError(f"body has {declared} bytes but dtype {meta['dtype']} x shape "
                           f"{meta['shape']} needs {size}", code="shape_mismatch")
    busy = state.upload_bytes_in_flight
    if busy and busy + size > state.settings.upload_buffer_bytes:
        raise MedMVLError(f"{busy} bytes of other uploads are being received; retry shortly",
                          code="uploads_busy")
    state.upload_bytes_in_flight += size  # bounds the memory of bodies read at the same time
    try:
        buf = await read_into_buffer(request, size)
        vid, created = await asyncio.to_thread(state.volumes.add, buf, meta)
    finally:
        state.upload_bytes_in_flight -= size
    logger.info("volume %s %s (%s %s)", vid[:8], "stored" if created else "already present",
                meta["dtype"], meta["shape"])
    return {"volume_id": vid, "created": created}


@router.delete("/volumes/{vid}", response_model=DeletedOut)
async def delete_volume(vid: str, state: WorkerState = Depends(get_state)) -> dict:
    """Free the volume; sessions on it are closed (they answer ``volume_evicted``)."""
    state.volumes.delete(vid)
    return {"deleted": True}
