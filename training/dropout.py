"""Dropout whose mask is cheap to draw on a CPU: what the training loop trains with there.

Why our own (profiled, issue 9): torch's CPU dropout draws one mt19937 number per element
(`bernoulli_`), in sequence on one thread. In a MiniLM training step (2-core Xeon, bf16 autocast,
batch 16 x 64 tokens) its 20 dropout calls took 6.4 ms each, 25 % of the step's CPU time; HF's SDPA
attention applies its probability dropout the same way inside the math kernel it falls back to when
training.

Here the mask comes from 16-bit random numbers, four per 64-bit word: an element is kept when its
number falls under round((1 - p) * 65536), so p is exact to 1/65536, and kept values are scaled by
the inverse of that exact rate (as torch scales by 1/(1-p)): the expectation is unchanged.
The words come from numpy's SFC64 generator, seeded by one draw of torch's global generator per call,
so `set_seed` and a resumed run's saved RNG state replay every mask as before. The mask is made in
numpy (compare, then the bit pattern of 1.0 in the activation's dtype) and viewed as a tensor without a
copy. Measured on this project's 2-core Xeon with AMX (16 x 12 x 64 x 64 bf16 attention probabilities,
one process): a whole call 2.37 ms with torch's mt19937 words and mask, 1.07 ms this way; the parts:
words 1.06 vs 0.39 ms, compare 0.34 vs 0.11 ms, bool -> bf16 0.50 ms vs the bit pattern 0.19 ms.

CUDA keeps torch's dropout (Philox inside the kernels) and SDPA's fused attention dropout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_LEVELS = 1 << 16
# The bits of 1.0 in each activation dtype, as the signed integer of the same width (numpy has no bf16).
_ONE_BITS: dict[torch.dtype, tuple[type[np.integer], int]] = {
    torch.float32: (np.int32, 0x3F800000),
    torch.bfloat16: (np.int16, 0x3F80),
    torch.float16: (np.int16, 0x3C00),
}


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A 0/1 mask of x's shape and dtype keeping each element with probability round((1-p)*65536)/65536,
    and the scale (the inverse of that rate) that keeps the expectation."""
    keep = round((1 - p) * _LEVELS)
    n = x.numel()
    # One draw of torch's generator seeds this call's words (a CPU tensor: no device read).
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).numpy()[0]
    words = np.random.SFC64(int(seed)).random_raw((n + 3) // 4)
    bits = words.view(np.int16)[:n]  # uniform over [-32768, 32767]
    np_int, one = _ONE_BITS[x.dtype]
    mask = (bits < keep - _LEVELS // 2).astype(np_int) * np_int(one)
    return torch.from_numpy(mask).view(x.dtype).view(x.shape), _LEVELS / keep


class CPUDropout(nn.Dropout):
    """nn.Dropout with its mask drawn by `keep_mask` (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or x.dtype not in _ONE_BITS:
            return super().forward(x)
        mask, scale = keep_mask(x, self.p)
        # The scale as a Python number: each kept value is rounded once, not biased by a rounded scale.
        return (x * mask).mul_(scale)


def use_cpu_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout in `model` (hidden, attention probabilities under eager attention,
    LoRA's) with CPUDropout of the same p; returns how many were replaced."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, CPUDropout(child.p, child.inplace))
                swapped += 1
    return swapped
