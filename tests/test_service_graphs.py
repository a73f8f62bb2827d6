"""service.graphs + the LoRA bank's stable slots: what a CUDA graph replays, checked on CPU.

The capture itself needs a GPU (scripts/gpu_bench.sh runs it); here the same bucketed static-buffer
path runs eagerly (`capture=False`) on real tiny models and must give the eager forward's logits.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from models.loading import attach_adapter, pad_rows, query_key_mask
from service.graphs import LENGTH_BUCKETS, ROW_BUCKETS, GraphedForward, bucket
from service.lora_bank import LoraBank
from tests.tiny import tiny_classifier, tiny_lora, tokenizer

TEXTS = ["hello world", "stocks fell sharply today in a long sentence", "the team won", "x", "another one"]


def _rows(texts: list[str]) -> list[list[int]]:
    return tokenizer()(texts)["input_ids"]


def test_pad_rows_fills_a_bucket_without_all_masked_rows() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8]], 0, height=4, width=16)
    assert ids.shape == mask.shape == (4, 16)
    assert ids[0, :3].tolist() == [5, 6, 7] and ids[1, :1].tolist() == [8] and int(ids[:, 3:].sum()) == 0
    assert mask.sum(1).tolist() == [3, 1, 1, 1]  # filler rows attend to their one pad token
    with pytest.raises(ValueError, match="do not fit"):
        pad_rows([[1] * 20], 0, width=16)
    assert bucket(5, ROW_BUCKETS) == 8 and bucket(17, LENGTH_BUCKETS) == 32 and bucket(10_000, LENGTH_BUCKETS) is None


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bucketed_static_forward_equals_eager(arch: str) -> None:
    model = tiny_classifier(arch).eval()
    pad = tokenizer().pad_token_id
    runner = GraphedForward(
        lambda ids, mask, _: model(input_ids=ids, attention_mask=query_key_mask(mask)).logits,
        device=torch.device("cpu"),
        pad_id=pad,
        with_slots=False,
        capture=False,
    )
    with torch.inference_mode():
        for texts in (TEXTS, TEXTS[:1], TEXTS[1:4], TEXTS * 5):
            ids, mask = pad_rows(_rows(texts), pad)
            ref = model(input_ids=ids, attention_mask=mask).logits
            got = runner(_rows(texts))
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert runner.state()["captured"] == ["1x16", "32x16", "4x16", "8x16"]  # buckets, reused across calls
    assert runner.eager == 0


def test_bank_slots_through_static_buffers_equal_peft_and_survive_swaps(tmp_path: Path) -> None:
    """Slots are stable across adds/removes (generation unchanged within capacity), rows route per slot."""
    base = tiny_classifier("roberta")
    for i in range(4):
        tiny_lora(base, seed=i + 1, r=4 if i % 2 else 8).save_pretrained(tmp_path / f"a{i}")
    model = copy.deepcopy(base)
    for name in ("a0", "a1"):
        model = attach_adapter(model, tmp_path / name, name)
    bank = LoraBank(model, doubling=True)
    bank.rebuild()
    gen = bank.generation
    pad = tokenizer().pad_token_id
    runner = GraphedForward(
        lambda ids, mask, slots: bank.forward_slots(slots, input_ids=ids, attention_mask=query_key_mask(mask)).logits,
        device=torch.device("cpu"),
        pad_id=pad,
        with_slots=True,
        capture=False,
        key=lambda: bank.generation,
    )

    def check(names: list[str]) -> None:
        enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
        with torch.inference_mode():
            bank.restore_peft()
            ref = model(**enc, adapter_names=names).logits
            got = runner(_rows(TEXTS), bank.slots_of(names))
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()

    check(["a0", "a1", "a1", "a0", "a1"])
    slot_a1 = bank.index["a1"]
    model.delete_adapter("a0")  # a hot-swap: one adapter out, one in
    model = attach_adapter(model, tmp_path / "a2", "a2")
    bank.rebuild()
    assert bank.index["a1"] == slot_a1 and bank.generation == gen  # in place: a captured graph stays valid
    check(["a2", "a1", "a1", "a2", "a2"])
    model = attach_adapter(model, tmp_path / "a3", "a3")  # a third: 2 slots -> 4, stacks reallocated
    bank.rebuild()
    assert bank.index["a1"] == slot_a1 and bank.generation > gen and bank.slots == 4
    gen = bank.generation
    check(["a2", "a1", "a3", "a3", "a2"])
    with pytest.raises(KeyError, match="a0"):
        bank.slots_of(["a0"])
    model = attach_adapter(model, tmp_path / "a0", "a0b")  # the fourth fits the reserved slots
    bank.rebuild()
    assert bank.generation == gen and bank.slots == 4
    model = attach_adapter(model, tmp_path / "a0", "a0c")  # a fifth does not: the stacks grow (doubling)
    bank.rebuild()
    assert bank.generation > gen and bank.slots == 8
    check(["a0b", "a1", "a2", "a3", "a0c"])
