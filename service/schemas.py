"""Request and response bodies; FastAPI turns these into the OpenAPI schema at /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "minilm-lora-r8", "inputs": ["Stocks rally."]}]}
    )

    model: str = Field(min_length=1, description="variant name, see GET /v1/models")
    inputs: str | list[str] = Field(description="one text or a list of texts")
    top_k: int | None = Field(None, ge=1, strict=True, description="labels per input, best first (default: all)")


class LabelScore(BaseModel):
    label: str
    score: float


class Usage(BaseModel):
    tokens: int = Field(description="tokens after truncation, summed over inputs")


class Timing(BaseModel):
    queue_ms: float = Field(description="time the request's rows waited for a batch")
    compute_ms: float = Field(description="forward time of the batch(es) that served it")


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[list[LabelScore]]
    usage: Usage
    timing: Timing


class HFParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send more generic parameters than we use

    top_k: int | None = Field(None, ge=1, strict=True)
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class HFRequest(BaseModel):
    """Hugging Face text-classification payload, as sent by huggingface_hub.InferenceClient."""

    inputs: str | list[str]
    parameters: HFParameters = Field(default_factory=HFParameters)


# ---- KServe V2 / Open Inference Protocol -----------------------------------------------------
class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


# ---- admin -----------------------------------------------------------------------------------
class ModelInfo(BaseModel):
    name: str
    kind: str | None
    base: str | None = Field(description="base model id and fingerprint prefix")
    labels: list[str]
    loaded: bool = Field(description="servable by name now (an LRU-evicted adapter reloads on its next request)")
    resident: bool = Field(description="weights in memory now")
    bytes: int | None
    last_used: float | None = Field(description="unix time of the last request, None if never")
    request_count: int
    precision: str | None = Field(
        None, description="what it computes in while loaded (auto on a CPU with native bf16: measured per model)"
    )
    error: str | None = Field(None, description="why it is not loaded, when it was refused")


class PrecisionInfo(BaseModel):
    precision: str = Field(description="compute precision of torch variants: fp32, bf16 or fp16")
    requested: str = Field(description="what --precision asked for (auto or a precision)")
    reason: str = Field(description="why this precision (auto: what the hardware probe found)")
    per_model: dict[str, dict[str, Any]] | None = Field(
        None,
        description="auto on a CPU with native bf16: per architecture, bf16 vs fp32 forward times at load "
        "and the faster precision its variants compute in",
    )


class GraphsInfo(BaseModel):
    mode: str = Field(description="capture: CUDA graphs per (rows x length) bucket; off: eager launches")
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per model (__lora__: the adapter bank): buckets captured, replays"
    )


class ModelList(BaseModel):
    data: list[ModelInfo]
    precision: PrecisionInfo | None = None
    cuda_graphs: GraphsInfo | None = None


class AdapterOp(BaseModel):
    name: str
    status: Literal["loaded", "replaced", "unloaded"]
    kind: str | None = None
    load_ms: float | None = None


class Health(BaseModel):
    status: str
    loaded: list[str] = Field(default_factory=list)
