"""`python -m training eval VARIANT`: accuracy of any stored variant (full, merged, lora, onnx, onnx-int8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from models import Store
from models.variant import load_variant
from training.data import MissingSplit, read_split
from training.metrics import classification_metrics


def training_config(provenance: dict[str, Any]) -> dict[str, Any]:
    """The training config recorded in a variant's provenance (exports nest their source's)."""
    while provenance:
        if "config" in provenance:
            return provenance["config"]
        provenance = provenance.get("source_provenance") or {}
    return {}


def evaluate_variant(store: Store, name: str, data: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Metrics of variant `name` on the test split of `data` (default: the data it was trained on)."""
    variant = load_variant(store, name)
    manifest = variant.manifest
    cfg = training_config(manifest.provenance)
    source = data or cfg.get("data", "fancyzhx/ag_news")
    columns = dict(
        text_column=cfg.get("text_column", "text"),
        label_column=cfg.get("label_column", "label"),
        labels=manifest.labels,
    )
    # A single file is whatever split it is asked for (read_split); the one a variant was trained on held its
    # train and validation rows, so without --data the result says it read training rows.
    trained_on_file = data is None and Path(source).is_file()
    try:
        if trained_on_file:
            raise MissingSplit([f"{source} is the one file {name} was trained on"])
        df, split = read_split(source, "test", **columns), "test"
    except MissingSplit:  # a source without a test split: report on train, and say so in the result
        df, split = read_split(source, "train", **columns), "train"
    if limit:
        df = df.head(limit)
    texts = df["text"].tolist()
    t0 = time.perf_counter()
    preds = variant.predict(texts)
    elapsed_s = time.perf_counter() - t0
    out = classification_metrics(df["label"].tolist(), preds, manifest.labels)
    return {
        "variant": name,
        "kind": manifest.kind,
        "data": str(source),
        "split": split,
        "eval_time_s": elapsed_s,
        "samples_per_s": len(texts) / elapsed_s,
        **out,
    }
