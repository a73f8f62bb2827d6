"""`python -m training eval VARIANT`: accuracy of any stored variant (full, merged, lora, onnx, onnx-int8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from models import Store
from models.loading import attach_adapter, compute_logits, load_base, load_full, load_tokenizer, onnx_session
from training.config import TrainConfig
from training.data import DataError, clean, load_raw
from training.metrics import classification_metrics


def load_variant(store: Store, name: str) -> tuple[Any, Any, Any]:
    """(model or ONNX session, tokenizer, manifest) for any kind, through models.loading."""
    manifest = store.verify(name)
    path = store.path(name)
    if manifest.kind in ("full", "merged"):
        model, tok = load_full(path)
    elif manifest.kind == "lora":
        base, tok, _ = load_base(store, manifest)
        model = attach_adapter(base, path, "default")
    else:
        model, tok = onnx_session(path), load_tokenizer(path)
    return model, tok, manifest


def training_config(provenance: dict[str, Any]) -> dict[str, Any]:
    """The training config recorded in a variant's provenance (exports nest their source's)."""
    while provenance:
        if "config" in provenance:
            return provenance["config"]
        provenance = provenance.get("source_provenance") or {}
    return {}


def evaluate_variant(store: Store, name: str, data: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Metrics of variant `name` on the test split of `data` (default: the data it was trained on)."""
    model, tok, manifest = load_variant(store, name)
    cfg_dict = training_config(manifest.provenance)
    cfg = TrainConfig(
        data=data or cfg_dict.get("data", "fancyzhx/ag_news"),
        text_column=cfg_dict.get("text_column", "text"),
        label_column=cfg_dict.get("label_column", "label"),
        labels=list(manifest.labels),
    )
    raw = load_raw(cfg)
    split = "test" if "test" in raw else "train"
    df, problems = clean(raw[split], cfg, split)
    if problems:
        raise DataError(problems)
    if limit:
        df = df.head(limit)
    texts = df["text"].tolist()
    # Sort by length so each batch pads little; restore order afterwards.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    t0 = time.perf_counter()
    logits = compute_logits(model, tok, [texts[i] for i in order], manifest.max_length).numpy()
    elapsed_s = time.perf_counter() - t0
    preds = np.empty(len(texts), dtype=np.int64)
    preds[order] = logits.argmax(-1)
    out = classification_metrics(df["label"].tolist(), preds, manifest.labels)
    return {
        "variant": name,
        "kind": manifest.kind,
        "data": str(Path(cfg.data)),
        "split": split,
        "eval_time_s": elapsed_s,
        "samples_per_s": len(texts) / elapsed_s,
        **out,
    }
