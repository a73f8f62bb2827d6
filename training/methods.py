"""Fine-tuning methods as data: which parameters train, the default lr, how the variant is saved.

The training loop calls `method.prepare(model, cfg)` and never branches on the method name.
`training.config` validates `method` against `METHODS`, so this module imports the config only for
type hints (no import circle) and torch only where a model is prepared (the config stays light).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.heads import head_modules

if TYPE_CHECKING:
    from torch import nn

    from training.config import TrainConfig


@dataclass(frozen=True)
class Method:
    name: str
    default_lr: float  # used when the config leaves lr unset
    kind: str  # store kind the trained model is written as
    prepare: Callable[[nn.Module, TrainConfig], nn.Module]  # freezes / wraps; returns the model to train


def _full(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # task_type=None + explicit head modules: see models/heads.py for why (mixed-adapter batching).
    lora_cfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.targets),
        modules_to_save=head_modules(model.config.model_type),
        task_type=None,
    )
    return get_peft_model(model, lora_cfg)


METHODS: dict[str, Method] = {
    "full": Method("full", default_lr=2e-5, kind="full", prepare=_full),
    "lora": Method("lora", default_lr=4e-4, kind="lora", prepare=_lora),
}


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into adapter (LoRA matrices), head and encoder, plus the total.

    `modules_to_save` copies are the head of a LoRA model; `classifier`/`pre_classifier` that of a full one.
    """
    counts = {
        "trainable_params": 0,
        "trainable_adapter_params": 0,
        "trainable_head_params": 0,
        "trainable_encoder_params": 0,
        "total_params": 0,
    }
    for name, p in model.named_parameters():
        n = p.numel()
        if "original_module" in name:  # peft keeps the frozen original of a saved module
            continue
        counts["total_params"] += n
        if not p.requires_grad:
            continue
        counts["trainable_params"] += n
        if "lora_" in name:
            counts["trainable_adapter_params"] += n
        elif "classifier" in name or "modules_to_save" in name:
            counts["trainable_head_params"] += n
        else:
            counts["trainable_encoder_params"] += n
    return counts
