"""Tiny in-process models and stores for tests: 2 layers, width 32, offline.

The tokenizer is the real MiniLM WordPiece tokenizer from ../shared (30,522 tokens), so the
tiny models see real token ids; everything else is built here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from models import Store, head_modules
from models.loading import fingerprint, load_tokenizer, save_base_snapshot
from models.writing import write_variant

SHARED = Path(os.environ.get("SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
AGNEWS = SHARED / "data" / "ag_news"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
GOLDEN_TEXTS = [
    "Stocks fell sharply on Wall Street as oil prices climbed.",
    "The home team won the championship in overtime.",
    "Scientists unveil a new chip that doubles battery life.",
    "Leaders meet in Geneva to discuss the ceasefire.",
]
MAX_LENGTH = 64


def tokenizer():
    return load_tokenizer(MINILM)


def tiny_classifier(arch: str = "bert", seed: int = 0, num_labels: int = 4) -> torch.nn.Module:
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
    raise ValueError(arch)


def tiny_lora(
    base: torch.nn.Module, seed: int, r: int = 4, targets: tuple[str, ...] = ("query", "value")
) -> torch.nn.Module:
    """A peft model over a copy of `base` with random (non-zero) LoRA and head weights."""
    arch = base.config.model_type
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(targets),
        modules_to_save=head_modules(arch),
        task_type=None,
    )
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


def make_store(root: Path, arch: str = "bert", n_adapters: int = 3, full: bool = True) -> Store:
    """A store with one tiny base snapshot, `n_adapters` LoRA variants (lora-0..) and a full variant."""
    store = Store(root)
    tok = tokenizer()
    base = tiny_classifier(arch, seed=0)
    fp = save_base_snapshot(store, base, tok, base_model=f"tiny-{arch}", init="random")
    common = dict(
        tokenizer=tok,
        labels=LABELS,
        max_length=MAX_LENGTH,
        base_model=f"tiny-{arch}",
        base_fingerprint=fp,
        init="random",
        golden_texts=GOLDEN_TEXTS,
    )
    for i in range(n_adapters):
        write_variant(store, name=f"lora-{i}", kind="lora", model=tiny_lora(base, seed=100 + i), **common)
    if full:
        write_variant(store, name="full", kind="full", model=tiny_classifier(arch, seed=7), **common)
    assert fingerprint(base) == fp
    return store
