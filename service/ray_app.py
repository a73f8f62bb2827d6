"""The service on Ray Serve: the engine in every replica, Ray's model multiplexing routes adapters.

    pip install '.[ray]'
    serve run configs/ray/ray-serve.yaml            # or: serve deploy ... on a running cluster

Two deployments (see configs/ray/ray-serve.yaml for replica counts and autoscaling):

  Frontend  the same FastAPI routes as the single-machine service (service/routes/: own JSON
            /v1/classify, HF text-classification /models/{name}, KServe V2) behind Ray Serve's
            FastAPI ingress. Its `app.state.engine` is `RayEngineClient`: the interface the routes
            already call (entry / infer / refresh / call), answered by Engine replicas instead of
            the engine process. It reads labels from the store's manifests and never loads
            a model.
  Engine    N replicas, each running this project's engine in-process (`LocalEngine`: Runtime +
            Batcher: one base, an LRU set of LoRA adapters, mixed-adapter token-budget batches,
            full/merged/ONNX variants). Requests carry the variant name as Ray's multiplexed model
            id, so Ray routes a variant's traffic to replicas that already hold it; a replica
            loads a variant on its first request (`@serve.multiplexed`) and Ray evicts the least
            recently used one beyond `max_adapters_per_replica`.

Why two deployments: Ray's HTTP proxy routes before the body is read, but this API names the
variant in the JSON body (or path); the front-end parses it and calls the engine handle with
`multiplexed_model_id`. Ray's own limit — one model per batch in `@serve.batch` — does not
apply: each replica's batcher mixes every adapter it holds in one forward.

Admin load/unload (PUT/DELETE /v1/adapters/{name}) cannot reach every replica through a Ray
handle (a call goes to one replica), so it is refused with 405 saying how variants get loaded here.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import ManifestError, Store, VariantNotFound
from service.app import serve_api
from service.batcher import Batcher, Job
from service.client import Result
from service.config import ServiceConfig
from service.errors import ModelNotFound, QueueFull, Refused, ServiceError, Timeout, Unavailable
from service.metrics import EngineMetrics, FrontendMetrics
from service.protocol import error_fields, error_from
from service.runtime import Runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("service.ray")
STARTUP_TIMEOUT_S = 600.0  # a large base on a cold disk takes minutes; Ray waits for replica __init__
REPLICA_RETRIES = 3  # a replica that died mid-request: the request is retried on another one
INLINE_TOKENIZE_CHARS = 2_000
REFRESH_TIMEOUT_S = 30.0  # every replica's state (/v1/models, /readyz); a busy replica answers once a slot frees


class RayAppArgs(BaseModel):
    """Arguments of the application (`args:` in the serve config, or `build_app(dict)`)."""

    model_config = ConfigDict(extra="forbid")

    store: Path = Field(description="model store directory, the same path on every node (shared disk or image)")
    max_adapters_per_replica: int = Field(
        8, gt=0, description="variants Ray keeps per engine replica (@serve.multiplexed cap) = the engine's LRU cap"
    )
    preload: str = Field("", description="comma-separated variants every replica loads at start (default: none)")
    engine_replicas: int = Field(1, gt=0, description="engine replicas (the config's deployments: section overrides)")
    engine_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per engine replica")
    engine_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (set service.device: cuda too)")
    max_ongoing_requests: int = Field(64, gt=0, description="requests in flight per engine replica (batch company)")
    max_queued_requests: int = Field(
        256,
        gt=0,
        description="requests each front-end holds while every engine replica is at max_ongoing_requests; beyond "
        "it, 429 queue_full with Retry-After (Ray's default, no limit, kept them waiting until they timed out)",
    )
    service: dict[str, Any] = Field(
        default_factory=dict,
        description="any other ServiceConfig field for every replica (precision, threads, max_batch_tokens, ...)",
    )

    def service_config(self) -> ServiceConfig:
        """The engine/front-end configuration every replica runs (validated here, at build time)."""
        clash = {"store", "max_adapters", "variants"} & set(self.service)
        if clash:
            raise ValueError(f"set {sorted(clash)} with store / max_adapters_per_replica / preload, not under service:")
        return ServiceConfig(
            store=self.store, max_adapters=self.max_adapters_per_replica, variants=self.preload, **self.service
        )


class NotOnRay(ServiceError):
    """An operation of the single-machine service that has no meaning across Ray replicas."""

    status, type = 405, "not_supported"


def adapters_not_on_ray(method: str) -> NotOnRay:
    """405 for any method on /v1/adapters/{name}: on Ray no method is served there, so `Allow` is empty (RFC 9110
    10.2.1: the resource allows no methods)."""
    return NotOnRay(
        f"{method} /v1/adapters is not available on Ray Serve: hot-swap across replicas is not built. Every variant in "
        "the store is servable by name and loads on the replica Ray routes its first request to (multiplexed model "
        "id); replicas evict the least recently used beyond max_adapters_per_replica. To replace a variant, write it "
        "into the store under a new name, or redeploy (`serve deploy`) for replicas to start from the store's "
        "current versions.",
        headers={"Allow": ""},
    )


# ---- the engine, in-process --------------------------------------------------------------------
class LocalEngine:
    """This project's engine in the calling process: Runtime + Batcher, answered on an asyncio loop.

    The same pieces the engine process runs (service/engine.py), without the sockets: the
    batcher thread owns the models; admin commands and jobs go through its queue.
    """

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.metrics = EngineMetrics(cfg.device)
        self.runtime = Runtime(Store(cfg.store), cfg, on_evict=self.metrics.evictions.inc)
        self.metrics.precision.info(self.runtime.precision_choice.as_dict())
        self.batcher = Batcher(self.runtime, self.metrics)

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> LocalEngine:
        """Start the batcher and wait for its startup loads (raises if startup failed)."""
        self.batcher.start()
        deadline = time.monotonic() + timeout_s
        while not self.batcher.ready.wait(0.05):
            if self.batcher.startup_error or time.monotonic() > deadline:
                raise RuntimeError(f"engine startup failed: {self.batcher.startup_error or 'timed out'}")
        return self

    def stop(self) -> None:
        self.batcher.stop(self.cfg.request_timeout_s)

    async def command(self, op: str, name: str, reason: str = "admin") -> dict[str, Any]:
        """load (or replace) / unload `name` through the batcher (`reason`: see Batcher.command); ServiceError on
        refusal."""
        return await asyncio.wrap_future(self.batcher.command(op, name, reason))

    async def infer(self, name: str, texts: list[str], timeout_s: float) -> dict[str, Any]:
        """fp32 logits (rows x labels) of `texts` under variant `name`, plus the batcher's timing."""
        entry = self.runtime.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model '{name}' is not loaded on this replica; it loads on a request naming it")
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            rows = entry.encode(texts)
        else:  # long inputs off the event loop (the Rust tokenizer releases the GIL)
            rows = await run_in_threadpool(entry.encode, texts)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(job: Job, error: Exception | None) -> None:  # batcher thread
            loop.call_soon_threadsafe(_settle, fut, job, error)

        job = Job(name, texts, rows, entry.tok_key, done, deadline_s=time.time() + timeout_s)
        self.batcher.submit(job)
        try:
            job, error = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True  # its rows are skipped
            raise Timeout(f"no result within {timeout_s:g}s; retry later or raise request_timeout_s") from None
        except asyncio.CancelledError:  # Ray cancelled the request (front-end timeout, client gone): nobody waits
            job.cancelled = True
            raise
        if error is not None:
            raise error
        return job.result()

    def state(self) -> dict[str, Any]:
        """The shape the admin routes read (as the engine process's `state` reply)."""
        return self.batcher.state()


def _settle(fut: asyncio.Future, job: Job, error: Exception | None) -> None:
    if not fut.done():
        fut.set_result((job, error))


# ---- the engine deployment ---------------------------------------------------------------------
class _Held:
    """What Ray's multiplex cache holds for one variant; Ray calls __del__ when it evicts it
    (from an executor thread), and the replica then unloads the variant from its engine."""

    def __init__(self, replica: EngineReplica, name: str):
        self.replica, self.name, self.released = replica, name, False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self.replica.loop.call_soon_threadsafe(self.replica.evicted, self.name)


class EngineReplica:
    """One engine replica. `get_model` is wrapped by @serve.multiplexed in `engine_deployment`."""

    def __init__(self, cfg_json: str):
        self.cfg = ServiceConfig.model_validate_json(cfg_json)
        self.engine = LocalEngine(self.cfg).start()
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's event loop, set on the first load
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.held: set[str] = set()  # variants Ray's cache holds here (what Ray routes by)
        self.inflight: Counter[str] = Counter()
        self.unloading: dict[str, asyncio.Task] = {}
        self.loading: dict[str, asyncio.Task] = {}  # engine loads in progress (shared by every request waiting)
        self.loads: Counter[str] = Counter()  # engine loads per variant on this replica
        self.requests = self.hits = 0
        self._getting: set[asyncio.Task] = set()  # multiplexed loads run to their end (see _get_model_to_the_end)

    async def _load(self, name: str) -> _Held:
        self.loop = asyncio.get_running_loop()
        pending = self.unloading.get(name)
        if pending is not None:  # Ray evicted it and wants it back: let the unload finish first
            await asyncio.shield(pending)
        if name not in self.engine.runtime.entries:
            # shielded: a cancelled request (front-end timeout, client gone) must not cancel the engine's future
            # half-way (the batcher commits the load anyway); once it lands, it is unloaded unless Ray holds it
            load = self.loading.get(name)
            if load is None:
                load = self.loading[name] = asyncio.ensure_future(self._engine_load(name))
            try:
                await asyncio.shield(load)
            except asyncio.CancelledError:
                load.add_done_callback(lambda f: f.cancelled() or f.exception() or self._maybe_unload(name))
                raise
        self.held.add(name)
        return _Held(self, name)

    async def _engine_load(self, name: str) -> None:
        try:
            await self.engine.command("load", name, reason="cold")  # a request needs it: not an admin operation
            self.loads[name] += 1
        finally:
            self.loading.pop(name, None)

    def evicted(self, name: str) -> None:
        """Ray dropped `name` from this replica's cache: unload it once no request here still needs it."""
        self.engine.metrics.evictions.inc()  # Ray's LRU is this replica's cap (the engine's own never acts)
        self.held.discard(name)
        self._maybe_unload(name)

    def _maybe_unload(self, name: str) -> None:
        if name in self.held or self.inflight[name] or name in self.unloading:
            return
        if name in self.engine.runtime.entries:
            self.unloading[name] = asyncio.ensure_future(self._unload(name))

    async def _unload(self, name: str) -> None:
        try:
            await self.engine.command("unload", name, reason="evicted")
        except ServiceError as e:
            log.warning("unloading evicted %s: %s", name, e.message)
        finally:
            self.unloading.pop(name, None)

    async def infer(self, texts: list[str], timeout_s: float) -> dict[str, Any]:
        """Classify `texts` with the request's multiplexed variant; errors come back as fields."""
        name = serve.get_multiplexed_model_id()
        # a hit: this request needs no engine load here (held since an earlier request, or preloaded)
        hit = name in self.engine.runtime.entries and name not in self.unloading
        self.requests += 1
        self.hits += hit
        self.inflight[name] += 1
        try:
            await self._get_model_to_the_end(name)
            reply = await self.engine.infer(name, texts, timeout_s)
        except ServiceError as e:
            return {"error": error_fields(e)}
        finally:
            self.inflight[name] -= 1
            if not self.inflight[name]:
                self._maybe_unload(name)
        reply["replica"] = {"id": self.replica_id, "hit": hit, "loads": sum(self.loads.values())}
        return reply

    async def _get_model_to_the_end(self, name: str) -> None:
        """Ray's multiplexed load of `name` (get_model), run to its end even when this request is cancelled (front-end
        timeout, client gone): Ray's wrapper forgets a load only when it raises an Exception, and CancelledError is
        not one, so a cancelled get_model left `name` in the ids this replica pushes to the routers for good (held
        neither in Ray's cache nor, once its load landed and was undone, in the engine), and Ray kept routing
        `name` here as a hit. Run to its end, the load lands in Ray's cache: what is advertised is what is held."""
        task = asyncio.ensure_future(self.get_model(name))
        self._getting.add(task)
        task.add_done_callback(self._got)
        try:
            await asyncio.shield(task)
        finally:
            del task  # a cancelled request's traceback keeps this frame: it must not keep the held model too

    def _got(self, task: asyncio.Task) -> None:
        self._getting.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a refusal whose requester left is not "never retrieved"

    async def state(self) -> dict[str, Any]:
        return {
            **self.engine.state(),
            "replica": self.replica_id,
            "held": sorted(self.held),
            "loads": dict(self.loads),
            "requests": self.requests,
            "hits": self.hits,
        }

    async def metrics(self) -> dict[str, str]:
        """This replica's engine metrics, with its id (the front-end labels each replica's series with it)."""
        return {"replica": self.replica_id, "text": self.engine.metrics.render().decode()}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def engine_deployment(args: RayAppArgs) -> Any:
    """The Engine deployment class with the multiplex cap of `args` (fixed when the method is decorated)."""

    class Engine(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=args.max_adapters_per_replica)
        async def get_model(self, name: str) -> _Held:
            return await self._load(name)

    Engine.__name__ = Engine.__qualname__ = "Engine"
    return serve.deployment(
        Engine,
        name="Engine",
        num_replicas=args.engine_replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": args.engine_cpus, "num_gpus": args.engine_gpus},
    )


# ---- the front-end -----------------------------------------------------------------------------
_REPLICA_INFO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("replica_info", default=None)


class RayEngineClient:
    """What the routes call as `request.app.state.engine` (the methods of service.client.EngineClient),
    answered by Engine replicas through a Ray handle with the variant as multiplexed model id."""

    connected = True  # Ray's proxy only routes here while the application runs

    def __init__(self, handle: DeploymentHandle, store: Store):
        self.handle, self.store = handle, store
        self._entries: dict[str, dict[str, Any]] = {}

    async def entry(self, name: str) -> dict[str, Any]:
        """Labels and kind from the store's manifest; any variant in the store is servable by name."""
        if name not in self._entries:
            try:
                m = await run_in_threadpool(self.store.manifest, name)
            except ManifestError as e:
                raise Refused(f"variant '{name}' has an unreadable manifest: {e}; rewrite it in the store") from None
            except (VariantNotFound, ValueError):  # not there, or not a valid variant name
                known = ", ".join(self.store.names()) or "none"
                raise ModelNotFound(
                    f"model '{name}' is not in the store; in the store: {known} — on Ray Serve every variant of "
                    "the store loads on its first request (write it into the store first)"
                ) from None
            self._entries[name] = {"kind": m.kind, "labels": m.labels}
        return self._entries[name]

    async def _remote(self, method: str, *args: Any, model: str | None = None, timeout_s: float) -> Any:
        handle = self.handle.options(multiplexed_model_id=model) if model else self.handle
        deadline = time.monotonic() + timeout_s  # one budget for the request, retries included
        for attempt in range(REPLICA_RETRIES + 1):
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(_awaited(response), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                response.cancel()
                raise Timeout(f"no result within {timeout_s:g}s; retry later or raise request_timeout_s") from None
            except BackPressureError as e:  # every replica is at max_ongoing_requests and this caller's queue is full
                raise QueueFull(
                    f"queue full: every engine replica is busy and the requests waiting for one reached the limit "
                    f"({e.message}); retry after a moment, or add engine replicas",
                    headers={"Retry-After": f"{math.ceil(e.retry_after_s or 1):d}"},
                ) from None
            except (RayActorError, ActorUnavailableError) as e:  # the replica died: Ray routes the retry elsewhere
                if attempt == REPLICA_RETRIES:
                    raise Unavailable(
                        f"engine replicas are restarting ({type(e).__name__}); retry in a moment",
                        headers={"Retry-After": "1"},
                    ) from None
                log.warning("engine replica lost (%s); retrying the request", type(e).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _all_metrics(self, timeout_s: float) -> str:
        """Every engine replica's metrics, each series labelled `replica`: one replica's counters alone (what a
        routed call returns) would jump between replicas' values from scrape to scrape, which Prometheus reads
        as counter resets. A replica that does not answer in time is left out of this scrape."""
        try:
            replies = await self.handle.broadcast("metrics").results_async(timeout_s=timeout_s, return_exceptions=True)
        except (TimeoutError, DeploymentUnavailableError):
            return ""
        return merge_replica_metrics([r for r in replies if isinstance(r, dict)])

    async def infer(self, name: str, entry: dict[str, Any], texts: list[str], timeout_s: float) -> Result:
        # one deadline, the configured one, from here: time queued for a replica counts (the replica's own
        # deadline starts later, so this one answers first; the replica's job is cancelled with the request)
        reply = await self._remote("infer", texts, timeout_s, model=name, timeout_s=timeout_s)
        if "error" in reply:
            raise error_from(reply["error"])
        info = _REPLICA_INFO.get()
        if info is not None:  # shown as response headers (ReplicaHeaders)
            info.update(reply["replica"])
        logits = np.frombuffer(reply["logits"], dtype=np.float32).reshape(len(texts), reply["labels"])
        return Result(logits, reply["queue_ms"], reply["compute_ms"], reply["tokens"], reply.get("names"))

    async def refresh(self) -> dict[str, Any]:
        """Every engine replica's state, merged (`merge_replica_states`): a routed call reached one replica at random,
        so consecutive /v1/models answers listed different variants as loaded and counts jumped between replicas'.
        A replica that fails while answering is left out; if none answers, 503."""
        try:
            replies = await self.handle.broadcast("state").results_async(
                timeout_s=REFRESH_TIMEOUT_S, return_exceptions=True
            )
        except TimeoutError:
            raise Timeout(
                f"not every engine replica answered within {REFRESH_TIMEOUT_S:g}s (all busy?); retry later"
            ) from None
        except DeploymentUnavailableError:
            replies = []
        states = [r for r in replies if isinstance(r, dict)]
        if not states:
            raise Unavailable("no engine replica answered; retry in a moment", headers={"Retry-After": "1"})
        return merge_replica_states(states)

    async def call(self, op: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        if op in ("load", "unload"):
            raise adapters_not_on_ray("PUT" if op == "load" else "DELETE")
        if op == "metrics":
            return {"text": await self._all_metrics(timeout_s)}
        if op == "state":
            return await self.refresh()
        raise ServiceError(f"unknown engine op {op!r}")


async def _awaited(response: Any) -> Any:
    return await response


def merge_replica_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine state (the shape the admin routes read) from several replicas': a variant is loaded where any
    replica holds it and resident where any has its weights in memory; its request count is the replicas' sum, its
    last use the latest, its precision every precision a replica computes it in; refusals are every replica's.
    The deployment's precision choice and CUDA graphs are the first replica's (one configuration for all)."""
    entries: dict[str, dict[str, Any]] = {}
    precisions: dict[str, set[str]] = {}
    for state in states:
        for name, e in state["entries"].items():
            if e.get("precision"):
                precisions.setdefault(name, set()).add(e["precision"])
            m = entries.get(name)
            if m is None:
                entries[name] = dict(e)
                continue
            m["resident"] = m["resident"] or e["resident"]
            m["bytes"] = max((b for b in (m["bytes"], e["bytes"]) if b is not None), default=None)
            m["last_used"] = max(m["last_used"] or 0.0, e["last_used"] or 0.0)
            m["request_count"] += e["request_count"]
    for name, ps in precisions.items():
        entries[name]["precision"] = ", ".join(sorted(ps))
    errors = [s["startup_error"] for s in states if s["startup_error"]]
    return {
        "ready": all(s["ready"] for s in states),
        "startup_error": "; ".join(errors) or None,
        "precision": states[0]["precision"],
        "cuda_graphs": states[0].get("cuda_graphs"),
        "refused": {k: v for s in states for k, v in s["refused"].items()},
        "queue_rows": sum(s["queue_rows"] for s in states),
        "entries": entries,
        "replicas": sorted(s["replica"] for s in states if "replica" in s),
    }


def merge_replica_metrics(replies: list[dict[str, str]]) -> str:
    """One Prometheus exposition of several replicas' (same metric families, one `replica` label each):
    concatenated texts would repeat each family's HELP/TYPE, which the text format forbids."""
    families: dict[str, Metric] = {}
    for reply in replies:
        for fam in text_string_to_metric_families(reply["text"]):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "replica": reply["replica"]}, s.value, s.timestamp, s.exemplar)

    class _Merged:
        def collect(self) -> Any:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()


class ReplicaHeaders:
    """Adds `x-engine-replica` / `x-adapter-hit` / `x-replica-loads` to inference responses: which engine
    replica answered, whether it already held the variant, and how many loads it has done (for the
    routing tests and the ray-routing benchmark). A mutable holder in a context variable, so the
    client can fill it from inside the route whatever task the route runs in."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info: dict[str, Any] = {}
        _REPLICA_INFO.set(info)

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start" and info:
                msg["headers"] = [
                    *msg.get("headers", []),
                    (b"x-engine-replica", str(info["id"]).encode()),
                    (b"x-adapter-hit", b"1" if info["hit"] else b"0"),
                    (b"x-replica-loads", str(info["loads"]).encode()),
                ]
            await send(msg)

        await self.app(scope, receive, send_with_headers)


def frontend_app(cfg: ServiceConfig, engine: RayEngineClient) -> FastAPI:
    """The single-machine service's routes and error contract over `engine` (service/app.py's wiring)."""
    metrics = FrontendMetrics()
    metrics.engine_up.set(1)  # as `RayEngineClient.connected`: Ray's proxy routes here only while the application runs
    app = FastAPI(
        title="AG News classifier service (Ray Serve)",
        version="0.1.0",
        description="One shared base with per-request LoRA adapters per engine replica; Ray routes by variant.",
    )
    app.state.supervisor, app.state.store = None, engine.store
    serve_api(app, cfg, engine, metrics)

    # the other methods: Starlette's 405 would name PUT in `Allow`, which is a 405 here too
    @app.api_route("/v1/adapters/{name}", methods=["GET", "HEAD", "POST", "PATCH", "OPTIONS"], include_in_schema=False)
    async def adapters_other_methods(request: Request) -> None:
        raise adapters_not_on_ray(request.method)

    app.add_middleware(ReplicaHeaders)
    return app


@serve.deployment(name="Frontend", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Frontend:
    """HTTP ingress: parses and validates, then calls an Engine replica that holds the variant."""

    def __init__(self, engine: DeploymentHandle, cfg_json: str):
        self.cfg = ServiceConfig.model_validate_json(cfg_json)
        self.client = RayEngineClient(engine, Store(self.cfg.store))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return frontend_app(self.cfg, self.client)


def build_app(args: dict[str, Any] | RayAppArgs) -> Any:
    """Application builder for `serve run` / `serve deploy` (import_path: service.ray_app:build_app)."""
    a = args if isinstance(args, RayAppArgs) else RayAppArgs.model_validate(args)
    cfg = a.service_config()
    if not Store(cfg.store).root.is_dir():
        raise ValueError(f"store {cfg.store} is not a directory; every node needs the store at this path")
    engine = engine_deployment(a).bind(cfg.model_dump_json())
    return Frontend.bind(engine, cfg.model_dump_json())
