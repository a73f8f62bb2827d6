"""A stored LoRA adapter read straight into tensors, for the service's adapter bank.

Why not peft here: attaching an adapter with peft (`load_adapter`) walks the whole module tree
several times and builds new modules per target layer: 25-38 ms per adapter for MiniLM on this
project's CPU, paid twice per hot-swap (verify beside the serving model, then attach to it), most
of a swap's 100+ ms (measured 2026-11-28). The bank needs only each target layer's A, B and scale
and the head's weights: reading those from `adapter_model.safetensors` takes ~1 ms. peft still
trains and saves the adapters (training/), and loads them for everything outside the service
(models.variant.load_variant); the golden check then proves the bank computes what peft did.

Supported: plain LoRA on nn.Linear layers (any rank per layer, `lora_alpha`, `alpha_pattern`,
`use_rslora`) plus fully trained head layers (`modules_to_save`). Anything else (DoRA, LoRA bias,
fan_in_fan_out, embedding LoRA, ...) is refused with the reason, never served approximately.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from torch import nn

from models.heads import ADAPTER_CONFIG, ADAPTER_WEIGHTS, in_saved_module
from models.store import VariantRefused

PREFIX = "base_model.model."
# adapter_config.json fields that, when set, change the computation beyond plain LoRA (peft 0.21): other
# forward rules (DoRA, aLoRA, QA-LoRA, BD-LoRA, KaSA, MonteCLoRA, Arrow routing, Megatron, LoRA on raw
# parameters) or an initialisation that rewrote the base weights (LoftQ, CorDA, LoRA-GA), which this base is not.
# A denylist, not an allowlist: a newer peft adds fields with truthy defaults that change nothing, and the
# golden check still stands behind this for any rule it does not name.
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "kasa_config",
    "monteclora_config",
    "arrow_config",
    "megatron_config",
    "target_parameters",
    "loftq_config",
    "corda_config",
    "lora_ga_config",
)
# init_lora_weights values that leave the base residual (W - BA) unless peft converted the adapter on save
# (it then writes init_lora_weights=true)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraWeights:
    """One adapter: per target Linear (module path in the classifier), A (r, in), B (out, r) and the
    scale alpha/r; per head Linear, its trained weight and bias (they replace the base's)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of the files these tensors were parsed from

    def to(self, dtype: torch.dtype, device: torch.device | str) -> LoraWeights:
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return LoraWeights(
            {k: (cast(a), cast(b), s) for k, (a, b, s) in self.layers.items()},
            {k: (cast(w), cast(b)) for k, (w, b) in self.heads.items()},
            self.digests,
        )


def _alpha_for(module: str, cfg: dict) -> float:
    """peft's rule: the first alpha_pattern key matching the end of the module path, else lora_alpha."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(cfg["lora_alpha"])


def read_lora(name: str, path: Path, model: nn.Module) -> LoraWeights:
    """The adapter stored at `path` as tensors for `model` (the plain classifier it was trained on).

    Raises VariantRefused listing every reason it cannot be served as plain LoRA on this model.
    """
    path = Path(path)
    raw_cfg, raw_w = (path / ADAPTER_CONFIG).read_bytes(), (path / ADAPTER_WEIGHTS).read_bytes()
    cfg = json.loads(raw_cfg)
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')} is not LORA")
    problems += [f"{k}={cfg[k]!r} (the service serves plain LoRA)" for k in UNSUPPORTED if cfg.get(k)]
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        problems.append(
            f"init_lora_weights={init!r} trained against a rewritten base (save it converted to plain LoRA)"
        )
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (the service serves plain LoRA: bias='none')")
    saved = cfg.get("modules_to_save") or []
    state = load_bytes(raw_w)
    modules = dict(model.named_modules())
    out = LoraWeights(
        digests={n: hashlib.sha256(b).hexdigest() for n, b in ((ADAPTER_CONFIG, raw_cfg), (ADAPTER_WEIGHTS, raw_w))}
    )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        rel = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rel)
        if m:
            pairs.setdefault(m[1], {})[m[2]] = t
            continue
        m = re.fullmatch(r"(.+)\.(weight|bias)", rel)
        if m and in_saved_module(m[1], saved):
            heads.setdefault(m[1], {})[m[2]] = t
            continue
        problems.append(f"tensor {key} is not plain LoRA A/B or a saved head layer")
    for mod, ab in pairs.items():
        target = modules.get(mod)
        if not isinstance(target, nn.Linear):
            problems.append(f"{mod}: not an nn.Linear of this base ({type(target).__name__ if target else 'missing'})")
            continue
        if set(ab) != {"A", "B"}:
            problems.append(f"{mod}: needs both lora_A and lora_B")
            continue
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.shape != (r, target.in_features) or b.shape != (target.out_features, r):
            problems.append(
                f"{mod}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a {target.in_features}->{target.out_features} layer"
            )
            continue
        alpha = _alpha_for(mod, cfg)
        out.layers[mod] = (a, b, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)
    for mod, wb in heads.items():
        target = modules.get(mod)
        if target is not None and not isinstance(target, nn.Linear):
            problems.append(
                f"{mod}: a saved {type(target).__name__} (modules_to_save); the service swaps saved Linear layers "
                "only: save only Linear layers, or export the adapter merged"
            )
            continue
        if target is None or "weight" not in wb or wb["weight"].shape != target.weight.shape:
            problems.append(f"{mod}: saved head weights do not fit this base's layer")
            continue
        out.heads[mod] = (wb["weight"], wb.get("bias"))
    if not out.layers and not problems:
        problems.append("no LoRA layers in the adapter")
    if problems:
        raise VariantRefused(name, problems)
    return out
