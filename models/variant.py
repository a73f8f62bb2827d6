"""`load_variant`: the one way to load a stored variant of any kind into memory.

Training's eval, exports, the benchmarks and the service all load through here, so a variant
means the same thing everywhere: verified against its manifest, at the precision and device
asked for, with one `logits(...)` call whatever the kind.

    full / merged   a complete transformers sequence classifier (safetensors)
    lora            an adapter attached to its base (the store's `_bases` snapshot, or
                    `onto`, a base the caller already holds, e.g. the service's shared one)
    onnx, onnx-int8 an onnxruntime CPU session (always fp32 inputs/outputs)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.loading import (
    DTYPES,
    attach_adapter,
    load_base,
    load_full,
    load_tokenizer,
    onnx_logits,
    onnx_session,
)
from models.manifest import Manifest
from models.store import Store, VariantRefused

ONNX_KINDS = ("onnx", "onnx-int8")
TORCH_KINDS = ("full", "merged", "lora")


@dataclass
class LoadedVariant:
    """A variant in memory: its manifest, tokenizer and the thing that computes its logits.

    `model` is a torch module (for `lora`, the PeftModel holding the adapter named `adapter`,
    possibly among others) or None; `session` is an onnxruntime InferenceSession or None.
    """

    name: str
    manifest: Manifest
    path: Path
    tokenizer: Any
    model: nn.Module | None = None
    session: Any = None
    adapter: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"

    @classmethod
    def wrap(
        cls, manifest: Manifest, path: Path, tokenizer: Any, runner: Any, adapter: str | None = None
    ) -> LoadedVariant:
        """A view over a model or ONNX session already in memory (e.g. a service entry), for golden checks."""
        is_onnx = hasattr(runner, "get_inputs")
        return cls(
            manifest.name,
            manifest,
            Path(path),
            tokenizer,
            model=None if is_onnx else runner,
            session=runner if is_onnx else None,
            adapter=adapter,
        )

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def runner(self) -> Any:
        """The torch module or ONNX session (what the old loaders returned as 'model')."""
        return self.session if self.session is not None else self.model

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise `texts` as one padded batch, truncated to the manifest's max_length.

        Padded on the right whatever tokenizer_config.json says, as training and the service pad: with absolute
        positions (BERT), left padding shifts a short text's positions by its batch's longest, so golden logits and
        eval scores would depend on what shares the batch."""
        return self.tokenizer(
            list(texts),
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.manifest.max_length,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def forward(self, encoded: Mapping[str, Any]) -> torch.Tensor:
        """fp32 CPU logits for one already-tokenised batch (input_ids, attention_mask, ...)."""
        if self.session is not None:
            return onnx_logits(self.session, encoded)
        assert self.model is not None
        device = next(self.model.parameters()).device
        feeds = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        kwargs = {"adapter_names": [self.adapter] * len(feeds["input_ids"])} if self.adapter else {}
        return self.model(**feeds, **kwargs).logits.float().cpu()

    def logits(self, inputs: Sequence[str] | Mapping[str, Any], *, batch_size: int = 32) -> torch.Tensor:
        """fp32 CPU logits for texts (tokenised here, in batches of `batch_size`) or for an encoded batch."""
        if isinstance(inputs, Mapping):
            return self.forward(inputs)
        texts = list(inputs)
        rows = [self.forward(self.encode(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(rows) if rows else torch.empty(0, self.manifest.num_labels)

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[int]:
        """Class indices for `texts`, batched by length so batches pad little; input order kept."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        logits = self.logits([texts[i] for i in order], batch_size=batch_size)
        out = [0] * len(texts)
        for row, i in zip(logits.argmax(-1).tolist(), order, strict=True):
            out[i] = row
        return out


def load_variant(
    store: Store,
    name: str,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    onto: LoadedVariant | nn.Module | None = None,
    tokenizer: Any = None,
    adapter_name: str | None = None,
    threads: int | None = None,
    onnx_spin: bool = True,
    manifest: Manifest | None = None,
    expected_base_fingerprint: str | None = None,
) -> LoadedVariant:
    """Load variant `name` of any kind, verified against its manifest; raise VariantRefused when it must not be used.

    dtype/device apply to torch kinds (ONNX runs fp32 on CPU). For `lora`:
      - `onto` (a LoadedVariant or a base/PeftModel already in memory, with its `tokenizer`)
        receives the adapter as `adapter_name` (default "default"), so many adapters can share
        one base; its fingerprint must match the adapter's base;
      - otherwise the base is loaded from the store's snapshot (or the manifest's base id).
    `manifest`: pass the manifest `store.verify` already returned to skip re-hashing the files
    (the service verifies first, with the base it holds). `threads` sizes onnxruntime's pool; `onnx_spin`
    (models.loading.onnx_session) whether its idle workers spin.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    m = manifest or store.verify(name, expected_base_fingerprint=expected_base_fingerprint)
    path = store.path(name)
    common = dict(name=name, manifest=m, path=path, dtype=dtype, device=device)
    if m.kind in ("full", "merged"):
        model, tok = load_full(path, dtype=dtype, device=device)
        return LoadedVariant(tokenizer=tok, model=model, **common)
    if m.kind == "lora":
        adapter = adapter_name or "default"
        if onto is None:
            base, tok, _ = load_base(store, m, dtype=dtype, device=device)
            if "tokenizer.json" in m.files:  # the adapter's own (the one it trained with, hashed by verify)
                tok = load_tokenizer(path)
        else:
            if isinstance(onto, LoadedVariant):
                base, tok, held = onto.model, onto.tokenizer, onto.manifest.base_fingerprint
            else:  # a module: the caller vouches for its fingerprint (hashing a PeftModel's base is not possible)
                base, tok, held = onto, tokenizer, expected_base_fingerprint
            if tok is None or held is None:
                raise ValueError("load_variant(onto=module) needs tokenizer= and expected_base_fingerprint= too")
            if held != m.base_fingerprint:
                raise VariantRefused(
                    name, [f"built on base {m.base_fingerprint[:12]}… but the base given is {held[:12]}…"]
                )
        model = attach_adapter(base, path, adapter)
        if dtype != "fp32" or device != "cpu":  # a new adapter's weights arrive in fp32 on CPU
            model.to(device=device, dtype=DTYPES[dtype])
        return LoadedVariant(tokenizer=tok, model=model, adapter=adapter, **common)
    # onnx, onnx-int8: onnxruntime on CPU, fp32 in and out whatever dtype was asked
    common.update(dtype="fp32", device="cpu")
    return LoadedVariant(
        tokenizer=load_tokenizer(path), session=onnx_session(path, threads=threads, spin=onnx_spin), **common
    )
