"""The engine process: owns the runtime (models, device) and the batcher; front-ends reach it over ZeroMQ.

`python -m service.engine --address ipc://PATH --config JSON` (service/supervisor.py starts it).

Threads: the main thread runs the socket loop (ROUTER: requests in, replies out) and never
computes; the batcher thread runs forwards and admin commands. A zmq socket belongs to one thread,
so replies made on other threads go through an inproc PUSH -> PULL pair to the main thread,
the shape of vLLM's engine-core process (input and output sockets beside a busy loop).
Messages are multipart, one request or reply per frame, and the answers of one batch go to each
front-end as one message (vLLM sends one EngineCoreOutputs per step). Why: py-spy of the 2-layer
model at ~1,100 req/s had a reply send per request at 8 % of the batcher thread (on 2 cores each
send also wakes zmq's I/O threads and the other process); A/B, wrk c=32, two runs each: 1,046 / 858
-> 1,259 / 1,227 req/s. Front-ends still send each request at once: holding a turn's requests for
one send made the engine wait for the whole wave (791 / 884 req/s, engine CPU half idle).
What the transport costs (2-core AMD EPYC VM, Python, 200-byte messages, request and reply through
a worker thread as here, p50 of 2,800 round trips): ZeroMQ DEALER -> ROUTER -> inproc -> ROUTER
150-210 us, the worker replying on its own ROUTER 130-200 us, a plain unix socket 46 us. ZeroMQ's
I/O threads add two thread wake-ups each way, the largest part of the ~2 ms a c=1 request spends
outside compute on that VM (1.1 ms on the Xeon); a lighter transport is the lead, not yet tried.
SIGTERM drains: new requests get 503, queued ones finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import zmq

from models import Store
from service.batcher import Batcher, Job
from service.config import ServiceConfig
from service.errors import ModelNotFound, ServiceError, Unavailable
from service.metrics import EngineMetrics
from service.protocol import error_fields, pack, unpack
from service.runtime import Runtime

log = logging.getLogger("service.engine")
OUTBOX = "inproc://outbox"
POLL_MS = 100


class Engine:
    """See the module docstring. `serve()` blocks until SIGTERM (or the parent process dies)."""

    def __init__(self, cfg: ServiceConfig, address: str):
        self.cfg, self.address = cfg, address
        self.engine_id = uuid.uuid4().hex[:12]  # front-ends drop cached state when it changes
        self.metrics = EngineMetrics(cfg.device)
        self.runtime = Runtime(Store(cfg.store), cfg, on_evict=self.metrics.evictions.inc)
        self.metrics.precision.info(self.runtime.precision_choice.as_dict())
        self.batcher = Batcher(self.runtime, self.metrics, answering=self._coalesced)
        self.ctx = zmq.Context()
        self._local = threading.local()
        self._stop = threading.Event()

    # ---- replies, from any thread --------------------------------------------------------------
    def _reply(self, ident: bytes, msg: dict[str, Any]) -> None:
        msg["e"], msg["v"] = self.engine_id, self.runtime.version
        held = getattr(self._local, "held", None)
        if held is not None:  # inside _coalesced: sent when the batch's answers are all made
            held.setdefault(ident, []).append(pack(msg))
            return
        self._push([ident, pack(msg)])

    def _push(self, frames: list[bytes]) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.connect(OUTBOX)
        push.send_multipart(frames)

    @contextlib.contextmanager
    def _coalesced(self) -> Iterator[None]:
        """Replies made on this thread inside the block go out as one message per front-end at its end."""
        self._local.held = {}
        try:
            yield
        finally:
            held, self._local.held = self._local.held, None
            for ident, replies in held.items():
                self._push([ident, *replies])

    def _error(self, ident: bytes, req_id: int, exc: BaseException) -> None:
        self._reply(ident, {"id": req_id, "error": error_fields(exc)})

    def _job_done(self, ident: bytes, req_id: int, job: Job, error: Exception | None) -> None:
        if error is not None:
            return self._error(ident, req_id, error)
        logits = np.stack(job.logits).astype(np.float32, copy=False)
        self._reply(
            ident,
            {
                "id": req_id,
                "logits": logits.tobytes(),
                "labels": logits.shape[1],
                "queue_ms": job.queue_ms,
                "compute_ms": job.compute_ms,
                "tokens": job.tokens,
            },
        )

    # ---- requests (main thread) ----------------------------------------------------------------
    def _handle_frames(self, frames: list[bytes]) -> None:
        """[front-end identity, request, request, ...] as the ROUTER delivers them."""
        for raw in frames[1:]:
            self._handle(frames[0], unpack(raw))

    def _handle(self, ident: bytes, msg: dict[str, Any]) -> None:
        req_id, op = msg.get("id", -1), msg.get("op")
        try:
            if op == "infer":
                self._infer(ident, req_id, msg)
            elif op in ("load", "unload"):
                fut = self.batcher.command(op, msg["name"])
                fut.add_done_callback(
                    lambda f: (
                        self._error(ident, req_id, f.exception())
                        if f.exception()
                        else self._reply(ident, {"id": req_id, **f.result()})
                    )
                )
            elif op == "state":
                self._reply(ident, {"id": req_id, **self.state()})
            elif op == "tokenizer":
                entry = next((e for e in list(self.runtime.entries.values()) if e.tok_key == msg["key"]), None)
                if entry is None:
                    raise ModelNotFound(f"no loaded variant has tokenizer {msg['key']}; it was replaced meanwhile")
                self._reply(
                    ident, {"id": req_id, "json": entry.tokenizer_json(), "max_length": entry.manifest.max_length}
                )
            elif op == "metrics":
                self._reply(ident, {"id": req_id, "text": self.metrics.render().decode()})
            else:
                raise ServiceError(f"unknown engine op {op!r}; front-end and engine versions differ")
        except Exception as e:  # every request gets exactly one answer
            self._error(ident, req_id, e)

    def _infer(self, ident: bytes, req_id: int, msg: dict[str, Any]) -> None:
        if not self.batcher.ready.is_set():
            raise Unavailable("the engine is still loading models; retry shortly", headers={"Retry-After": "1"})
        if msg["variant"] not in self.runtime.entries:
            loaded = ", ".join(sorted(self.runtime.entries)) or "none"
            raise ModelNotFound(
                f"model '{msg['variant']}' is not loaded; loaded: {loaded}; load it with PUT /v1/adapters/{msg['variant']}"
            )
        job = Job(
            msg["variant"],
            msg["texts"],
            msg["rows"],
            msg["tok"],
            lambda job, err: self._job_done(ident, req_id, job, err),
            deadline_s=msg.get("deadline_s", float("inf")),
        )
        self.batcher.submit(job)

    def state(self) -> dict[str, Any]:
        """What front-ends cache: readiness, every servable variant (with its tokenizer key), refusals."""
        return self.batcher.state()

    # ---- the socket loop -----------------------------------------------------------------------
    def serve(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.bind(self.address)
        outbox = self.ctx.socket(zmq.PULL)
        outbox.bind(OUTBOX)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        self.batcher.start()
        parent = os.getppid()
        log.info("engine %s listening on %s", self.engine_id, self.address)
        drain: threading.Thread | None = None
        while True:
            events = dict(poller.poll(POLL_MS))
            if outbox in events:
                _pump(outbox, router.send_multipart)
            if router in events:
                _pump(router, self._handle_frames)
            if drain is None and (self._stop.is_set() or os.getppid() != parent):
                # stop accepting (new requests get 503), let the queue finish, keep replying meanwhile
                drain = threading.Thread(target=self.batcher.stop, args=(self.cfg.request_timeout_s,), daemon=True)
                drain.start()
            if drain is not None and not drain.is_alive():
                time.sleep(0.05)
                _pump(outbox, router.send_multipart)
                break
        # destroy, not term: the reply sockets of the batcher and swap threads are closed here too
        self.ctx.destroy(linger=1000)
        log.info("engine %s stopped", self.engine_id)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()


def _pump(sock: zmq.Socket, handle: Any) -> None:
    """Handle every message waiting on `sock` without blocking."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m service.engine", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="ZeroMQ address to bind (ipc://PATH)")
    p.add_argument("--config", required=True, help="ServiceConfig as JSON")
    args = p.parse_args(argv)
    cfg = ServiceConfig.model_validate_json(args.config)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(cfg, args.address)
    signal.signal(signal.SIGTERM, engine.request_stop)
    signal.signal(signal.SIGINT, engine.request_stop)
    engine.serve()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
