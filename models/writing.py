"""Writing torch variants (full, merged, lora) into the store: the on-disk layout in one place.

ONNX exports write through `Store.writing` / `Store.commit` directly (see training.export).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from models.loading import compute_logits, encoder_of
from models.manifest import Golden, Manifest, Parity
from models.store import Store


def label_config(model: nn.Module, labels: Sequence[str]) -> None:
    """Make config.json carry the label names so any transformers user sees them."""
    cfg = model.config
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {name: i for i, name in enumerate(labels)}
    cfg.num_labels = len(labels)


def write_variant(
    store: Store,
    *,
    name: str,
    kind: str,
    model: nn.Module,
    tokenizer: Any,
    labels: Sequence[str],
    max_length: int,
    base_model: str,
    base_fingerprint: str,
    init: str,
    golden_texts: Sequence[str],
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    source: str | None = None,
    parity: Parity | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Save `model` as a `full`, `merged` or `lora` variant and register it atomically.

    For `lora`, `model` is a PeftModel with one adapter; only the adapter (LoRA weights and
    the classification head) is written. Golden logits are computed here, from the model
    being saved, in its current precision (callers save in fp32).
    """
    if kind not in ("full", "merged", "lora"):
        raise ValueError(f"write_variant writes full, merged or lora variants, not {kind!r}")
    model.eval()
    logits = compute_logits(model, tokenizer, list(golden_texts), max_length)
    with store.writing(name, overwrite=overwrite) as tmp:
        if kind == "lora":
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            label_config(model, labels)
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        manifest = Manifest(
            name=name,
            kind=kind,
            architecture=encoder_of(model).config.model_type,
            base_model=base_model,
            base_fingerprint=base_fingerprint,
            init=init,
            labels=list(labels),
            max_length=max_length,
            metrics=dict(metrics or {}),
            golden=Golden(texts=list(golden_texts), logits=logits.tolist()),
            source=source,
            parity=parity,
            provenance=dict(provenance or {}),
        )
        final: Path = store.commit(tmp, manifest)
    return Manifest.load(final)
