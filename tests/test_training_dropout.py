"""training.dropout: the CPU dropout keeps dropout's distribution and replays under a seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.dropout import CPUDropout, use_cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keeps_1_minus_p_of_the_elements_and_the_mean(p, dtype):
    x = torch.ones(256, 1024, dtype=dtype)
    y = CPUDropout(p).train()(x).float()
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.005  # 262k elements: ~0.001 standard deviation
    assert abs(y.mean().item() - 1.0) < 0.01  # scaled by the inverse of the keep rate
    assert set(torch.unique(y).tolist()) <= {0.0, y.max().item()}


def test_same_seed_same_mask_eval_is_identity_and_the_gradient_is_the_mask():
    drop = CPUDropout(0.1).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    assert torch.equal(a, b)
    a.sum().backward()
    torch.testing.assert_close(x.grad * x.detach(), a.detach())  # grad = mask * scale
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(CPUDropout(0.0).train()(x), x)


def test_every_dropout_module_is_replaced():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.3), nn.ReLU()))
    assert use_cpu_dropout(model) == 2
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [type(m) for m in drops] == [CPUDropout, CPUDropout] and [m.p for m in drops] == [0.2, 0.3]
