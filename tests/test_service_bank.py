"""service.lora_bank: stacked-weight mixed batches equal peft's own per-adapter path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from models.loading import attach_adapter
from service.lora_bank import LoraBank
from tests.tiny import tiny_classifier, tiny_lora, tokenizer

TEXTS = ["hello world", "stocks fell sharply today in a long sentence", "the team won", "x", "another one"]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bank_equals_peft_mixed_batches(arch: str, tmp_path: Path) -> None:
    base = tiny_classifier(arch)
    tiny_lora(base, seed=1, r=4).save_pretrained(tmp_path / "a0")
    tiny_lora(base, seed=2, r=8).save_pretrained(tmp_path / "a1")  # another rank
    tiny_lora(base, seed=3, r=2, targets=("query",)).save_pretrained(tmp_path / "a2")  # other layers
    model = copy.deepcopy(base)
    for name in ("a0", "a1", "a2"):
        model = attach_adapter(model, tmp_path / name, name)
    bank = LoraBank(model)
    bank.rebuild()
    enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    names = ["a0", "a1", "a2", "a1", "a0"]
    with torch.inference_mode():
        ref = model(**enc, adapter_names=names).logits
        got = bank.forward(names, **enc).logits
        bank.restore_peft()  # peft's path stays off after a bank forward until restored
        after = model(**enc, adapter_names=names).logits  # hooks are inert outside a bank forward
    assert ref.abs().mean() > 0.05  # adapters really change the output
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert torch.equal(after, ref)
    # rows of one adapter differ from another's: the bank really routes per row
    assert not torch.allclose(got[0], bank.forward(["a1"] * 5, **enc).logits[0], atol=1e-3)

    model.delete_adapter("a1")
    bank.close()
    bank = LoraBank(model)
    bank.rebuild()
    names = ["a0", "a2", "a2", "a0", "a2"]
    with torch.inference_mode():
        ref = model(**enc, adapter_names=names).logits
        got = bank.forward(names, **enc).logits
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(KeyError, match="a1"):
        bank.forward(["a1"] * 5, **enc)


def test_bank_shares_memory_with_peft_weights(tmp_path: Path) -> None:
    base = tiny_classifier("bert")
    for i in range(3):
        tiny_lora(base, seed=i).save_pretrained(tmp_path / f"a{i}")
    model = copy.deepcopy(base)
    for i in range(3):
        model = attach_adapter(model, tmp_path / f"a{i}", f"a{i}")
    bank = LoraBank(model)
    bank.rebuild()
    layer = bank.lora_layers[0]
    stack = bank._stacks[id(layer)]["a"]
    for i in range(3):  # peft's weights are views into the stack: adapters are not held twice
        assert layer.lora_A[f"a{i}"].weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
