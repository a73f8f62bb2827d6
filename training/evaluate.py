"""`python -m training eval VARIANT`: accuracy of any stored variant (full, merged, lora, onnx, onnx-int8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from models import Store
from models.variant import load_variant
from training.data import MissingSplit, cap_problem, read_split, stratified_cap
from training.metrics import classification_metrics


def training_config(provenance: dict[str, Any]) -> dict[str, Any]:
    """The training config recorded in a variant's provenance (exports nest their source's)."""
    while provenance:
        if "config" in provenance:
            return provenance["config"]
        provenance = provenance.get("source_provenance") or {}
    return {}


def limit_rows(df: pd.DataFrame, limit: int, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """(`limit` rows of `df`, how they were picked): a seeded sample stratified by label (training's own
    `stratified_cap`), else, where stratifying cannot work (fewer rows than classes, a class of one row), a
    seeded random sample; rows keep their order. Never the first `limit` rows: a file sorted by label (AG News'
    train_subset_20k) scored one class."""
    if limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    if limit >= len(df):
        return df, f"all {len(df)} rows (--limit {limit})"
    if cap_problem(df, limit, "--limit", "") is None:
        return stratified_cap(df, limit, seed), f"{limit} of {len(df)} rows, stratified by label, seed {seed}"
    return df.sample(n=limit, random_state=seed).sort_index(), f"{limit} of {len(df)} rows, random, seed {seed}"


def evaluate_variant(
    store: Store, name: str, data: str | None = None, limit: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Metrics of variant `name` on the test split of `data` (default: the data it was trained on); with
    `limit`, on a seeded sample of that many rows stratified by label (`limit_rows`)."""
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
    sample = None
    if limit is not None:
        df, sample = limit_rows(df, limit, seed)
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
        **({"sample": sample} if sample else {}),
        "eval_time_s": elapsed_s,
        "samples_per_s": len(texts) / elapsed_s,
        **out,
    }
