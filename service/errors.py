"""Every error leaves the server as JSON {"error": {"type", "message"}}; the message says what to do.

Where a protocol's clients read `error` as the message string, its routes answer {"error": message,
"error_type": type} instead: the Hugging Face route (/models/NAME: huggingface_hub showed the object's repr, and
< 0.28 raised AttributeError) and KServe V2 (/v2, the Open Inference Protocol's shape: tritonclient's `str(exc)`
raised TypeError, and its C++ client said only "inference failed with unknown error")."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from models.manifest import check_name

log = logging.getLogger("service")


class ServiceError(Exception):
    """An error with its HTTP status, a short machine-readable type and a human message."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, type = 422, "invalid_request"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


def not_loaded(name: str, loaded: Iterable[str]) -> ModelNotFound:
    """404 for a request naming a variant that is not served: what is, and how to load it (a name no
    variant can have gets the naming rule instead: PUT would refuse it)."""
    try:
        check_name(name)
        advice = f"load it with PUT /v1/adapters/{name}"
    except ValueError as e:
        advice = str(e)
    return ModelNotFound(f"model {name!r} is not loaded; loaded: {', '.join(sorted(loaded)) or 'none'}; {advice}")


class Refused(ServiceError):
    """A variant failed verification (hashes, base fingerprint, labels, golden logits)."""

    status, type = 409, "variant_refused"


class QueueFull(ServiceError):
    status, type = 429, "queue_full"


class Timeout(ServiceError):
    status, type = 504, "timeout"


class Unavailable(ServiceError):
    status, type = 503, "unavailable"


HF_ROUTE_PREFIX = "/models/"  # POST /models/{name}, the Hugging Face text-classification route


def route_path(scope: Scope) -> str:
    """The request's path below the app's mount point (Ray Serve's route_prefix arrives as root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def message_as_string(path: str) -> bool:
    """Whether a route's clients read `error` as the message string (module docstring)."""
    return path.startswith(HF_ROUTE_PREFIX) or path == "/v2" or path.startswith("/v2/")


def error_body(type_: str, message: str, path: str = "") -> dict:
    """The error body for a request to `path` (module docstring)."""
    if message_as_string(path):
        return {"error": message, "error_type": type_}
    return {"error": {"type": type_, "message": message}}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON ({err.get('msg')}); send a JSON object"
        if loc == "body" and err.get("type") == "model_attributes_type":  # FastAPI did not read it as JSON
            return "request body is not a JSON object; send one with 'Content-Type: application/json'"
        parts.append(f"{loc}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts) + "; see /openapi.json (or /docs) for the request schema"


def error_response(exc: Exception, path: str = "") -> JSONResponse:
    """The response for a ServiceError, a request validation error, or (as a 500) anything else, to a
    request for `path` (which picks the body's shape, see error_body)."""
    if isinstance(exc, ServiceError):
        return JSONResponse(error_body(exc.type, exc.message, path), status_code=exc.status, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        return JSONResponse(error_body("invalid_request", _validation_message(exc), path), status_code=422)
    log.exception("unexpected error", exc_info=exc)
    return JSONResponse(
        error_body("internal_error", f"{type(exc).__name__}: {exc}; this is a server bug, please report it", path),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's default error bodies with the service's shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, route_path(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(exc, route_path(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ServiceError):  # e.g. the body limit tripped while FastAPI read the body
            return await _service_error(request, exc.__cause__)
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the JSON body
            cause = exc.__cause__
            return error_response(
                BadRequest(
                    f"request body could not be read as JSON ({type(cause).__name__}: {str(cause)[:200]}); "
                    "send uncompressed UTF-8 JSON with 'Content-Type: application/json'"
                ),
                route_path(request.scope),
            )
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see /openapi.json (or /docs) for the API"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}; see /openapi.json (or /docs) for the API"
        else:
            msg = str(exc.detail)
        return JSONResponse(
            error_body("http_error", msg, route_path(request.scope)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, route_path(request.scope))
