"""Messages between the HTTP front-ends and the engine process: msgpack dicts, length-prefixed on a Unix
socket (service/transport.py).

Front-end -> engine: {"id": int, "op": str, ...fields}. The engine answers
each request once with {"id": int, ...result} or {"id": int, "error": {...}}, plus the engine's
identity "e" and state version "v" so a front-end notices when its cached state is stale.
The engine writes a batch's answers to a front-end together, in one write (see service/engine.py).

    infer    variant, rows (token ids), texts, tok (tokenizer key), deadline_s (unix time)
             -> logits (float32 bytes, rows x labels), labels, queue_ms, compute_ms, tokens
    load     name -> name, status, kind, load_ms           (load or replace; 404/409 as errors)
    unload   name -> name, status
    state    -> ready, startup_error, entries, refused, precision
    tokenizer key -> json (the fast tokenizer, serialised; front-ends tokenise with it)
    metrics  -> text (the engine's Prometheus exposition)
"""

from __future__ import annotations

from typing import Any

import msgpack

from service.errors import ServiceError


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> dict[str, Any]:
    return msgpack.unpackb(raw, raw=False)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """A ServiceError (or any exception, as a 500) as a message field."""
    if isinstance(exc, ServiceError):
        return {"status": exc.status, "type": exc.type, "message": exc.message, "headers": exc.headers}
    return {
        "status": 500,
        "type": "internal_error",
        "message": f"{type(exc).__name__}: {exc}; this is a server bug, please report it",
        "headers": {},
    }


def error_from(fields: dict[str, Any]) -> ServiceError:
    """The ServiceError a front-end raises for an engine's error reply (same status, type, message)."""
    err = ServiceError(fields["message"], status=fields["status"], headers=fields.get("headers") or {})
    err.type = fields["type"]
    return err
