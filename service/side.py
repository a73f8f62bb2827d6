"""The side model: where a new or replacing LoRA adapter is verified while the serving model keeps serving.

peft attaches an adapter by injecting modules into the model it wraps, so attaching (and running
the golden check) on the serving model would mutate it under a forward in flight, or stall the
batcher for the whole check (~100 ms of the ~120 ms a hot-swap took). The side model is a second
module tree over the *same weight tensors* as the serving base (deepcopy with every parameter and
buffer in the memo), so it costs module objects, not weights; adapters are attached to it on the
swap worker thread, golden-checked, and dropped again. Only the final attach to the serving model
happens on the batcher thread, between batches.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import torch
from torch import nn

from models.loading import DTYPES, attach_adapter


def cast_new_weights(model: nn.Module, dtype: str, device: torch.device) -> None:
    """Cast the tensors not yet in (dtype, device), i.e. a freshly attached adapter's.

    Same result as `model.to(...)` on a model whose base is cast already, at a fraction of the
    cost (~8 ms per call on MiniLM, paid twice per hot-swap: side and serving model)."""
    target = DTYPES[dtype]
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point() and (t.dtype != target or t.device != device):
            t.data = t.data.to(device=device, dtype=target)


class SideModel:
    def __init__(self, base: nn.Module, *, dtype: str, device: torch.device):
        # called before peft wraps the serving base: the copy holds plain modules over shared tensors
        shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        self.model: nn.Module = copy.deepcopy(base, shared)
        self.dtype, self.device = dtype, device
        self._ids = itertools.count()
        self._stale: list[str] = []  # peft 0.21 cannot delete its last adapter; dropped after the next attach

    def attach(self, path: Path) -> str:
        """Attach the adapter at `path` (cast like the serving model's); returns its peft name."""
        name = f"side{next(self._ids)}"
        self.model = attach_adapter(self.model, path, name)
        cast_new_weights(self.model, self.dtype, self.device)  # the shared base tensors are cast already
        for stale in self._stale:
            self._delete(stale)
        self._stale.clear()
        return name

    def drop(self, name: str) -> None:
        if len(self.model.peft_config) > 1:
            self._delete(name)
        else:
            self._stale.append(name)

    def _delete(self, name: str) -> None:
        with warnings.catch_warnings():  # "adapter was active ... setting active adapter to X": expected
            warnings.simplefilter("ignore", UserWarning)
            self.model.delete_adapter(name)
