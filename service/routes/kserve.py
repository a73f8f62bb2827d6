"""KServe V2 / Open Inference Protocol: health, model metadata and infer with a BYTES text input.

tritonclient sends inputs in the binary-tensor extension by default (a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensors), so the body is parsed here
rather than by FastAPI; the pydantic models still document the JSON form in the OpenAPI schema.
"""

from __future__ import annotations

import json
import struct

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from service.errors import BadRequest
from service.routes.admin import engine_ready
from service.routes.inference import check_inputs, resolve, run_job, scores
from service.schemas import V2InferRequest, V2InferResponse, V2ModelMetadata, V2Tensor, V2TensorMeta

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
HEADER_LENGTH = "inference-header-content-length"


@router.get("")
async def server_metadata() -> dict:
    return {"name": "agnews-lora-serving", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@router.api_route("/health/live", methods=["GET", "HEAD"])
async def live() -> Response:
    return Response(status_code=200)


@router.api_route("/health/ready", methods=["GET", "HEAD"])
async def ready(request: Request) -> Response:
    await engine_ready(request)
    return Response(status_code=200)


async def resolve_fresh(request: Request, name: str) -> dict:
    """`resolve` against the engine's state now, not this front-end's cache (another front-end may have
    unloaded or replaced `name` since: the cache learns it only from this front-end's next engine reply)."""
    engine = request.app.state.engine
    if engine.connected:
        await engine.refresh()
    return await resolve(request, name)


@router.get("/models/{name}", response_model=V2ModelMetadata)
async def model_metadata(name: str, request: Request) -> V2ModelMetadata:
    entry = await resolve_fresh(request, name)
    return V2ModelMetadata(
        name=name,
        platform=f"agnews_{entry['kind']}",
        inputs=[V2TensorMeta(name="text", datatype="BYTES", shape=[-1])],
        outputs=[
            V2TensorMeta(name="label", datatype="BYTES", shape=[-1]),
            V2TensorMeta(name="probabilities", datatype="FP32", shape=[-1, len(entry["labels"])]),
        ],
    )


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> Response:
    await resolve_fresh(request, name)
    return Response(status_code=200)


def _decode_bytes_tensor(raw: bytes, count: int) -> list[str]:
    """Binary BYTES tensor: each element is a little-endian uint32 length then that many bytes."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise BadRequest("binary BYTES tensor is shorter than its shape says; re-encode the input")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise BadRequest("binary BYTES tensor is shorter than its shape says; re-encode the input")
        try:
            out.append(raw[pos + 4 : pos + 4 + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"binary BYTES element {len(out)} is not UTF-8; send UTF-8 text") from None
        pos += 4 + n
    if pos != len(raw):
        raise BadRequest(f"binary_data_size is {len(raw)} bytes but the shape's elements fill {pos}; fix either")
    return out


def parse_infer(body: bytes, header_length: str | None) -> tuple[V2InferRequest, list[str]]:
    """The request and its texts, from plain JSON or the binary-tensor extension."""
    try:
        split = int(header_length) if header_length else len(body)
        if not 0 <= split <= len(body):
            raise ValueError(f"Inference-Header-Content-Length {split} is outside the body's {len(body)} bytes")
        req = V2InferRequest.model_validate(json.loads(body[:split]))
    except (ValueError, ValidationError, RecursionError) as e:
        raise BadRequest(
            f"invalid V2 infer request: {e}; send {{'inputs': [{{'name', 'shape', 'datatype': 'BYTES', 'data'}}]}}"
        ) from None
    if len(req.inputs) != 1 or req.inputs[0].datatype != "BYTES":
        raise BadRequest("send exactly one input tensor of datatype BYTES holding the texts")
    tensor = req.inputs[0]
    if any(d < 0 for d in tensor.shape):
        raise BadRequest(f"input shape {tensor.shape} has a negative dimension; send the actual sizes")
    count = 1
    for d in tensor.shape:
        count *= d
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
            raise BadRequest(f"binary_data_size must be a non-negative integer, not {binary_size!r}")
        if split + binary_size > len(body):
            raise BadRequest(f"binary_data_size is {binary_size} but {len(body) - split} bytes follow the header")
        texts = _decode_bytes_tensor(body[split : split + binary_size], count)
    elif tensor.data is not None:
        try:
            texts = _flatten(tensor.data)
        except RecursionError:
            raise BadRequest("the input tensor's data is nested too deeply; send a flat list of texts") from None
        if not all(isinstance(x, str) for x in texts):
            raise BadRequest("a BYTES tensor's data must hold only strings; send the texts as JSON strings")
    else:
        raise BadRequest("the input tensor has neither 'data' nor binary_data_size; put the texts in 'data'")
    if len(texts) != count:
        raise BadRequest(f"input shape {tensor.shape} says {count} elements but {len(texts)} were sent")
    return req, texts


def _flatten(data: list) -> list:
    return [y for x in data for y in (_flatten(x) if isinstance(x, list) else [x])]


@router.post("/models/{name}/infer", response_model=V2InferResponse, response_model_exclude_none=True)
async def infer(name: str, request: Request) -> V2InferResponse:
    """Texts in a BYTES input -> `label` (BYTES) and `probabilities` (FP32, [n, labels]) outputs."""
    entry = await resolve(request, name)
    req, texts = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
    texts = check_inputs(request, texts)
    res = await run_job(request, name, entry, texts)
    labels = res.labels or entry["labels"]
    probs = scores(res.logits)
    best = [labels[i] for i in probs.argmax(axis=-1).tolist()]
    outputs = [
        V2Tensor(name="label", datatype="BYTES", shape=[len(texts)], data=best),
        V2Tensor(name="probabilities", datatype="FP32", shape=[len(texts), len(labels)], data=probs.ravel().tolist()),
    ]
    if req.outputs:  # only what was asked for; always as JSON data (clients accept it for binary requests too)
        wanted = {o.name for o in req.outputs}
        unknown = wanted - {o.name for o in outputs}
        if unknown:
            raise BadRequest(f"unknown outputs {sorted(unknown)}; this model has 'label' and 'probabilities'")
        outputs = [o for o in outputs if o.name in wanted]
    return V2InferResponse(model_name=name, id=req.id, outputs=outputs)
