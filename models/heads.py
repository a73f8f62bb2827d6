"""Classification heads per architecture, as LoRA adapters must save them.

peft 0.21 can only batch rows for different adapters in one forward (`adapter_names=`) when
each entry of `modules_to_save` is a plain Linear layer. RoBERTa's `classifier` is a
composite module (dense -> tanh -> out_proj), so its inner Linear layers are listed; BERT's
`classifier` is already a Linear. peft's `task_type="SEQ_CLS"` would silently append the
composite `classifier` again (and then fail to load the adapter), so adapters are created
with `task_type=None` and these explicit lists.

Convention: the last entry is the output layer (its weight has one row per label).
"""

from __future__ import annotations

import json
from pathlib import Path

HEAD_MODULES: dict[str, list[str]] = {
    "bert": ["classifier"],
    "roberta": ["classifier.dense", "classifier.out_proj"],
    "xlm-roberta": ["classifier.dense", "classifier.out_proj"],
    "distilbert": ["pre_classifier", "classifier"],
}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def head_modules(model_type: str) -> list[str]:
    try:
        return list(HEAD_MODULES[model_type])
    except KeyError:
        raise ValueError(
            f"no LoRA head layout for model_type '{model_type}'; known: {sorted(HEAD_MODULES)} "
            "(add it to models/heads.py)"
        ) from None


def in_saved_module(module: str, saved: list[str]) -> bool:
    """peft's modules_to_save rule (a module path ending with a listed name) for `module` or a module holding it:
    a saved composite (RoBERTa's `classifier`, BERT's `pooler`) is written as its inner layers' tensors."""
    parts = module.split(".")
    paths = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
    return any(p == k or p.endswith("." + k) for p in paths for k in saved)


def head_out_features(adapter_dir: Path) -> int | None:
    """Number of classes an adapter's saved head produces, or None if it has no head.

    The output layer is the saved 2-D weight with the fewest rows (one per label; every other layer of a head
    maps to a hidden size): found whatever `modules_to_save` lists — this project's explicit layers, or peft's
    defaults for SEQ_CLS (RoBERTa's composite `classifier` plus `score`, saved as classifier.dense/out_proj).
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    saved = cfg.get("modules_to_save") or []
    if not saved:
        return None
    rows = []
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            if key.endswith(".weight") and ".lora_" not in key and in_saved_module(key[: -len(".weight")], saved):
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    rows.append(int(shape[0]))
    return min(rows, default=None)
