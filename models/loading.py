"""Loading variants and bases into memory, fingerprints, and golden-set checks.

The service, training and benchmarks all load weights through these functions so that a
variant means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.atomic import atomic_dir
from models.golden import compare_golden
from models.manifest import Manifest
from models.store import Store, VariantRefused

__all__ = [  # compare_golden is re-exported for older callers; it lives in models.golden
    "BASE_INFO",
    "DTYPES",
    "ONNX_FILE",
    "attach_adapter",
    "compare_golden",
    "compute_logits",
    "encoder_of",
    "fingerprint",
    "load_base",
    "load_full",
    "load_tokenizer",
    "onnx_logits",
    "onnx_session",
    "model_mask",
    "pad_rows",
    "query_key_mask",
    "save_base_snapshot",
]

BASE_INFO = "base.json"
ONNX_FILE = "model.onnx"

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_width(longest: int, multiple: int, cap: int | None = None) -> int:
    """`longest` rounded up to `multiple` tokens, never past `cap` (the positions the model was built
    for / the truncation length) unless the longest row itself is longer."""
    target = -(-longest // multiple) * multiple
    return target if cap is None else min(target, max(longest, cap))


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, *, height: int | None = None, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id lists, padded on the right to the longest row
    (or to `width`), `height` rows tall when given (filler rows: one pad token that attends to itself,
    so no row is all-masked). Vectorised (one numpy scatter), not a Python loop over rows: it runs
    once per served batch. By hand rather than tokenizer.pad: on lists that is slower and warns.
    """
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    w = int(lens.max()) if width is None else width
    h = len(rows) if height is None else height
    if w < lens.max() or h < len(rows):
        raise ValueError(f"{len(rows)} rows up to {lens.max()} tokens do not fit a {h} x {w} batch")
    mask = np.zeros((h, w), dtype=np.int64)
    mask[: len(rows)] = np.arange(w) < lens[:, None]
    mask[len(rows) :, 0] = 1
    ids = np.full((h, w), pad_id, dtype=np.int64)
    ids[: len(rows)][mask[: len(rows)].astype(bool)] = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum())
    )
    return torch.from_numpy(ids), torch.from_numpy(mask)


def length_chunks(lengths: Sequence[int], overhead_tokens: float) -> list[np.ndarray]:
    """Split a batch into forwards of similar-length rows: the row indices of each, shortest first.

    A padded forward costs ~ rows x longest tokens plus a fixed cost per forward (`overhead_tokens`,
    in token-equivalents). AG News texts run 10-128 tokens, so one forward over a random batch pads
    to ~2x the tokens it carries; the optimal split of the sorted lengths into contiguous chunks is a
    small dynamic programme (one numpy step per row). Used where forwards are eager (CPU); CUDA
    graphs replay fixed buckets instead (service/graphs.py).
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    sorted_lens = np.asarray(lengths, dtype=np.int64)[order]
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: cost of the first j sorted rows
    start = np.zeros(n + 1, dtype=np.int64)  # where the last chunk of that best split starts
    for j in range(1, n + 1):
        i = np.arange(j)
        cost = best[:j] + (j - i) * sorted_lens[j - 1] + overhead_tokens
        start[j] = int(np.argmin(cost))
        best[j] = cost[start[j]]
    chunks, j = [], n
    while j > 0:
        chunks.append(order[start[j] : j])
        j = int(start[j])
    return chunks[::-1]


def query_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """(batch, length) padding mask as (batch, query, key), a view: every query sees the same keys.

    BERT / RoBERTa (transformers 4.57, SDPA) turn a 2-D mask into the 4-D one after asking the device
    "is it all ones?" (_prepare_4d_attention_mask_for_sdpa, eager mode): a host sync in every forward,
    and an error inside a CUDA graph capture. Given as (batch, query, key) they take their other path,
    the identical additive mask, no read (tests/test_training_loop_speed.py checks the logits agree).
    """
    return mask[:, None, :].expand(-1, mask.shape[1], -1)


def model_mask(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to pass a (batch, length) padding mask to `model` without a host read (see query_key_mask)."""
    config = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    return query_key_mask if getattr(config, "model_type", None) in ("bert", "roberta") else (lambda m: m)


def mask_in_autocast_dtype(model: nn.Module) -> bool:
    """Make `model`'s encoder build its additive attention mask in autocast's dtype while autocast is on.

    Why: BERT / RoBERTa build the mask in the weights' dtype (fp32 under autocast), so eager attention
    adds an fp32 mask to bf16 scores, and the (batch, heads, length, length) probabilities after it
    (softmax, dropout, their backward, the cast back to bf16 for the matmul with the values) are fp32,
    some ops in torch's slow mixed-dtype loops. In the autocast dtype they stay bf16, as the scores
    already are (the probabilities were rounded to bf16 for that matmul anyway). Measured on this
    project's 2-core Xeon with AMX: one MiniLM attention block's forward + backward under bf16 autocast,
    16 x 64 tokens with dropout, 11.4 -> 9.5 ms (median of 30 interleaved rounds), ~11 ms of a ~250 ms
    training step. Returns whether the encoder builds such a mask (False: left as it is).
    """
    encoder = encoder_of(model)
    build = getattr(encoder, "get_extended_attention_mask", None)
    if build is None:
        return False

    def get_extended_attention_mask(
        attention_mask: torch.Tensor, input_shape: Any, device: Any = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        kind = attention_mask.device.type
        if dtype is None and torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        return build(attention_mask, input_shape, device, dtype)

    encoder.get_extended_attention_mask = get_extended_attention_mask
    return True


def encoder_of(model: nn.Module) -> nn.Module:
    """The shared encoder of a sequence classifier (BertModel inside BertForSequenceClassification)."""
    if hasattr(model, "get_base_model"):  # peft wrapper
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def fingerprint(model: nn.Module) -> str:
    """sha256 over the encoder's weights: names, dtypes, shapes and bytes, in name order.

    Computed on the weights as stored (before any dtype cast, before peft wraps the model),
    so a LoRA adapter can prove it was trained on exactly the base the service has loaded.
    """
    h = hashlib.sha256()
    state = encoder_of(model).state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_tokenizer(path_or_id: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path_or_id))
    except OSError as e:
        raise not_loadable(path_or_id, e) from None


def not_loadable(path_or_id: str | Path, e: OSError) -> FileNotFoundError:
    """A one-line error for a model/tokenizer that is neither a local model dir nor fetchable."""
    return FileNotFoundError(
        f"{path_or_id}: not a local model directory (with config.json) and not loadable from the Hugging Face "
        f"Hub or its cache ({str(e).splitlines()[0]}); give a local path, or run "
        f"`huggingface-cli download {path_or_id}` on a machine with network access"
    )


def save_base_snapshot(store: Store, model: nn.Module, tokenizer: Any, base_model: str, init: str) -> str:
    """Save the encoder `model` was built on into STORE/_bases/<fp16>/ once; return its fingerprint.

    LoRA variants reference the base by fingerprint, so a store is self-contained and
    servable offline, and adapters never duplicate the base weights.
    """
    fp = fingerprint(model)
    target = store.base_path(fp)
    if (target / BASE_INFO).exists():
        return fp
    with atomic_dir(target) as tmp:
        encoder_of(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"base_model": base_model, "fingerprint": fp, "init": init}
        (tmp / BASE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    # A concurrent writer of the same base may have replaced ours: same fingerprint, same bytes.
    return fp


def load_base(
    store: Store,
    manifest: Manifest,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
) -> tuple[nn.Module, Any, str]:
    """Load the base encoder a variant was built on, wrapped as a sequence classifier.

    Looks in STORE/_bases first, then at `manifest.base_model` (a local path or Hub id).
    Returns (model, tokenizer, fingerprint); refuses when the weights found do not match
    the manifest's fingerprint. The classifier head of the returned model is freshly
    initialised: adapters bring their own.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    snapshot = store.base_path(manifest.base_fingerprint)
    source = str(snapshot) if (snapshot / BASE_INFO).exists() else manifest.base_model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=manifest.num_labels, torch_dtype=torch.float32
        )
    except OSError as e:
        raise VariantRefused(
            manifest.name,
            [
                f"base '{manifest.base_model}' not found in {snapshot} nor loadable ({e}); "
                "copy the base into the store or make the Hub reachable"
            ],
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
    fp = fingerprint(model)
    if fp != manifest.base_fingerprint:
        raise VariantRefused(
            manifest.name,
            [
                f"base at {source} has fingerprint {fp[:12]}… but the variant was built on "
                f"{manifest.base_fingerprint[:12]}…"
            ],
        )
    tokenizer = load_tokenizer(source)
    model.eval().to(device=device, dtype=DTYPES[dtype])
    return model, tokenizer, fp


def load_full(path: Path, *, dtype: str = "fp32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """A full or merged variant: a complete sequence classifier saved with save_pretrained."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), torch_dtype=torch.float32)
    model.eval().to(device=device, dtype=DTYPES[dtype])
    return model, load_tokenizer(path)


def attach_adapter(model: nn.Module, path: Path, adapter_name: str) -> nn.Module:
    """Attach a LoRA variant as `adapter_name`; returns the (possibly new) PeftModel wrapper."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=False)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=False)


def onnx_session(path: Path, *, threads: int | None = None, spin: bool = True) -> Any:
    """An onnxruntime CPU session; `spin=False` lets its idle workers sleep instead of spin-waiting
    (the service: its front-ends need those cores whenever the engine is not computing)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(Path(path) / ONNX_FILE), opts, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, encoded: dict[str, Any]) -> torch.Tensor:
    """Run an ONNX classifier on tokenizer output (numpy or torch tensors)."""
    import numpy as np

    names = {i.name for i in session.get_inputs()}
    feeds = {}
    for k, v in encoded.items():
        if k in names:
            arr = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
            feeds[k] = arr.astype(np.int64)
    if "token_type_ids" in names and "token_type_ids" not in feeds:  # BERT exports take it; RoBERTa tokenizers omit it
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return torch.from_numpy(session.run(None, feeds)[0]).float()


@torch.inference_mode()
def compute_logits(
    model: nn.Module | Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    *,
    adapter_name: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """fp32 logits for `texts` from a torch model (optionally one peft adapter) or an ONNX session."""
    is_onnx = hasattr(model, "get_inputs")
    rows = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        # right, as LoadedVariant.encode pads (why: there)
        enc = tokenizer(
            chunk, padding=True, padding_side="right", truncation=True, max_length=max_length, return_tensors="pt"
        )
        if is_onnx:
            rows.append(onnx_logits(model, enc))
            continue
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        kwargs = {"adapter_names": [adapter_name] * len(chunk)} if adapter_name else {}
        rows.append(model(**enc, **kwargs).logits.float().cpu())
    return torch.cat(rows)
