"""The naive comparison point: FastAPI + transformers.pipeline("text-classification").

What a user would write without the service: fp32, one request per forward pass, no
batching, no queue, sync endpoint handlers on FastAPI's thread pool. It answers the same
`POST /v1/classify` request/response shape as the service (timing carries compute_ms only,
queue_ms is None) so `benchmarks load` runs against both unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ClassifyRequest(BaseModel):
    model: str
    inputs: str | list[str]
    top_k: int | None = None


def load_pipeline(model: str, store: str | None = None, device: str = "cpu") -> tuple[Any, str, Any]:
    """(pipeline, served name, tokenizer) for a model directory or a store variant name.

    A LoRA variant is loaded onto its base and merged (`merge_and_unload`), which is what a
    user feeding a plain transformers pipeline would have to do.
    """
    import torch
    from transformers import pipeline

    path = Path(model)
    if store is not None and not path.exists():
        from models import Store
        from models.variant import load_variant
        from models.writing import label_config

        st = Store(store)
        m = st.manifest(model)
        if m.kind not in ("full", "merged", "lora"):
            raise SystemExit(f"baseline serves torch variants (full, merged, lora), not {m.kind} '{model}'")
        v = load_variant(st, model)
        net, tok = (v.model.merge_and_unload() if m.kind == "lora" else v.model), v.tokenizer
        label_config(net, m.labels)
        name = model
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not path.exists():
            raise SystemExit(f"--model {model}: no such directory (pass --store DIR to serve a store variant)")
        net = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
        name = path.name
    net = net.float().eval()
    pipe = pipeline("text-classification", model=net, tokenizer=tok, device=torch.device(device), top_k=None)
    return pipe, name, tok


def create_app(pipe: Any, name: str, tokenizer: Any, max_length: int = 128) -> FastAPI:
    """The baseline HTTP app serving one model as `name`."""
    app = FastAPI(title="naive transformers.pipeline baseline")

    def error(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)

    @app.get("/healthz")
    @app.get("/readyz")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"models": [{"name": name, "kind": "baseline"}]}

    @app.post("/v1/classify", response_model=None)
    def classify(req: ClassifyRequest) -> dict[str, Any] | JSONResponse:
        # sync handler: FastAPI runs it on its thread pool, one pipeline call per request
        if req.model != name:
            return error(404, "model_not_found", f"unknown model '{req.model}'; this baseline serves only '{name}'")
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        t0 = time.perf_counter()
        out = pipe(texts, truncation=True, max_length=max_length)
        compute_ms = (time.perf_counter() - t0) * 1000
        k = req.top_k or None
        preds = [[{"label": d["label"], "score": float(d["score"])} for d in row][:k] for row in out]
        tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])
        return {
            "model": name,
            "predictions": preds,
            "usage": {"tokens": tokens},
            "timing": {"queue_ms": None, "compute_ms": compute_ms},
        }

    @app.post("/models/{model}", response_model=None)
    def hf_classify(model: str, body: dict[str, Any]) -> Any:
        if model != name:
            return error(404, "model_not_found", f"unknown model '{model}'; this baseline serves only '{name}'")
        inputs = body.get("inputs")
        single = isinstance(inputs, str)
        out = pipe([inputs] if single else inputs, truncation=True, max_length=max_length)
        return out[0] if single else out

    return app


def serve(
    model: str, port: int, host: str = "127.0.0.1", store: str | None = None, max_length: int = 128, device: str = "cpu"
) -> None:
    """Load the model and serve it with uvicorn until interrupted."""
    import uvicorn

    pipe, name, tok = load_pipeline(model, store, device)
    if store is not None:
        from models import Store

        max_length = Store(store).manifest(name).max_length
    print(f"[baseline] serving '{name}' on http://{host}:{port} ({device}, fp32, one request per forward)", flush=True)
    uvicorn.run(create_app(pipe, name, tok, max_length), host=host, port=port, log_level="warning")
