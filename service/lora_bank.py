"""A bank of stacked LoRA weights over one plain classifier: rows of many adapters in one forward.

Every resident adapter owns a slot. Per target Linear the bank holds A (slots, r, in), B (slots,
out, r) and the scales; per head Linear the head weights of every slot. Forward hooks on those
layers gather each row's slot and apply two batched matmuls (`bmm`) — punica / S-LoRA's approach:
a batch mixing 32 adapters costs what a batch of one does (peft 0.21's `adapter_names=` loops over
the distinct adapters in every layer instead). There is no peft in the serving path at all: adapters
arrive as tensors (models.lora_weights.read_lora), so adding one is a slot copy and removing one
zeroes its slot. The golden check runs through the same bank (`view`), so a served adapter is one
whose logits, computed by this code, match what training recorded with peft.

Slots are stable: the stacks are reallocated only when they run out of slots, a larger rank or a
newly targeted layer arrives; each reallocation bumps `generation`. A CUDA graph captured over the
bank (service/graphs.py) reads the stacks by address and stays valid until `generation` changes.
With `doubling` (the service sets it on CUDA) slots double when they run out: N adapters cost
log2(N) reallocations and at most 2x their memory; without it they grow to one more than needed,
so that replacing an adapter (new version in before the old one is out) finds a free slot.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from models.lora_weights import LoraWeights


class LoraBank:
    """Stacked adapter weights over `model` (a plain transformers classifier), applied through hooks."""

    def __init__(self, model: nn.Module, *, doubling: bool = False):
        self.model = model
        self.modules = dict(model.named_modules())
        self._paths = {id(m): p for p, m in self.modules.items()}
        self.doubling = doubling
        self.generation = 0  # bumped whenever a stack is reallocated (captured graphs are then stale)
        self.index: dict[str, int] = {}  # adapter name -> slot
        self.slots = 0
        self._layers: dict[str, dict[str, torch.Tensor]] = {}  # module path -> a, b, scale stacks
        self._heads: dict[str, dict[str, torch.Tensor]] = {}  # module path -> w, bias stacks
        # slot of each batch row, set during a bank forward; per thread, so that forwards on several
        # threads (CPU lanes, benchmarks.ceiling --lanes) each apply their own rows' adapters
        self._local = threading.local()

    # ---- adding and removing ------------------------------------------------------------------
    @torch.no_grad()
    def add(self, name: str, w: LoraWeights) -> int:
        """Copy adapter `name` (tensors already in the model's dtype and device) into a free slot."""
        if name in self.index:
            raise ValueError(f"adapter {name!r} is already in the bank")
        free = sorted(set(range(self.slots)) - set(self.index.values()))
        if not free:
            self._grow(max(1, 2 * self.slots) if self.doubling else self.slots + 2)
            free = sorted(set(range(self.slots)) - set(self.index.values()))
        slot = free[0]
        try:
            for path, (a, b, scale) in w.layers.items():
                s = self._layer(path, a.shape[0])
                r = a.shape[0]
                s["a"][slot, :r].copy_(a)
                s["b"][slot, :, :r].copy_(b)
                s["scale"][slot] = scale
            for path, (weight, bias) in w.heads.items():
                s = self._head(path)
                s["w"][slot].copy_(weight)
                if bias is not None:
                    s["bias"][slot].copy_(bias)
        except Exception:  # never leave half an adapter in a slot the next one will reuse
            self._reset(slot)
            raise
        self.index[name] = slot
        return slot

    def fits(self, w: LoraWeights) -> bool:
        """Whether `add(w)` would only copy into a free slot: no stack reallocated, `generation` kept.
        Only such an add may run while another thread's forward reads the stacks (Runtime.commit_beside)."""
        if len(self.index) >= self.slots:
            return False
        layers_fit = all(
            p in self._layers and self._layers[p]["a"].shape[1] >= a.shape[0] for p, (a, _, _) in w.layers.items()
        )
        return layers_fit and all(p in self._heads for p in w.heads)

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Free `name`'s slot: zero LoRA rows (they add nothing), the base's own head in its head rows."""
        slot = self.index.pop(name)
        self._reset(slot)

    def _reset(self, slot: int) -> None:
        for s in self._layers.values():
            s["a"][slot].zero_(), s["b"][slot].zero_(), s["scale"][slot].zero_()
        for path, s in self._heads.items():
            base = self.modules[path]
            s["w"][slot].copy_(base.weight)
            if base.bias is not None:
                s["bias"][slot].copy_(base.bias)
            else:
                s["bias"][slot].zero_()

    def _grow(self, slots: int) -> None:
        old, self.slots = self.slots, slots
        for stacks in (*self._layers.values(), *self._heads.values()):
            for k, t in stacks.items():
                new = t.new_zeros((slots, *t.shape[1:]))
                new[:old].copy_(t)
                stacks[k] = new
        for slot in range(old, slots):
            for path, s in self._heads.items():
                base = self.modules[path]
                s["w"][slot].copy_(base.weight)
                if base.bias is not None:
                    s["bias"][slot].copy_(base.bias)
        self.generation += 1

    def _layer(self, path: str, r: int) -> dict[str, torch.Tensor]:
        s = self._layers.get(path)
        if s is not None and s["a"].shape[1] >= r:
            return s
        lin = self.modules[path]
        w = lin.weight
        r_all = max(r, s["a"].shape[1] if s else 0)
        new = {
            "a": w.new_zeros((self.slots, r_all, lin.in_features)),  # zero-padded ranks add nothing
            "b": w.new_zeros((self.slots, lin.out_features, r_all)),
            "scale": w.new_zeros(self.slots),
        }
        if s is None:
            lin.register_forward_hook(self._lora_hook)
        else:  # a larger rank than this layer held: re-stack the others zero-padded
            new["a"][:, : s["a"].shape[1]].copy_(s["a"])
            new["b"][:, :, : s["b"].shape[2]].copy_(s["b"])
            new["scale"].copy_(s["scale"])
        self._layers[path] = new
        self.generation += 1
        return new

    def _head(self, path: str) -> dict[str, torch.Tensor]:
        s = self._heads.get(path)
        if s is not None:
            return s
        lin = self.modules[path]
        # every slot starts as the base's own head: an adapter without a saved head uses it
        bias = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
        s = {
            "w": lin.weight.detach().expand(self.slots, -1, -1).clone(),
            "bias": bias.detach().expand(self.slots, -1).clone(),
        }
        self._heads[path] = s
        # before any LoRA hook on this layer: the head hook replaces the output, so a LoRA hook that ran first
        # (another adapter's LoRA on a layer this adapter saves whole, e.g. BERT's pooler.dense) would be discarded
        lin.register_forward_hook(self._head_hook, prepend=True)
        self.generation += 1
        return s

    # ---- inference ----------------------------------------------------------------------------
    def slots_of(self, adapter_names: list[str]) -> list[int]:
        """The slot of each row's adapter; KeyError names any adapter the bank does not hold."""
        missing = set(adapter_names) - self.index.keys()
        if missing:
            raise KeyError(f"adapters not in the bank: {sorted(missing)}")
        return [self.index[n] for n in adapter_names]

    def forward(self, adapter_names: list[str], **inputs: Any) -> Any:
        """The model's output with each row computed by its own adapter."""
        slots = self.slots_of(adapter_names)
        return self.forward_slots(torch.tensor(slots, device=inputs["input_ids"].device), **inputs)

    def forward_slots(self, slots: torch.Tensor, **inputs: Any) -> Any:
        """`forward` with the rows' slots already on the device (a CUDA graph captures this call)."""
        self._local.rows = slots
        try:
            return self.model(**inputs)
        finally:
            self._local.rows = None

    def view(self, name: str) -> BankView:
        """A module that runs every row through adapter `name` (for golden checks via models.variant)."""
        return BankView(self, name)

    def _lora_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        rows = getattr(self._local, "rows", None)
        if rows is None:
            return None  # a forward outside the bank: the plain base
        s = self._layers[self._paths[id(module)]]
        x = args[0]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(s["a"].dtype)  # (b, L, in); L = 1 for pooled inputs
        xa = torch.bmm(x3, s["a"][rows].transpose(1, 2))  # (b, L, r)
        xa = xa * s["scale"][rows].view(-1, 1, 1)
        y = torch.bmm(xa, s["b"][rows].transpose(1, 2))  # (b, L, out)
        return output + y.reshape(output.shape).to(output.dtype)

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        rows = getattr(self._local, "rows", None)
        if rows is None:
            return None
        s = self._heads[self._paths[id(module)]]
        x = args[0]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(s["w"].dtype)  # (b, T, in); T = 1 for pooled heads
        y = torch.bmm(x3, s["w"][rows].transpose(1, 2)) + s["bias"][rows].unsqueeze(1)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(output.dtype)


class BankView(nn.Module):
    """Adapter `name` of a bank as a classifier module: `view(input_ids=..., attention_mask=...)`."""

    def __init__(self, bank: LoraBank, name: str):
        super().__init__()
        self.bank, self.name = bank, name
        self.base = bank.model  # registered, so .parameters() gives the device and dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        slots = torch.full((input_ids.shape[0],), self.bank.index[self.name], device=input_ids.device)
        return self.bank.forward_slots(slots, input_ids=input_ids, attention_mask=attention_mask, **kw)
