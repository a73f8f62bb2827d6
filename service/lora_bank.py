"""A bank of stacked LoRA weights: rows of many adapters in one forward at the cost of one.

Why not only peft's `adapter_names=`: peft 0.21 loops over the distinct adapters of a batch in
every LoRA layer (index the rows, two small matmuls, scatter back, per adapter), so a batch that
mixes 32 adapters does 32x the small-kernel work and Python overhead of a batch with one
(`python -m benchmarks.lora_mix_probe` measures both). The bank stacks every resident adapter's
A, B and head weights once and, per layer, gathers them by row and applies two batched matmuls
(`bmm`), whatever the number of adapters in the batch — the approach of punica / S-LoRA.

peft still loads, verifies and owns the adapters (and `compute_logits(..., adapter_name=)` still
uses peft's own path, which keeps the golden-set check independent of this code). The bank is
rebuilt from peft's modules whenever the set of adapters changes, and peft's weights are then
re-pointed to views of the stacks so the adapters are not held twice in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LoraBank:
    """Stacked weights of every adapter attached to a PeftModel, applied through forward hooks."""

    def __init__(self, model: nn.Module):
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        self.model = model
        self.lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]
        self.heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        if any(getattr(m, "lora_variant", None) for m in self.lora_layers):
            raise NotImplementedError("the bank applies plain LoRA only (no DoRA / variants)")
        self.index: dict[str, int] = {}  # peft adapter name -> position in the stacks
        self.adapters: tuple[str, ...] = ()
        self._rows: torch.Tensor | None = None  # stack position of each batch row, set per forward
        self._stacks: dict[int, dict[str, torch.Tensor]] = {}
        self._peft_disabled = False
        self._hooks = [m.register_forward_hook(self._lora_hook) for m in self.lora_layers]
        self._hooks += [m.register_forward_hook(self._head_hook) for m in self.heads]

    def close(self) -> None:
        self.restore_peft()
        for h in self._hooks:
            h.remove()

    def restore_peft(self) -> None:
        """Turn peft's own LoRA path back on (for peft's `adapter_names=` forward on this model)."""
        if self._peft_disabled:
            self.model.base_model.enable_adapter_layers()
            self._peft_disabled = False

    # ---- building -----------------------------------------------------------------------------
    def rebuild(self) -> None:
        """Stack the weights of every adapter peft holds now (call after each attach / delete)."""
        names = tuple(self.model.peft_config)
        self.adapters, self.index = names, {n: i for i, n in enumerate(names)}
        self._stacks = {}
        with torch.no_grad():
            for layer in self.lora_layers:
                present = [n for n in names if n in layer.lora_A]
                if not present:
                    continue
                a0, b0 = layer.lora_A[present[0]].weight, layer.lora_B[present[0]].weight
                r_max = max(layer.lora_A[n].weight.shape[0] for n in present)
                # an adapter that does not target this layer keeps zero rows: it adds nothing here
                a_stack = a0.new_zeros((len(names), r_max, a0.shape[1]))  # (n, r, in)
                b_stack = b0.new_zeros((len(names), b0.shape[0], r_max))  # (n, out, r)
                scale = torch.zeros(len(names), dtype=a0.dtype, device=a0.device)
                for i, n in enumerate(names):
                    if n not in layer.lora_A:
                        continue
                    wa, wb = layer.lora_A[n].weight, layer.lora_B[n].weight
                    r = wa.shape[0]
                    a_stack[i, :r].copy_(wa)
                    b_stack[i, :, :r].copy_(wb)
                    scale[i] = layer.scaling[n]
                    # zero-padded ranks add nothing; peft's own weights become views of the stack
                    layer.lora_A[n].weight.data = a_stack[i, :r]
                    layer.lora_B[n].weight.data = b_stack[i, :, :r]
                self._stacks[id(layer)] = {"a": a_stack, "b": b_stack, "scale": scale}
            for head in self.heads:
                mods = [head.modules_to_save[n] for n in names]
                w_stack = torch.stack([m.weight for m in mods])  # (n, out, in)
                b_stack = torch.stack([m.bias for m in mods])  # (n, out)
                for i, m in enumerate(mods):
                    m.weight.data, m.bias.data = w_stack[i], b_stack[i]
                self._stacks[id(head)] = {"w": w_stack, "bias": b_stack}

    # ---- inference ----------------------------------------------------------------------------
    def forward(self, adapter_names: list[str], **inputs: Any) -> Any:
        """Run the base with peft's adapters disabled; the hooks add each row's own adapter.

        peft's path stays disabled after the call (until `restore_peft` or `close`): toggling it
        walks every module of the model, ~1 ms a batch on a 2-layer model, more than its forward."""
        if set(adapter_names) - self.index.keys():
            raise KeyError(f"adapters not in the bank: {sorted(set(adapter_names) - self.index.keys())}")
        device = inputs["input_ids"].device
        self._rows = torch.tensor([self.index[n] for n in adapter_names], device=device)
        if not self._peft_disabled:
            self.model.base_model.disable_adapter_layers()
            self._peft_disabled = True
        try:
            return self.model(**inputs)
        finally:
            self._rows = None

    def _lora_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._rows is None or id(module) not in self._stacks:
            return None  # not a bank forward (peft's own path ran), or no adapter targets this layer
        s = self._stacks[id(module)]
        x = args[0]
        rows = self._rows
        xa = torch.bmm(x.to(s["a"].dtype), s["a"][rows].transpose(1, 2))  # (b, L, r)
        xa = xa * s["scale"][rows].view(-1, 1, 1)
        return output + torch.bmm(xa, s["b"][rows].transpose(1, 2)).to(output.dtype)

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._rows is None:
            return None
        s = self._stacks[id(module)]
        x = args[0]
        rows = self._rows
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(s["w"].dtype)  # (b, T, in); T = 1 for pooled heads
        y = torch.bmm(x3, s["w"][rows].transpose(1, 2)) + s["bias"][rows].unsqueeze(1)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(output.dtype)
