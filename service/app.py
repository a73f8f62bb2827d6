"""The FastAPI front-end: wiring only (routes, error handlers, body limit, metrics, lifespan).

It never touches a model: routes validate, tokenise and exchange messages with the engine
process through `service.client.EngineClient`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import Store
from service.client import EngineClient
from service.config import ServiceConfig
from service.errors import PayloadTooLarge, error_body, install_error_handlers, route_path
from service.metrics import UNKNOWN_VARIANT, FrontendMetrics
from service.routes import admin, inference, kserve
from service.routes.inference import classify_fast
from service.supervisor import EngineSupervisor

CONFIG_ENV = "SERVICE_CONFIG_JSON"  # how `python -m service` hands the config to front-end worker processes


def _endpoint(path: str) -> str | None:
    """Inference endpoints get per-variant request metrics; others are not counted."""
    if path == "/v1/classify":
        return "classify"
    if path.startswith("/models/"):
        return "hf"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "kserve"
    return None


class LimitsAndMetrics:
    """Pure ASGI middleware: 413 for oversized bodies, request count/latency by variant and status.

    Hand-written rather than BaseHTTPMiddleware so a body over the limit is refused while it
    streams (Content-Length or not) without buffering it first.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: FrontendMetrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope["path"])
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, send, endpoint)
        received = 0
        gone = False  # the client closed the connection before any response: nobody to answer (499)

        async def limited_receive() -> Message:
            nonlocal received, gone
            msg = await receive()
            if msg["type"] == "http.disconnect" and status == 499:
                gone = True
            received += len(msg.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes; send fewer or shorter inputs")
            return msg

        status = 499  # no response sent: the client closed the connection first (nginx's code); else the real one
        start_s = time.perf_counter()

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start" and not gone:
                status = msg["status"]
            await send(msg)

        app = classify_fast if endpoint == "classify" and scope["method"] == "POST" else self.app
        try:
            await app(scope, limited_receive, send_status)
        except BaseException as exc:
            if gone and isinstance(exc, ClientDisconnect):
                return  # not a server error (FastAPI routes raise it from request.body())
            if status == 499:
                status = 500  # it raised before any response: a server error
            raise
        finally:
            if endpoint:
                variant = scope.get("state", {}).get("variant", UNKNOWN_VARIANT)
                self.metrics.requests.labels(variant, endpoint, str(status)).inc()
                self.metrics.request_latency.labels(variant, str(status)).observe(time.perf_counter() - start_s)

    async def _too_large(self, scope: Scope, send: Send, endpoint: str | None) -> None:
        from starlette.responses import JSONResponse

        msg = f"request body exceeds {self.max_body_bytes} bytes; send fewer or shorter inputs"
        resp = JSONResponse(error_body("payload_too_large", msg, route_path(scope)), status_code=413)
        if endpoint:
            self.metrics.requests.labels(UNKNOWN_VARIANT, endpoint, "413").inc()
        await resp(scope, _noop_receive, send)


async def _noop_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def create_app(cfg: ServiceConfig) -> FastAPI:
    """A front-end for the engine at --engine-address; without one it starts and supervises its own
    engine process (what tests and a one-process deployment use). Models load in the engine at
    startup (watch /readyz)."""
    metrics = FrontendMetrics()
    supervisor = None if cfg.engine_address else EngineSupervisor(cfg)
    engine = EngineClient(cfg.engine_address or supervisor.address, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if supervisor:
            supervisor.start()
        await engine.start()
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; the engine drains the rest.
        await engine.close()
        if supervisor:
            await run_in_threadpool(supervisor.stop, cfg.request_timeout_s)

    app = FastAPI(
        title="AG News classifier service",
        version="0.1.0",
        description="One shared base with per-request LoRA adapters, dynamic batching and hot-swap.",
        lifespan=lifespan,
    )
    app.state.supervisor, app.state.store = supervisor, Store(cfg.store)
    return serve_api(app, cfg, engine, metrics)


def serve_api(app: FastAPI, cfg: ServiceConfig, engine: Any, metrics: FrontendMetrics) -> FastAPI:
    """`app` serving the API over `engine` (an EngineClient, or Ray Serve's RayEngineClient): its routes,
    error contract, body limit and front-end metrics. One place, so both deployments serve the same API."""
    app.state.config, app.state.engine, app.state.metrics = cfg, engine, metrics
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(kserve.router)
    app.include_router(admin.admin)
    app.include_router(admin.router)
    app.add_middleware(LimitsAndMetrics, max_body_bytes=cfg.max_body_bytes, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for front-end worker processes (`python -m service --frontends N`)."""
    _stop_with_parent()
    return create_app(ServiceConfig.model_validate_json(os.environ[CONFIG_ENV]))


def _stop_with_parent(poll_s: float = 0.5) -> None:
    """A worker whose `python -m service` died (kill -9, OOM) shuts down as if sent SIGTERM: uvicorn's workers
    ran on without it, holding the port and answering 503 for the engine that had exited with it, so a restarted
    service could not bind. (The engine polls its parent the same way.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
