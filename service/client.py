"""The front-end's side of the engine: one Unix socket connection (service/transport.py), a dict of
request id -> future.

Replies resolve futures as they arrive on the event loop, so no handler ever blocks on the engine and
the engine never waits on a front-end (vLLM's AsyncMPClient has this shape). The connection closes the
moment the engine's process dies: every pending request then fails with 503 + Retry-After and new ones
are refused until the supervisor's restarted engine accepts the connection again.

The front-end tokenises with the engine's own tokenizers (fetched once per content hash) and keeps
a cached copy of the engine's state (variants, labels, tokenizer keys); every reply carries the
engine's state version, and a stale cache is refreshed in the background (or at once on a miss).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from tokenizers import Tokenizer

from service.errors import ServiceError, Timeout, Unavailable, not_loaded
from service.metrics import FrontendMetrics
from service.protocol import error_from, pack, unpack
from service.transport import FrameReader, frame, socket_path

log = logging.getLogger("service.client")
ADMIN_TIMEOUT_S = 600.0  # loading a large variant can take minutes; the engine always answers
STATE_TIMEOUT_S = 5.0
INLINE_TOKENIZE_CHARS = 2_000  # shorter inputs are tokenised on the event loop (a thread hop costs more)
RECONNECT_S = (0.05, 0.5)  # first and longest wait between tries to reach a (re)starting engine


def engine_down() -> Unavailable:
    return Unavailable(
        "the engine process is not running (it is being restarted); retry in a moment", headers={"Retry-After": "1"}
    )


@dataclass
class Result:
    """An answered inference request: fp32 logits (rows x labels) and the engine's timing."""

    logits: np.ndarray
    queue_ms: float
    compute_ms: float
    tokens: int
    labels: list[str] | None = None  # the label names of the version that answered (None: the cached entry's)


def _log_refresh_failure(task: asyncio.Task) -> None:
    """A background refresh that failed: the next reply (or a cache miss) tries again."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("refreshing the engine's state failed: %s", task.exception())


class _Link(asyncio.Protocol):
    """One connection to the engine: each whole message goes to `on_message`; `lost` resolves when it closes."""

    def __init__(self, on_message: Any):
        self.on_message = on_message
        self.reader = FrameReader()
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.heard = False  # a message came: a live engine answered on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except ValueError:
            log.error("the engine sent a message this front-end cannot read; reconnecting")
            self.transport.close()
            return
        for raw in messages:
            self.heard = True
            self.on_message(unpack(raw))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class EngineClient:
    def __init__(self, address: str, metrics: FrontendMetrics):
        self.address, self.metrics = address, metrics
        self.state: dict[str, Any] = {}
        self._version: tuple[str, int] | None = None  # (engine id, state version) of `state`
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tasks: list[asyncio.Task] = []
        self._refresh: asyncio.Task | None = None
        self._link: _Link | None = None

    @property
    def connected(self) -> bool:
        return self._link is not None

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_connected())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._link is not None:
            self._link.transport.close()
        self._fail_pending(engine_down())

    # ---- the connection ------------------------------------------------------------------------
    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        path = socket_path(self.address)
        wait_s = RECONNECT_S[0]
        while True:
            try:
                _, link = await loop.create_unix_connection(lambda: _Link(self._on_message), path)
            except OSError:  # not listening (yet, or again): the engine is starting or restarting
                await asyncio.sleep(wait_s)
                wait_s = min(2 * wait_s, RECONNECT_S[1])
                continue
            wait_s = RECONNECT_S[0]
            self._link = link
            self.metrics.engine_up.set(1)
            self._schedule_refresh()
            await link.lost
            self._link = None
            self.metrics.engine_up.set(0)
            if link.heard:
                log.error("lost the engine process; failing %d pending requests with 503", len(self._pending))
                self.metrics.engine_disconnects.inc()
            else:  # a killed engine's listening socket can take a connection while its process is torn down:
                # that is the same loss again, not a second one (it counted two disconnects for one kill)
                log.info("the engine's socket closed before it answered (an engine that was exiting); retrying")
            self._version = None
            self._fail_pending(engine_down())

    def _on_message(self, msg: dict[str, Any]) -> None:
        fut = self._pending.pop(msg.get("id"), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        # every reply carries the engine's state version; another one (or none cached yet: a refresh failed)
        # refreshes the cache, one refresh at a time
        if (msg.get("e"), msg.get("v")) != self._version:
            self._schedule_refresh()

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    def _schedule_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self.refresh())
            self._refresh.add_done_callback(_log_refresh_failure)

    # ---- requests ------------------------------------------------------------------------------
    async def call(self, op: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        """Send one request and await its reply; engine errors are raised as the same HTTP error."""
        link = self._link
        if link is None:
            raise engine_down()
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        link.transport.write(frame(pack({"id": req_id, "op": op, **fields})))
        try:
            reply = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise Timeout(f"no result within {timeout_s:g}s; retry later or raise --request-timeout-s") from None
        finally:  # answered, timed out or cancelled: an engine that drops the job at its deadline never replies
            self._pending.pop(req_id, None)
        if "error" in reply:
            raise error_from(reply["error"])
        return reply

    async def refresh(self) -> dict[str, Any]:
        """Fetch the engine's state, and the tokenizers of variants new to this front-end."""
        reply = await self.call("state", STATE_TIMEOUT_S)
        for key in {e["tok"] for e in reply["entries"].values()} - self._tokenizers.keys():
            # its variant may be unloaded or replaced meanwhile (by another front-end): not this refresh's
            # failure (a request for any other variant would get that 404); `tokenize` fetches on first use
            try:
                await self._fetch_tokenizer(key, STATE_TIMEOUT_S)
            except ServiceError as e:  # the engine's 404 arrives as a ServiceError (protocol.error_from)
                if e.status != 404:
                    raise
        self.state, self._version = reply, (reply["e"], reply["v"])
        return reply

    async def _fetch_tokenizer(self, key: str, timeout_s: float) -> Tokenizer:
        reply = await self.call("tokenizer", timeout_s, key=key)
        tok = Tokenizer.from_str(reply["json"])
        # the side too: a tokenizer_config.json with truncation_side "left" keeps a long text's end, as training,
        # eval and the engine's own tokenizer do (enable_truncation's default cuts the end off)
        tok.enable_truncation(reply["max_length"], direction=reply.get("direction", "right"))
        tok.no_padding()
        self._tokenizers[key] = tok
        return tok

    async def entry(self, name: str) -> dict[str, Any]:
        """The servable variant `name` (from the cached state; refreshed once on a miss), else 404."""
        entries = self.state.get("entries", {})
        if name not in entries and self.connected:
            entries = (await self.refresh())["entries"]
        if name not in entries:
            if not self.connected:
                raise engine_down()
            if not self.state.get("ready"):  # a (re)started engine still loading its variants
                raise Unavailable("the engine is still loading models; retry shortly", headers={"Retry-After": "1"})
            raise not_loaded(name, entries)
        return entries[name]

    async def tokenize(self, tok_key: str, texts: list[str], timeout_s: float) -> list[list[int]]:
        tok = self._tokenizers.get(tok_key) or await self._fetch_tokenizer(tok_key, timeout_s)
        # encode_batch_fast: the same ids without character offsets (nobody here reads them); py-spy of a
        # front-end at ~1,100 req/s (2-layer model) had tokenising at 32 % of its CPU; AG News texts:
        # 120 vs 132 us a text on this project's 2-core Xeon
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            encs = tok.encode_batch_fast(texts)
        else:  # long inputs: off the event loop (the Rust tokenizer releases the GIL)
            encs = await run_in_threadpool(tok.encode_batch_fast, texts)
        return [e.ids for e in encs]

    async def infer(self, name: str, entry: dict[str, Any], texts: list[str], timeout_s: float) -> Result:
        rows = await self.tokenize(entry["tok"], texts, timeout_s)
        reply = await self.call(
            "infer",
            timeout_s,
            variant=name,
            rows=rows,
            texts=texts,
            tok=entry["tok"],
            deadline_s=time.time() + timeout_s,
        )
        logits = np.frombuffer(reply["logits"], dtype=np.float32).reshape(len(texts), reply["labels"])
        return Result(logits, reply["queue_ms"], reply["compute_ms"], reply["tokens"], reply.get("names"))
