"""Admin (behind the API key), health and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from models import check_name
from service.auth import require_admin
from service.errors import BadRequest, Unavailable
from service.schemas import AdapterOp, Health, ModelInfo, ModelList

router = APIRouter()
admin = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)])


@admin.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Every variant in the store and every loaded one, with its state."""
    rt = request.app.state.runtime
    entries = dict(rt.entries)  # a snapshot: the batcher may swap entries meanwhile
    infos = {i.name: i for i in rt.store.list()}
    out = []
    for name in sorted(set(infos) | set(entries)):
        e = entries.get(name)
        m = e.manifest if e else infos[name].manifest
        out.append(
            ModelInfo(
                name=name,
                kind=m.kind if m else None,
                base=f"{m.base_model}@{m.base_fingerprint[:12]}" if m else None,
                labels=m.labels if m else [],
                loaded=e is not None,
                resident=bool(e and e.resident),
                bytes=e.bytes if e else None,
                last_used=(e.last_used or None) if e else None,
                request_count=e.request_count if e else 0,
                error=None if e else (rt.refused.get(name) or infos[name].error),
            )
        )
    return ModelList(data=out)


async def _command(request: Request, op: str, name: str) -> dict:
    try:
        check_name(name)
    except ValueError as e:
        raise BadRequest(f"{e}") from None
    fut = request.app.state.batcher.command(op, name)
    return await asyncio.wrap_future(fut)


@admin.put("/adapters/{name}", response_model=AdapterOp)
async def load_adapter(name: str, request: Request) -> AdapterOp:
    """Load or replace variant `name` from the store (verified before it takes the name; 409 if refused)."""
    return AdapterOp(**await _command(request, "load", name))


@admin.delete("/adapters/{name}", response_model=AdapterOp)
async def unload_adapter(name: str, request: Request) -> AdapterOp:
    """Unload variant `name`; requests still queued for it get 404."""
    return AdapterOp(**await _command(request, "unload", name))


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health, tags=["ops"])
async def healthz() -> Health:
    """The process is up (models may still be loading)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["ops"])
async def readyz(request: Request) -> Health:
    """Ready once the startup loads are done and the batcher is running."""
    batcher = request.app.state.batcher
    if batcher.startup_error:
        raise Unavailable(f"startup failed: {batcher.startup_error}; fix the store and restart")
    if not batcher.ready.is_set():
        raise Unavailable("still loading models; retry shortly")
    return Health(status="ready", loaded=sorted(request.app.state.runtime.entries))
