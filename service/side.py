"""The side model: where a new or replacing LoRA adapter is golden-checked while the serving model serves.

The check runs the adapter through a LoraBank (service/lora_bank.py) exactly as serving will, but
not in the serving bank: an unchecked adapter never sits in a serving slot, and adding it could
reallocate the serving stacks under a running batch. The side model is a second module tree over
the *same weight tensors* as the serving base (deepcopy with every parameter and buffer in the
memo), with a bank of its own: it costs module objects, not weights. The swap worker adds the
adapter there, checks it, removes it; then only a slot copy into the serving bank remains
(Runtime.commit_beside, or the batcher between batches when the stacks must grow).
"""

from __future__ import annotations

import copy
import itertools
import threading

from torch import nn

from models.lora_weights import LoraWeights
from service.lora_bank import BankView, LoraBank


class SideModel:
    def __init__(self, base: nn.Module):
        shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        self.model: nn.Module = copy.deepcopy(base, shared)
        self.bank = LoraBank(self.model)
        self._ids = itertools.count()
        # the swap worker (Runtime.prepare) and the batcher thread (Runtime.load of a PUT queued before the
        # engine was ready) may check at once: LoraBank.add/remove pick and free slots unlocked
        self._lock = threading.Lock()

    def add(self, weights: LoraWeights) -> BankView:
        """The adapter in the side bank, as a classifier module; `remove` it after the check."""
        name = f"side{next(self._ids)}"
        with self._lock:
            self.bank.add(name, weights)
        return self.bank.view(name)

    def remove(self, view: BankView) -> None:
        with self._lock:
            self.bank.remove(view.name)
