"""Helpers for the service tests: extra store variants (merged, ONNX, corrupt, foreign base) and a
real service on a free loopback port: the uvicorn front-end in a thread of the test process, its
engine in a process of its own (started and supervised by the app)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from tiny import GOLDEN_TEXTS, LABELS, MAX_LENGTH, tiny_classifier, tiny_lora, tokenizer

from benchmarks.common import free_port
from models import Manifest, Store
from models.loading import fingerprint, save_base_snapshot
from models.writing import write_variant
from service.app import create_app
from service.config import ServiceConfig


def _common(arch: str, fp: str) -> dict:
    return dict(
        tokenizer=tokenizer(),
        labels=LABELS,
        max_length=MAX_LENGTH,
        base_model=f"tiny-{arch}",
        base_fingerprint=fp,
        init="random",
        golden_texts=GOLDEN_TEXTS,
    )


def write_lora(
    store: Store,
    name: str,
    *,
    arch: str = "bert",
    seed: int = 100,
    base_seed: int = 0,
    max_length: int = MAX_LENGTH,
    r: int | None = None,
) -> Manifest:
    """A LoRA variant over tiny_classifier(arch, base_seed); base_seed != 0 gives a foreign base."""
    base = tiny_classifier(arch, seed=base_seed)
    fp = fingerprint(base)
    if base_seed != 0:
        save_base_snapshot(store, base, tokenizer(), base_model=f"tiny-{arch}", init="random")
    common = {**_common(arch, fp), "max_length": max_length}
    model = tiny_lora(base, seed=seed) if r is None else tiny_lora(base, seed=seed, r=r)
    return write_variant(store, name=name, kind="lora", model=model, overwrite=True, **common)


def write_merged(store: Store, name: str, *, source: str, arch: str = "bert", seed: int = 100) -> Manifest:
    base = tiny_classifier(arch, seed=0)
    merged = tiny_lora(base, seed=seed).merge_and_unload()
    return write_variant(
        store, name=name, kind="merged", model=merged, source=source, **_common(arch, fingerprint(base))
    )


def write_onnx(store: Store, name: str, *, source: str) -> Manifest:
    """Export the torch variant `source` to ONNX with optimum and register it like training's export."""
    from optimum.onnxruntime import ORTModelForSequenceClassification

    from models import Golden
    from models.loading import compute_logits, onnx_session

    src = store.manifest(source)
    with store.writing(name, overwrite=True) as tmp:
        ORTModelForSequenceClassification.from_pretrained(str(store.path(source)), export=True).save_pretrained(
            str(tmp)
        )
        tokenizer().save_pretrained(str(tmp))
        logits = compute_logits(onnx_session(tmp), tokenizer(), GOLDEN_TEXTS, MAX_LENGTH)
        data = src.model_dump()
        data.update(
            name=name,
            kind="onnx",
            source=source,
            files={},
            created_at="",
            golden=Golden(texts=GOLDEN_TEXTS, logits=logits.tolist()).model_dump(),
        )
        store.commit(tmp, Manifest.model_validate(data))
    return store.manifest(name)


def corrupt(store: Store, name: str) -> None:
    """Flip bytes in the variant's weights so its sha256 no longer matches the manifest."""
    path = next(p for p in sorted(store.path(name).iterdir()) if p.suffix in (".safetensors", ".onnx"))
    raw = bytearray(path.read_bytes())
    raw[-10:] = bytes(b ^ 0xFF for b in raw[-10:])
    path.write_bytes(bytes(raw))


def tamper_golden(store: Store, name: str) -> None:
    """Shift the manifest's golden logits: hashes still pass, the golden-set check must not."""
    path = store.path(name) / "manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["logits"] = [[x + 1.0 for x in row] for row in data["golden"]["logits"]]
    path.write_text(json.dumps(data))


def golden_probs(store: Store, name: str) -> list[list[float]]:
    """Softmax of the golden logits: what the variant alone produced at write time, in fp32."""
    return torch.softmax(torch.tensor(store.manifest(name).golden.logits), -1).tolist()


def assert_no_torn_answers(
    store: Store, results, version_a, version_b, swapped: str = "lora-0", tol: float = 1e-4
) -> None:
    """Every answer of a hot-swap run is exactly right: `swapped`'s are version A or B (never a mix of the
    two, and each version seen at least once), every other variant's its golden probabilities."""
    seen = {"A": 0, "B": 0}
    for name, _, probs in results:
        if name == swapped:
            if np.allclose(probs, version_a, atol=tol):
                seen["A"] += 1
            else:
                np.testing.assert_allclose(probs, version_b, atol=tol)
                seen["B"] += 1
        else:
            np.testing.assert_allclose(probs, golden_probs(store, name), atol=tol)
    assert seen["A"] > 0 and seen["B"] > 0, seen


class Server:
    """A real uvicorn server on 127.0.0.1:<free port> running create_app(cfg) in a thread."""

    def __init__(self, store: Path, **overrides):
        self.port = free_port()
        # fp32 unless a test asks otherwise: answers are compared with fp32 golden logits at 1e-4
        self.cfg = ServiceConfig(store=store, port=self.port, threads=1, **{"precision": "fp32", **overrides})
        self.app = create_app(self.cfg)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.admin = httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def start(self, timeout_s: float = 60) -> Server:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/readyz").status_code == 200:
                    return self
            if self.app.state.supervisor and self.app.state.supervisor.failed:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server on {self.url} not ready after {timeout_s}s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.client.close()
        self.admin.close()

    def classify(self, model: str, inputs, **extra) -> httpx.Response:
        return self.client.post("/v1/classify", json={"model": model, "inputs": inputs, **extra})

    def probs(self, model: str, texts: list[str]) -> list[list[float]]:
        """Scores in label order (the API returns them best first)."""
        r = self.classify(model, texts)
        assert r.status_code == 200, r.text
        labels = LABELS
        return [
            [next(x["score"] for x in pred if x["label"] == lab) for lab in labels] for pred in r.json()["predictions"]
        ]


@contextlib.contextmanager
def running(store: Path, **overrides) -> Iterator[Server]:
    srv = Server(store, **overrides).start()
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Any ASGI app (the naive baseline, a test stub) on a free loopback port, once /healthz answers 200."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
