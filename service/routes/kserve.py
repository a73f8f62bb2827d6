"""KServe V2 / Open Inference Protocol: health, model metadata and infer with a BYTES text input.

tritonclient sends inputs in the binary-tensor extension by default (a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensors), so the body is parsed here
rather than by FastAPI; the pydantic models still document the JSON form in the OpenAPI schema.
Outputs go back the same way when the request asks for them as binary data (tritonclient does by default).
"""

from __future__ import annotations

import json
import struct

import orjson
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


def _binary_wanted(req: V2InferRequest) -> dict[str, bool]:
    """Per output name, whether the client asked for it as binary data: the output's `binary_data`, else the
    request's `binary_data_output` (what tritonclient sends when it names no outputs), else JSON."""
    default = (req.parameters or {}).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise BadRequest(f"parameters.binary_data_output must be true or false, not {default!r}")
    wanted = {"label": default, "probabilities": default}
    for o in req.outputs or []:
        flag = (o.parameters or {}).get("binary_data", default)
        if not isinstance(flag, bool):
            raise BadRequest(f"output {o.name!r}: binary_data must be true or false, not {flag!r}")
        wanted[o.name] = flag
    return wanted


def _binary_response(header: dict, raw: dict[str, bytes]) -> Response:
    """The binary tensor data extension's response: the JSON header (each binary output's `data` replaced by its
    `binary_data_size`), then those outputs' bytes in the header's order; Inference-Header-Content-Length
    gives the header's length. The C++ client (perf_analyzer) reads outputs only from these bytes."""
    chunks = []
    for out in header["outputs"]:
        if out["name"] in raw:
            del out["data"]
            out["parameters"] = {"binary_data_size": len(raw[out["name"]])}
            chunks.append(raw[out["name"]])
    head = orjson.dumps(header)
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


@router.post("/models/{name}/infer", response_model=V2InferResponse, response_model_exclude_none=True)
async def infer(name: str, request: Request) -> V2InferResponse | Response:
    """Texts in a BYTES input -> `label` (BYTES) and `probabilities` (FP32, [n, labels]) outputs, each as JSON
    data or, where the request asks (`binary_data`, `binary_data_output`), as binary data after the JSON."""
    entry = await resolve(request, name)
    req, texts = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
    binary = _binary_wanted(req)
    texts = check_inputs(request, texts)
    res = await run_job(request, name, entry, texts)
    labels = res.labels or entry["labels"]
    probs = scores(res.logits)
    best = [labels[i] for i in probs.argmax(axis=-1).tolist()]
    outputs = [
        V2Tensor(name="label", datatype="BYTES", shape=[len(texts)], data=best),
        V2Tensor(name="probabilities", datatype="FP32", shape=[len(texts), len(labels)], data=probs.ravel().tolist()),
    ]
    if req.outputs:  # only what was asked for
        wanted = {o.name for o in req.outputs}
        unknown = wanted - {o.name for o in outputs}
        if unknown:
            raise BadRequest(f"unknown outputs {sorted(unknown)}; this model has 'label' and 'probabilities'")
        outputs = [o for o in outputs if o.name in wanted]
    response = V2InferResponse(model_name=name, id=req.id, outputs=outputs)
    raw = {
        "label": lambda: b"".join(struct.pack("<I", len(b)) + b for b in (x.encode() for x in best)),
        "probabilities": lambda: probs.astype("<f4").tobytes(),
    }
    as_binary = {o.name: raw[o.name]() for o in outputs if binary[o.name]}
    if not as_binary:
        return response
    return _binary_response(response.model_dump(exclude_none=True), as_binary)
