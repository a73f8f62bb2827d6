"""Where the offline data and the pretrained encoder live: the one place that resolves them.

`AGNEWS_DATA` / `BASE_MODEL` / `SHARED_DIR` override the defaults (the project's `../shared`);
with Hub access they may name a Hub dataset / model id instead of a directory.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))


def agnews_data() -> str:
    """AG News: a directory with train/test Parquet (default), a file, or a Hub dataset id."""
    return os.environ.get("AGNEWS_DATA") or str(SHARED / "data" / "ag_news")


def base_model() -> str:
    """The pretrained encoder used by the demo and the real-model tests (MiniLM offline)."""
    return os.environ.get("BASE_MODEL") or str(SHARED / "models" / "all-MiniLM-L6-v2")


def offline_env() -> dict[str, str]:
    """Environment for subprocesses: the resolved paths, Hub offline, no tokenizer threads."""
    return {
        "AGNEWS_DATA": agnews_data(),
        "BASE_MODEL": base_model(),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
