"""A bank of stacked LoRA weights: rows of many adapters in one forward at the cost of one.

Why not only peft's `adapter_names=`: peft 0.21 loops over the distinct adapters of a batch in
every LoRA layer (index the rows, two small matmuls, scatter back, per adapter), so a batch that
mixes 32 adapters does 32x the small-kernel work and Python overhead of a batch with one
(`python -m benchmarks.lora_mix_probe` measures both). The bank stacks every resident adapter's
A, B and head weights once and, per layer, gathers them by row and applies two batched matmuls
(`bmm`), whatever the number of adapters in the batch — the approach of punica / S-LoRA.

peft still loads, verifies and owns the adapters (and `compute_logits(..., adapter_name=)` still
uses peft's own path, which keeps the golden-set check independent of this code). The bank is
updated from peft's modules whenever the set of adapters changes, and peft's weights are then
re-pointed to views of the stacks so the adapters are not held twice in memory.

Slots are stable: an added adapter is copied into a free slot of each stack, a removed one's slot is
zeroed and reused; the stacks are reallocated only when they run out of slots (or a larger rank or a
newly targeted layer arrives), which bumps `generation`. A CUDA graph captured over the bank
(service/graphs.py) reads the stacks by address, so it stays valid until `generation` changes:
with `doubling` (the service sets it on CUDA) the slots double when they run out, so N adapters
cost log2(N) reallocations (and recaptures) and at most 2x their memory; without it they grow exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LoraBank:
    """Stacked weights of every adapter attached to a PeftModel, applied through forward hooks."""

    def __init__(self, model: nn.Module, doubling: bool = False):
        self.model = model
        self.doubling = doubling  # grow the slots 2x when they run out (else to exactly what is needed)
        self.generation = 0  # bumped whenever a stack is reallocated (captured graphs are then stale)
        self.index: dict[str, int] = {}  # peft adapter name -> slot in the stacks
        self.slots = 0
        self.lora_layers: list[nn.Module] = []
        self.heads: list[nn.Module] = []
        self._rows: torch.Tensor | None = None  # slot of each batch row, set per forward
        self._stacks: dict[int, dict[str, torch.Tensor]] = {}
        self._peft_disabled = False
        self._hooks: list[Any] = []

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.index)

    def close(self) -> None:
        self.restore_peft()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def restore_peft(self) -> None:
        """Turn peft's own LoRA path back on (for peft's `adapter_names=` forward on this model)."""
        if self._peft_disabled:
            self.model.base_model.enable_adapter_layers()
            self._peft_disabled = False

    # ---- building -----------------------------------------------------------------------------
    def rebuild(self) -> None:
        """Bring the stacks in line with the adapters peft holds now (call after each attach / delete)."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]
        heads = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        if any(getattr(m, "lora_variant", None) for m in layers):
            raise NotImplementedError("the bank applies plain LoRA only (no DoRA / variants)")
        known = {id(m) for m in self.lora_layers + self.heads}
        self._hooks += [m.register_forward_hook(self._lora_hook) for m in layers if id(m) not in known]
        self._hooks += [m.register_forward_hook(self._head_hook) for m in heads if id(m) not in known]
        self.lora_layers, self.heads = layers, heads

        names = list(self.model.peft_config)
        gone = [n for n in self.index if n not in names]
        for n in gone:
            self.index.pop(n)
        added = [n for n in names if n not in self.index]
        free = sorted(set(range(self.slots)) - set(self.index.values()))
        if len(added) > len(free):  # out of slots: grow every stack
            need = len(self.index) + len(added)
            self.slots = max(need, 2 * self.slots if self.doubling else need)
            free = sorted(set(range(self.slots)) - set(self.index.values()))
        new_slots = dict(zip(added, free, strict=False))
        freed = set(free) - set(new_slots.values())  # includes the slots of adapters just removed
        self.index.update(new_slots)
        with torch.no_grad():
            for layer in self.lora_layers:
                self._update_layer(layer, new_slots, freed)
            for head in self.heads:
                self._update_head(head, new_slots, freed)

    def _update_layer(self, layer: nn.Module, new_slots: dict[str, int], freed: set[int]) -> None:
        present = [n for n in self.index if n in layer.lora_A]
        if not present:
            if self._stacks.pop(id(layer), None) is not None:
                self.generation += 1
            return
        a0, b0 = layer.lora_A[present[0]].weight, layer.lora_B[present[0]].weight
        r_max = max(layer.lora_A[n].weight.shape[0] for n in present)
        s = self._stacks.get(id(layer))
        if s is None or s["a"].shape[0] < self.slots or s["a"].shape[1] < r_max or s["a"].dtype != a0.dtype:
            old = s
            r = max(r_max, old["a"].shape[1] if old else 0)
            s = {  # an adapter that does not target this layer keeps zero rows: it adds nothing here
                "a": a0.new_zeros((self.slots, r, a0.shape[1])),  # (slots, r, in)
                "b": b0.new_zeros((self.slots, b0.shape[0], r)),  # (slots, out, r)
                "scale": torch.zeros(self.slots, dtype=a0.dtype, device=a0.device),
            }
            self._stacks[id(layer)] = s
            self.generation += 1
            new_slots = {n: self.index[n] for n in present}  # every adapter moves into the new stacks
        for i in freed:
            s["a"][i].zero_(), s["b"][i].zero_(), s["scale"][i].zero_()
        for n, i in new_slots.items():
            s["a"][i].zero_(), s["b"][i].zero_(), s["scale"][i].zero_()  # the slot may have held another
            if n not in layer.lora_A:
                continue
            wa, wb = layer.lora_A[n].weight, layer.lora_B[n].weight
            r = wa.shape[0]
            s["a"][i, :r].copy_(wa)
            s["b"][i, :, :r].copy_(wb)
            s["scale"][i] = layer.scaling[n]
            # zero-padded ranks add nothing; peft's own weights become views of the stack
            layer.lora_A[n].weight.data = s["a"][i, :r]
            layer.lora_B[n].weight.data = s["b"][i, :, :r]

    def _update_head(self, head: nn.Module, new_slots: dict[str, int], freed: set[int]) -> None:
        mods = {n: head.modules_to_save[n] for n in self.index}
        m0 = next(iter(mods.values()))
        s = self._stacks.get(id(head))
        if s is None or s["w"].shape[0] < self.slots or s["w"].dtype != m0.weight.dtype:
            s = {
                "w": m0.weight.new_zeros((self.slots, *m0.weight.shape)),
                "bias": m0.bias.new_zeros((self.slots, *m0.bias.shape)),
            }
            self._stacks[id(head)] = s
            self.generation += 1
            new_slots = dict(self.index)
        for i in freed:
            s["w"][i].zero_(), s["bias"][i].zero_()
        for n, i in new_slots.items():
            m = mods[n]
            s["w"][i].copy_(m.weight)
            s["bias"][i].copy_(m.bias)
            m.weight.data, m.bias.data = s["w"][i], s["bias"][i]

    # ---- inference ----------------------------------------------------------------------------
    def slots_of(self, adapter_names: list[str]) -> list[int]:
        """The stack slot of each row's adapter; KeyError names any adapter the bank does not hold."""
        missing = set(adapter_names) - self.index.keys()
        if missing:
            raise KeyError(f"adapters not in the bank: {sorted(missing)}")
        return [self.index[n] for n in adapter_names]

    def forward(self, adapter_names: list[str], **inputs: Any) -> Any:
        """Run the base with peft's adapters disabled; the hooks add each row's own adapter."""
        slots = self.slots_of(adapter_names)
        return self.forward_slots(torch.tensor(slots, device=inputs["input_ids"].device), **inputs)

    def forward_slots(self, slots: torch.Tensor, **inputs: Any) -> Any:
        """`forward` with the rows' slots already on the device (a CUDA graph captures this call).

        peft's path stays disabled after the call (until `restore_peft` or `close`): toggling it
        walks every module of the model, ~1 ms a batch on a 2-layer model, more than its forward."""
        self._rows = slots
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
        if self._rows is None or id(module) not in self._stacks:
            return None
        s = self._stacks[id(module)]
        x = args[0]
        rows = self._rows
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(s["w"].dtype)  # (b, T, in); T = 1 for pooled heads
        y = torch.bmm(x3, s["w"][rows].transpose(1, 2)) + s["bias"][rows].unsqueeze(1)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(output.dtype)
