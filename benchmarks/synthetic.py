"""Synthetic stores for benchmarks and tests: one builder, untrained weights (speed does not depend
on what a model learned).

    tiny           2 layers, width 32 (BERT or RoBERTa), the tests' model; near-zero compute, so a
                   benchmark against it measures the serving path, not the model
    minilm         the real MiniLM encoder (../shared/models/all-MiniLM-L6-v2), random head
    roberta-base / roberta-large   the published shapes, random init (ARCH_PRESETS, one source)

Each store holds one base snapshot, `n_adapters` random LoRA variants `lora-0..` (r on
query/value, head saved, non-zero B so every adapter computes something) and, optionally, a
`full` variant and an `onnx-int8` export of it (made by training's exporter, as the demo does).
The tokenizer is MiniLM's WordPiece for every shape (offline; real token ids).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from benchmarks.paths import base_model

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
GOLDEN_TEXTS = [
    "Stocks fell sharply on Wall Street as oil prices climbed.",
    "The home team won the championship in overtime.",
    "Scientists unveil a new chip that doubles battery life.",
    "Leaders meet in Geneva to discuss the ceasefire.",
]
TINY_MAX_LENGTH = 64
MAX_LENGTH = 128
SHAPES = ("tiny", "tiny-roberta", "minilm", "roberta-base", "roberta-large")


def tokenizer() -> Any:
    from models.loading import load_tokenizer

    return load_tokenizer(base_model())


def tiny_classifier(arch: str = "bert", seed: int = 0, num_labels: int = 4) -> torch.nn.Module:
    """2 layers, width 32, 2 heads, the MiniLM vocabulary; dropout off."""
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    common = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(**common, max_position_embeddings=128)).eval()
    if arch == "roberta":
        # pad id 0 to match the WordPiece tokenizer; positions offset by pad id + 1
        cfg = RobertaConfig(**common, max_position_embeddings=130, pad_token_id=0)
        return RobertaForSequenceClassification(cfg).eval()
    raise ValueError(f"unknown tiny arch {arch!r}; use bert or roberta")


def random_lora(
    base: torch.nn.Module, seed: int, r: int = 4, targets: tuple[str, ...] = ("query", "value"), scale: float = 0.2
) -> torch.nn.Module:
    """A peft model over a copy of `base` with random (non-zero) LoRA and head weights."""
    from peft import LoraConfig, get_peft_model

    from models import head_modules

    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(targets),
        modules_to_save=head_modules(base.config.model_type),
        task_type=None,
    )
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return pm.eval()


def base_for(shape: str, seed: int = 0) -> tuple[torch.nn.Module, str, str, int]:
    """(model, base_model id recorded in manifests, init, max_length) for a shape name."""
    if shape in ("tiny", "tiny-bert"):
        return tiny_classifier("bert", seed), "tiny-bert", "random", TINY_MAX_LENGTH
    if shape == "tiny-roberta":
        return tiny_classifier("roberta", seed), "tiny-roberta", "random", TINY_MAX_LENGTH
    if shape == "minilm":
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        hf_logging.set_verbosity_error()  # "newly initialized classifier" is the point here
        model = AutoModelForSequenceClassification.from_pretrained(base_model(), num_labels=len(LABELS))
        return model.eval(), base_model(), "pretrained", MAX_LENGTH
    if shape in ("roberta-base", "roberta-large"):
        from transformers import RobertaConfig, RobertaForSequenceClassification

        from training.config import ARCH_PRESETS  # the published shapes, one source

        arch = {k: v for k, v in ARCH_PRESETS[shape].items() if k != "model_type"}
        torch.manual_seed(seed)
        tok = tokenizer()
        cfg = RobertaConfig(**arch, pad_token_id=tok.pad_token_id, num_labels=len(LABELS))
        return RobertaForSequenceClassification(cfg).eval(), f"{shape}-random", "random", MAX_LENGTH
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def build_store(
    root: str | Path,
    shape: str = "tiny",
    *,
    n_adapters: int = 3,
    full: bool = True,
    onnx_int8: bool = False,
    lora_r: int | None = None,
    golden_texts: list[str] | None = None,
) -> Path:
    """Write a synthetic store at `root` (kept as is when it already holds these variants).

    Tiny stores keep the tests' exact weights (base seed 0, adapters 100+i, full seed 7).
    """
    from models import Store
    from models.loading import save_base_snapshot
    from models.writing import write_variant

    root = Path(root)
    store = Store(root)
    wanted = (
        [f"lora-{i}" for i in range(n_adapters)] + (["full"] if full else []) + (["onnx-int8"] if onnx_int8 else [])
    )
    if set(wanted) <= set(store.names()):
        return root
    tiny = shape.startswith("tiny")
    tok = tokenizer()
    base, base_id, init, max_length = base_for(shape, seed=0)
    fp = save_base_snapshot(store, base, tok, base_model=base_id, init=init)
    common = dict(
        tokenizer=tok,
        labels=LABELS,
        max_length=max_length,
        base_model=base_id,
        base_fingerprint=fp,
        init=init,
        golden_texts=golden_texts or GOLDEN_TEXTS,
        overwrite=True,
    )
    # tiny: large perturbations so adapters differ visibly in tests; real shapes: LoRA-sized ones
    r, scale = (lora_r or 4, 0.2) if tiny else (lora_r or 8, 0.02)
    missing = [i for i in range(n_adapters) if f"lora-{i}" not in store.names()]
    if tiny:  # a fresh copy per adapter: the tests' exact weights
        for i in missing:
            write_variant(
                store, name=f"lora-{i}", kind="lora", model=random_lora(base, 100 + i, r, scale=scale), **common
            )
    elif missing:  # one peft model re-drawn per adapter: a deep copy of a 1.4 GB base each time costs minutes
        model = random_lora(base, seed=100 + missing[0], r=r, scale=0.0)
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for i in missing:
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in init:
                        p.copy_(init[n] + torch.randn(p.shape, generator=g) * scale)
            write_variant(store, name=f"lora-{i}", kind="lora", model=model, **common)
    if full and "full" not in store.names():
        if tiny:
            model = tiny_classifier("roberta" if shape == "tiny-roberta" else "bert", seed=7)
        else:  # the base with its own (random) head: a full variant of exactly the base's cost
            model = copy.deepcopy(base)
        write_variant(store, name="full", kind="full", model=model, **common)
    if onnx_int8 and "onnx-int8" not in store.names():
        from training.export import export

        export(store, "full", "onnx-int8", name="onnx-int8", overwrite=True)
    return root
