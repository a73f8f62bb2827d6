"""Eager (CPU) batches split into forwards of similar-length rows: the split is optimal and the
logits are those of one forward per row, for full variants and mixed LoRA batches."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from tiny import GOLDEN_TEXTS, make_store

from models.loading import length_chunks


def _best_cost(lens: list[int], overhead: int) -> int:
    """Brute force over every way to cut the sorted lengths into contiguous chunks."""
    s = sorted(lens)
    best = None
    for cuts in itertools.product([False, True], repeat=len(s) - 1):
        cost, start = 0, 0
        for i, cut in enumerate([*cuts, True]):
            if cut:
                cost += (i + 1 - start) * s[i] + overhead
                start = i + 1
        best = cost if best is None else min(best, cost)
    return best


def test_length_chunks_is_an_optimal_partition():
    rng = np.random.default_rng(0)
    for _ in range(60):
        lens = rng.integers(1, 60, int(rng.integers(1, 9))).tolist()
        overhead = int(rng.integers(0, 80))
        chunks = length_chunks(lens, overhead)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lens)))  # every row, once
        arr = np.asarray(lens)
        assert sum(len(c) * int(arr[c].max()) + overhead for c in chunks) == _best_cost(lens, overhead)
    assert length_chunks([7, 7, 7], 0) and len(length_chunks([7, 7, 7], 0)) == 1  # no padding: nothing to gain
    assert len(length_chunks([3, 100], 1000)) == 1  # a forward's fixed cost outweighs the padding saved


def test_chunked_forward_equals_one_forward_per_row(tmp_path):
    from service.config import ServiceConfig
    from service.engine import Engine

    store = make_store(tmp_path / "store", arch="bert", n_adapters=2, full=True)
    engine = Engine(ServiceConfig(store=store.root, precision="fp32"), f"unix://{tmp_path}/unused.sock")
    rt = engine.runtime
    if rt.base is None:
        rt.load_base()
    for name in ("full", "lora-0", "lora-1"):
        rt.load(name)
    texts = [t * k for t, k in zip(GOLDEN_TEXTS * 2, [1, 5, 2, 9, 1, 3, 7, 2], strict=False)]
    for names in (["full"] * len(texts), [f"lora-{i % 2}" for i in range(len(texts))]):
        entries = [rt.entries[n] for n in names]
        rows = [entries[0].encode([t])[0] for t in texts]
        assert len({len(r) for r in rows}) > 2
        key = "lora-base" if entries[0].kind == "lora" else "full"
        rt._costs[key] = (0.0, 1e-5)  # no fixed cost: every distinct length its own forward
        chunked = rt.forward(entries, rows)
        assert len(length_chunks([len(r) for r in rows], 0)) > 1
        alone = torch.cat([rt.forward([e], [r]) for e, r in zip(entries, rows, strict=True)])
        torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=1e-4)
    rt._costs.clear()
    fixed, per_token = rt._cost(rt.entries["full"])  # the probe itself: two timed forwards
    assert fixed > 0 and rt.batch_cost_s([rt.entries["full"]], rows) >= fixed
