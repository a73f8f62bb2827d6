"""POST /v1/classify and the Hugging Face text-classification route POST /models/{name}."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from service.client import EngineClient, Result
from service.errors import BadRequest, PayloadTooLarge, error_response
from service.routes import fast_json
from service.schemas import ClassifyRequest, ClassifyResponse, HFRequest, LabelScore

router = APIRouter(tags=["inference"])


async def resolve(request: Request, name: str) -> dict[str, Any]:
    """The loaded variant called `name` (labels, kind, tokenizer key), or a 404 that says how to load it."""
    engine: EngineClient = request.app.state.engine
    entry = await engine.entry(name)
    request.state.variant = name
    return entry


def check_inputs(request: Request, inputs: str | list[str]) -> list[str]:
    cfg = request.app.state.config
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise BadRequest("inputs is an empty list; send at least one text")
    if len(texts) > cfg.max_inputs:
        raise PayloadTooLarge(f"{len(texts)} inputs in one request; the limit is {cfg.max_inputs} — split the request")
    for i, t in enumerate(texts):
        if len(t) > cfg.max_input_chars:
            raise BadRequest(f"inputs[{i}] has {len(t)} characters; the limit is {cfg.max_input_chars} — shorten it")
        if not t.isascii():
            try:
                t.encode()
            except UnicodeEncodeError:  # a lone surrogate escape (\ud800): JSON allows it, UTF-8 cannot hold it
                raise BadRequest(
                    f"inputs[{i}] holds a lone surrogate (e.g. \\ud800); send valid Unicode text"
                ) from None
    return texts


async def run_job(request: Request, name: str, entry: dict[str, Any], texts: list[str]) -> Result:
    """Tokenise here, send token ids to the engine, await its logits; 504 past --request-timeout-s."""
    engine: EngineClient = request.app.state.engine
    return await engine.infer(name, entry, texts, request.app.state.config.request_timeout_s)


def scores(logits: np.ndarray, fn: str = "softmax") -> np.ndarray:
    """Class scores (float64) for rows of logits (softmax unless the HF client asks otherwise)."""
    x = logits.astype(np.float64)
    if fn == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if fn == "none":
        return x
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_labels(labels: list[str], probs: np.ndarray, top_k: int | None) -> list[list[dict[str, Any]]]:
    """Per row, {label, score} best first (top_k of them)."""
    order = np.argsort(-probs, axis=-1, kind="stable")[:, : top_k or probs.shape[-1]]
    values = probs.tolist()
    return [
        [{"label": labels[i], "score": row[i]} for i in idx] for row, idx in zip(values, order.tolist(), strict=True)
    ]


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request) -> Response:
    """Classify one or more texts with the named variant."""
    entry = await resolve(request, body.model)
    texts = check_inputs(request, body.inputs)
    res = await run_job(request, body.model, entry, texts)
    return fast_json(
        {
            "model": body.model,
            "predictions": top_labels(res.labels or entry["labels"], scores(res.logits), body.top_k),
            "usage": {"tokens": res.tokens},
            "timing": {"queue_ms": round(res.queue_ms, 3), "compute_ms": round(res.compute_ms, 3)},
        }
    )


async def classify_fast(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/classify as a plain ASGI app: the same handler, validation and errors as the route.

    Why: profiling the front-end at c=32 showed FastAPI's per-request machinery (exception and
    exit-stack middlewares, routing, dependency solving) at over half of its CPU; the hot route
    skips it. The FastAPI route above still documents it in the OpenAPI schema.
    """
    request = Request(scope, receive)
    try:
        try:
            body = ClassifyRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        response = await classify(body, request)
    except ClientDisconnect:  # the client left while its body arrived: nobody to answer, not a server error
        return
    except Exception as exc:  # noqa: BLE001 - every error becomes the service's JSON error shape
        response = error_response(exc)
    await response(scope, receive, send)


@router.post("/models/{name}", response_model=list[list[LabelScore]])
async def hf_text_classification(name: str, body: HFRequest, request: Request) -> Response:
    """Hugging Face Inference API text-classification shape: one list of {label, score} per input."""
    entry = await resolve(request, name)
    texts = check_inputs(request, body.inputs)
    res = await run_job(request, name, entry, texts)
    fn = body.parameters.function_to_apply or "softmax"
    return fast_json(top_labels(res.labels or entry["labels"], scores(res.logits, fn), body.parameters.top_k))
