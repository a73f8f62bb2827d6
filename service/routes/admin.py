"""Admin (behind the API key), health and metrics. Admin operations run in the engine, so every
front-end process sees one state."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request, Response

from models import check_name
from service.auth import require_admin
from service.client import ADMIN_TIMEOUT_S, STATE_TIMEOUT_S, EngineClient, engine_down
from service.errors import BadRequest, ServiceError, Unavailable
from service.schemas import AdapterOp, GraphsInfo, Health, ModelInfo, ModelList, PrecisionInfo

router = APIRouter()
admin = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)])


@admin.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Every variant in the store and every loaded one, with its state, and the precision chosen."""
    state = await request.app.state.engine.refresh()
    entries = state["entries"]
    infos = {i.name: i for i in request.app.state.store.list()}
    out = []
    for name in sorted(set(infos) | set(entries)):
        e = entries.get(name)
        info = infos.get(name)
        m = info.manifest if info else None
        out.append(
            ModelInfo(
                name=name,
                kind=e["kind"] if e else (m.kind if m else None),
                base=f"{m.base_model}@{m.base_fingerprint[:12]}" if m else None,
                labels=e["labels"] if e else (m.labels if m else []),
                loaded=e is not None,
                resident=bool(e and e["resident"]),
                bytes=e["bytes"] if e else None,
                last_used=(e["last_used"] or None) if e else None,
                request_count=e["request_count"] if e else 0,
                precision=e.get("precision") if e else None,
                error=None if e else (state["refused"].get(name) or (info.error if info else None)),
            )
        )
    graphs = state.get("cuda_graphs")  # absent from the Ray deployment's state
    return ModelList(
        data=out, precision=PrecisionInfo(**state["precision"]), cuda_graphs=GraphsInfo(**graphs) if graphs else None
    )


async def _command(request: Request, op: str, name: str) -> dict:
    try:
        check_name(name)
    except ValueError as e:
        raise BadRequest(f"{e}") from None
    engine: EngineClient = request.app.state.engine
    # the reply carries the engine's new state version: this front-end refreshes its cache in the
    # background (EngineClient._read), and a request for a name it has not seen yet refreshes first
    reply = await engine.call(op, ADMIN_TIMEOUT_S, name=name)
    return {k: reply[k] for k in AdapterOp.model_fields if k in reply}


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
    """This front-end's request metrics (all front-ends' when several) followed by the engine's."""
    from prometheus_client import CONTENT_TYPE_LATEST

    text = request.app.state.metrics.render()
    # engine down or busy: the front-end's own series still say so (service_engine_up)
    with contextlib.suppress(ServiceError):
        text += (await request.app.state.engine.call("metrics", STATE_TIMEOUT_S))["text"].encode()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health, tags=["ops"])
async def healthz() -> Health:
    """The front-end process is up (the engine may still be loading, or restarting)."""
    return Health(status="ok")


async def engine_ready(request: Request) -> dict:
    """The engine's state once it serves; 503 with the reason otherwise."""
    engine: EngineClient = request.app.state.engine
    if not engine.connected:
        raise engine_down()
    state = await engine.refresh()
    if state["startup_error"]:
        raise Unavailable(f"startup failed: {state['startup_error']}; fix the store and restart")
    if not state["ready"]:
        raise Unavailable("still loading models; retry shortly", headers={"Retry-After": "1"})
    return state


@router.api_route("/readyz", methods=["GET", "HEAD"], response_model=Health, tags=["ops"])
async def readyz(request: Request) -> Health:
    """Ready once the engine process runs and its startup loads are done."""
    state = await engine_ready(request)
    return Health(status="ready", loaded=sorted(state["entries"]))
