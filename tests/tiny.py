"""Tiny in-process models and stores for tests: 2 layers, width 32, offline.

The builder is shared with the benchmarks (benchmarks/synthetic.py); this module keeps the
names the tests use. The tokenizer is the real MiniLM WordPiece tokenizer from ../shared
(30,522 tokens), so the tiny models see real token ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks import synthetic
from benchmarks.synthetic import GOLDEN_TEXTS, LABELS, tiny_classifier
from benchmarks.synthetic import TINY_MAX_LENGTH as MAX_LENGTH
from models import Store

SHARED = Path(os.environ.get("SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
AGNEWS = SHARED / "data" / "ag_news"

__all__ = ["AGNEWS", "GOLDEN_TEXTS", "LABELS", "MAX_LENGTH", "MINILM", "make_store", "tiny_classifier", "tiny_lora"]


def tokenizer():
    return synthetic.tokenizer()


def tiny_lora(
    base: torch.nn.Module, seed: int, r: int = 4, targets: tuple[str, ...] = ("query", "value")
) -> torch.nn.Module:
    """A peft model over a copy of `base` with random (non-zero) LoRA and head weights."""
    return synthetic.random_lora(base, seed, r=r, targets=targets, scale=0.2)


def make_store(root: Path, arch: str = "bert", n_adapters: int = 3, full: bool = True) -> Store:
    """A store with one tiny base snapshot, `n_adapters` LoRA variants (lora-0..) and a full variant."""
    shape = {"bert": "tiny", "roberta": "tiny-roberta"}[arch]
    return Store(synthetic.build_store(root, shape, n_adapters=n_adapters, full=full))
