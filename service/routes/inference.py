"""POST /v1/classify and the Hugging Face text-classification route POST /models/{name}."""

from __future__ import annotations

import asyncio
import math

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.batcher import Batcher, Job
from service.errors import BadRequest, ModelNotFound, PayloadTooLarge, Timeout
from service.runtime import Entry
from service.schemas import ClassifyRequest, ClassifyResponse, HFRequest, LabelScore

router = APIRouter(tags=["inference"])


def resolve(request: Request, name: str) -> Entry:
    """The loaded variant called `name`, or a 404 that lists what is loaded and how to load more."""
    entry = request.app.state.runtime.entries.get(name)
    if entry is None:
        loaded = ", ".join(sorted(request.app.state.runtime.entries)) or "none"
        raise ModelNotFound(f"model '{name}' is not loaded; loaded: {loaded}; load it with PUT /v1/adapters/{name}")
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
    return texts


async def run_job(request: Request, entry: Entry, texts: list[str]) -> Job:
    """Tokenise, enqueue, await the batcher; 504 past --request-timeout-s."""
    # Tokenising here (in the threadpool) keeps the batcher thread busy with forwards only and
    # gives the queue exact token counts for the budget; the fast tokenizer releases the GIL.
    enc = await run_in_threadpool(entry.encode, texts)
    loop = asyncio.get_running_loop()
    job = Job(entry.name, texts, enc, entry.tokenizer, loop, loop.create_future())
    batcher: Batcher = request.app.state.batcher
    batcher.submit(job)
    timeout_s = request.app.state.config.request_timeout_s
    try:
        return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
    except asyncio.TimeoutError:
        job.cancelled = True
        raise Timeout(
            f"no result within {timeout_s:g}s (queue depth {batcher.queue_depth()}); retry later or raise --request-timeout-s"
        ) from None


def scores(logits: list[float], fn: str = "softmax") -> list[float]:
    """Class scores from one row of logits (softmax unless the HF client asks otherwise)."""
    if fn == "sigmoid":
        return [1 / (1 + math.exp(-x)) for x in logits]
    if fn == "none":
        return list(logits)
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def top_labels(labels: list[str], probs: list[float], top_k: int | None) -> list[LabelScore]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[: top_k or len(probs)]
    return [LabelScore(label=labels[i], score=probs[i]) for i in order]


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Classify one or more texts with the named variant."""
    entry = resolve(request, body.model)
    texts = check_inputs(request, body.inputs)
    job = await run_job(request, entry, texts)
    labels = entry.manifest.labels
    return ClassifyResponse(
        model=entry.name,
        predictions=[top_labels(labels, scores(row), body.top_k) for row in job.logits],
        usage={"tokens": job.tokens},
        timing={"queue_ms": round(job.queue_ms, 3), "compute_ms": round(job.compute_ms, 3)},
    )


@router.post("/models/{name}", response_model=list[list[LabelScore]])
async def hf_text_classification(name: str, body: HFRequest, request: Request) -> list[list[LabelScore]]:
    """Hugging Face Inference API text-classification shape: one list of {label, score} per input."""
    entry = resolve(request, name)
    texts = check_inputs(request, body.inputs)
    job = await run_job(request, entry, texts)
    fn = body.parameters.function_to_apply or "softmax"
    return [top_labels(entry.manifest.labels, scores(row, fn), body.parameters.top_k) for row in job.logits]
