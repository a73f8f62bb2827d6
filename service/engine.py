"""The engine process: owns the runtime (models, device) and the batcher; front-ends reach it over a Unix socket.

`python -m service.engine --address unix://PATH --config JSON` (service/supervisor.py starts it).

Threads: the main thread runs the socket loop (service/transport.py: accepts front-ends, reads
requests) and never computes; the batcher thread runs forwards and admin commands. Whichever thread
finishes a request writes its answer straight into that front-end's socket, the way vLLM's engine-core
process has input and output beside its busy loop, minus the hop through a socket thread. The answers of
one batch go to each front-end as one write (vLLM sends one EngineCoreOutputs per step). Why: py-spy of
the 2-layer model at ~1,100 req/s had a reply send per request at 8 % of the batcher thread; A/B, wrk
c=32, two runs each: 1,046 / 858 -> 1,259 / 1,227 req/s. Front-ends still send each request at once:
holding a turn's requests for one send made the engine wait for the whole wave (791 / 884 req/s).
SIGTERM drains: new requests get 503, queued ones finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from models import Store
from service.batcher import Batcher, Job
from service.config import ServiceConfig
from service.errors import ModelNotFound, ServiceError, Unavailable, not_loaded
from service.metrics import EngineMetrics
from service.protocol import error_fields, pack, unpack
from service.runtime import Runtime, truncation_side
from service.transport import AddressInUse, Listener, Peer, frame

log = logging.getLogger("service.engine")
POLL_S = 0.1


class Engine:
    """See the module docstring. `serve()` blocks until SIGTERM (or the parent process dies)."""

    def __init__(self, cfg: ServiceConfig, address: str):
        self.cfg, self.address = cfg, address
        self.engine_id = uuid.uuid4().hex[:12]  # front-ends drop cached state when it changes
        self.metrics = EngineMetrics(cfg.device)
        self.runtime = Runtime(Store(cfg.store), cfg, on_evict=self.metrics.evictions.inc)
        self.metrics.precision.info(self.runtime.precision_choice.as_dict())
        self.batcher = Batcher(self.runtime, self.metrics, answering=self._coalesced)
        self._local = threading.local()
        self._stop = threading.Event()

    # ---- replies, from any thread --------------------------------------------------------------
    def _reply(self, peer: Peer, msg: dict[str, Any]) -> None:
        msg["e"], msg["v"] = self.engine_id, self.runtime.version
        held = getattr(self._local, "held", None)
        if held is not None:  # inside _coalesced: sent when the batch's answers are all made
            held.setdefault(peer, []).append(frame(pack(msg)))
            return
        peer.send(frame(pack(msg)))

    @contextlib.contextmanager
    def _coalesced(self) -> Iterator[None]:
        """Replies made on this thread inside the block go out as one write per front-end at its end."""
        self._local.held = {}
        try:
            yield
        finally:
            held, self._local.held = self._local.held, None
            for peer, replies in held.items():
                peer.send(b"".join(replies))

    def _error(self, peer: Peer, req_id: int, exc: BaseException) -> None:
        self._reply(peer, {"id": req_id, "error": error_fields(exc)})

    def _job_done(self, peer: Peer, req_id: int, job: Job, error: Exception | None) -> None:
        if error is not None:
            return self._error(peer, req_id, error)
        self._reply(peer, {"id": req_id, **job.result()})

    # ---- requests (main thread) ----------------------------------------------------------------
    def _handle(self, peer: Peer, msg: dict[str, Any]) -> None:
        req_id, op = msg.get("id", -1), msg.get("op")
        try:
            if op == "infer":
                self._infer(peer, req_id, msg)
            elif op in ("load", "unload"):
                fut = self.batcher.command(op, msg["name"])
                fut.add_done_callback(
                    lambda f: (
                        self._error(peer, req_id, f.exception())
                        if f.exception()
                        else self._reply(peer, {"id": req_id, **f.result()})
                    )
                )
            elif op == "state":
                self._reply(peer, {"id": req_id, **self.state()})
            elif op == "tokenizer":
                entry = next((e for e in list(self.runtime.entries.values()) if e.tok_key == msg["key"]), None)
                if entry is None:
                    raise ModelNotFound(f"no loaded variant has tokenizer {msg['key']}; it was replaced meanwhile")
                self._reply(
                    peer,
                    {
                        "id": req_id,
                        "json": entry.tokenizer_json(),
                        "max_length": entry.manifest.max_length,
                        "direction": truncation_side(entry.tokenizer),
                    },
                )
            elif op == "metrics":
                self._reply(peer, {"id": req_id, "text": self.metrics.render().decode()})
            else:
                raise ServiceError(f"unknown engine op {op!r}; front-end and engine versions differ")
        except Exception as e:  # every request gets exactly one answer
            self._error(peer, req_id, e)

    def _infer(self, peer: Peer, req_id: int, msg: dict[str, Any]) -> None:
        if not self.batcher.ready.is_set():
            raise Unavailable("the engine is still loading models; retry shortly", headers={"Retry-After": "1"})
        if msg["variant"] not in self.runtime.entries:
            raise not_loaded(msg["variant"], self.runtime.entries)
        job = Job(
            msg["variant"],
            msg["texts"],
            msg["rows"],
            msg["tok"],
            lambda job, err: self._job_done(peer, req_id, job, err),
            deadline_s=msg.get("deadline_s", float("inf")),
        )
        self.batcher.submit(job)

    def state(self) -> dict[str, Any]:
        """What front-ends cache: readiness, every servable variant (with its tokenizer key), refusals."""
        return self.batcher.state()

    # ---- the socket loop -----------------------------------------------------------------------
    def serve(self, ready_fd: int | None = None, parent_pid: int | None = None) -> None:
        """`ready_fd`: a pipe to write one byte to once the startup loads are done (the supervisor tells a
        crash at startup from a crash later by it). `parent_pid`: the process whose death stops this engine
        (default: the parent now). The supervisor passes its pid: a parent that died while this process
        imported torch was never noticed (the parent then was init), and the engine ran on, orphaned, in a
        session of its own."""
        listener = Listener(self.address)
        self.batcher.start()
        parent = parent_pid or os.getppid()
        log.info("engine %s listening on %s", self.engine_id, self.address)
        drain: threading.Thread | None = None
        while True:
            for peer, raw in listener.poll(POLL_S):
                try:
                    msg = unpack(raw)
                except ValueError:
                    msg = None
                if not isinstance(msg, dict):  # a client of another version: it gets no answer
                    log.error("dropped a message that is not a msgpack map (%d bytes)", len(raw))
                    continue
                self._handle(peer, msg)
            if ready_fd is not None and self.batcher.ready.is_set():
                with contextlib.suppress(OSError):  # a supervisor that is gone: nobody to tell
                    os.write(ready_fd, b"r")
                os.close(ready_fd)
                ready_fd = None
            if drain is None and (self._stop.is_set() or os.getppid() != parent):
                # stop accepting (new requests get 503), let the queue finish, keep replying meanwhile
                drain = threading.Thread(target=self.batcher.stop, args=(self.cfg.request_timeout_s,), daemon=True)
                drain.start()
            if drain is not None and not drain.is_alive():
                listener.flush_all(1.0)
                break
        listener.close()
        log.info("engine %s stopped", self.engine_id)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m service.engine", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="Unix socket to listen on (unix://PATH)")
    p.add_argument("--config", required=True, help="ServiceConfig as JSON")
    p.add_argument("--ready-fd", type=int, default=None, help="file descriptor to write one byte to once ready")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process is no longer the parent")
    args = p.parse_args(argv)
    cfg = ServiceConfig.model_validate_json(args.config)
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)  # the engine's own subprocesses must not hold it
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(cfg, args.address)
    signal.signal(signal.SIGTERM, engine.request_stop)
    signal.signal(signal.SIGINT, engine.request_stop)
    try:
        engine.serve(args.ready_fd, args.parent_pid)
    except AddressInUse as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
