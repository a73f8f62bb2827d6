"""service.lora_bank over adapters read by models.lora_weights: mixed batches equal peft's own path.

peft (which trained and saved the adapters) is the reference: each row of a bank forward must give
what peft gives for that row's adapter.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from models.loading import attach_adapter, pad_rows, query_key_mask
from models.lora_weights import LoraWeights, read_lora
from models.store import VariantRefused
from service.graphs import GraphedForward
from service.lora_bank import LoraBank
from tests.tiny import tiny_classifier, tiny_lora, tokenizer

TEXTS = ["hello world", "stocks fell sharply today in a long sentence", "the team won", "x", "another one"]


def _adapters(tmp_path: Path, base: torch.nn.Module) -> dict[str, Path]:
    specs = {"a0": dict(seed=1, r=4), "a1": dict(seed=2, r=8), "a2": dict(seed=3, r=2, targets=("query",))}
    # "dense" matches Linears fed (batch, hidden), not (batch, tokens, hidden): BERT's pooler, RoBERTa's head
    specs["a3"] = dict(seed=4, r=4, targets=("query", "dense"))
    for name, kw in specs.items():
        tiny_lora(base, **kw).save_pretrained(tmp_path / name)  # other ranks, other target layers
    return {n: tmp_path / n for n in specs}


def _peft(base: torch.nn.Module, paths: dict[str, Path]) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for name, p in paths.items():
        model = attach_adapter(model, p, name)
    return model.eval()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bank_equals_peft_mixed_batches(arch: str, tmp_path: Path) -> None:
    base = tiny_classifier(arch).eval()
    paths = _adapters(tmp_path, base)
    ref_model = _peft(base, paths)
    bank = LoraBank(copy.deepcopy(base))
    for name, p in paths.items():
        bank.add(name, read_lora(name, p, bank.model))
    enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    names = ["a0", "a1", "a2", "a1", "a3"]
    with torch.inference_mode():
        ref = ref_model(**enc, adapter_names=names).logits
        got = bank.forward(names, **enc).logits
        plain = bank.model(**enc).logits  # outside a bank forward the hooks are inert
        view = bank.view("a1")(**enc).logits
    assert ref.abs().mean() > 0.05  # adapters really change the output
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert torch.allclose(plain, base(**enc).logits, atol=1e-6)
    assert torch.allclose(view[1], got[1], atol=1e-5) and not torch.allclose(view[0], got[0], atol=1e-3)

    bank.remove("a1")  # its slot is freed and reused; the others keep theirs
    slots = dict(bank.index)
    bank.add("a1b", read_lora("a1b", paths["a1"], bank.model))
    assert bank.index["a1b"] not in slots.values() or bank.index["a1b"] == 1
    assert {k: bank.index[k] for k in slots} == slots
    with torch.inference_mode():
        again = bank.forward(["a0", "a1b", "a2", "a1b", "a3"], **enc).logits
    assert torch.allclose(again, ref, atol=1e-5)
    with pytest.raises(KeyError, match="a1"):
        bank.slots_of(["a1"])


def _random_peft(base: torch.nn.Module, seed: int, **cfg) -> torch.nn.Module:
    """A peft model over a copy of `base` with LoraConfig(**cfg) and random (non-zero) trainable weights."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


def _bank_and_peft_alone(base: torch.nn.Module, bank: LoraBank, paths: dict[str, Path], names: list[str]):
    """(the bank's logits for a batch mixing `names`, peft's: each adapter run alone, its rows picked out; peft's
    own mixed batch needs every adapter to save the same modules)."""
    enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        alone = {n: _peft(base, {n: p})(**enc).logits for n, p in paths.items()}
        return bank.forward(names, **enc).logits, torch.stack([alone[n][i] for i, n in enumerate(names)])


@pytest.mark.parametrize("first", ["lora", "head"])
def test_a_layer_one_adapter_adapts_and_another_saves_whole(first: str, tmp_path: Path) -> None:
    """BERT's pooler.dense: LoRA in adapter "lora" (target "dense"), saved whole in adapter "head"
    (modules_to_save). Each row gets its own adapter's pooler whatever order they were added in (was: with
    "lora" added first, its rows lost the pooler's LoRA: the head hook, run after it, recomputed the output)."""
    base = tiny_classifier("bert").eval()
    specs = {
        "lora": dict(r=8, lora_alpha=16, target_modules=["query", "dense"], modules_to_save=["classifier"]),
        "head": dict(r=2, lora_alpha=4, target_modules=["value"], modules_to_save=["pooler.dense", "classifier"]),
    }
    paths = {n: tmp_path / n for n in specs}
    for seed, (name, cfg) in enumerate(specs.items()):
        _random_peft(base, seed, **cfg).save_pretrained(paths[name])
    bank = LoraBank(copy.deepcopy(base))
    for name in (first, *(n for n in specs if n != first)):
        bank.add(name, read_lora(name, paths[name], bank.model))
    assert "bert.pooler.dense" in bank._layers and "bert.pooler.dense" in bank._heads
    got, ref = _bank_and_peft_alone(base, bank, paths, ["lora", "head", "lora", "head", "lora"])
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize(("arch", "saved"), [("bert", ["pooler", "classifier"]), ("roberta", ["classifier"])])
def test_a_saved_composite_module_is_served_as_its_inner_layers(arch: str, saved: list[str], tmp_path: Path) -> None:
    """modules_to_save naming a composite (BERT's pooler, RoBERTa's classifier: peft's own SEQ_CLS default) is
    saved as its inner Linears' tensors: each is a head layer, rows mixed with other adapters equal peft (was:
    refused, "tensor ... is not plain LoRA A/B or a saved head layer"). A saved non-Linear is refused, saying so."""
    base = tiny_classifier(arch).eval()
    paths = _adapters(tmp_path, base)
    _random_peft(base, 7, r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=saved).save_pretrained(
        tmp_path / "composite"
    )
    paths = {"a1": paths["a1"], "composite": tmp_path / "composite", "a3": paths["a3"]}
    bank = LoraBank(copy.deepcopy(base))
    for name, p in paths.items():
        bank.add(name, read_lora(name, p, bank.model))
    got, ref = _bank_and_peft_alone(base, bank, paths, ["composite", "a1", "composite", "a3", "a1"])
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    _random_peft(base, 8, r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["LayerNorm"]).save_pretrained(
        tmp_path / "norm"
    )
    with pytest.raises(VariantRefused, match="a saved LayerNorm .*save only Linear layers"):
        read_lora("norm", tmp_path / "norm", base)


def test_bank_slots_are_stable_through_static_buffers(tmp_path: Path) -> None:
    """What a CUDA graph replays, on CPU: buckets + slots; in-place swaps keep `generation` (graphs stay valid)."""
    base = tiny_classifier("roberta").eval()
    paths = _adapters(tmp_path, base)
    ref_model = _peft(base, paths)
    bank = LoraBank(copy.deepcopy(base), doubling=True)
    bank.add("a0", read_lora("a0", paths["a0"], bank.model))
    bank.add("a1", read_lora("a1", paths["a1"], bank.model))
    gen, pad = bank.generation, tokenizer().pad_token_id
    runner = GraphedForward(
        lambda ids, mask, slots: bank.forward_slots(slots, input_ids=ids, attention_mask=query_key_mask(mask)).logits,
        device=torch.device("cpu"),
        pad_id=pad,
        with_slots=True,
        capture=False,
        key=lambda: bank.generation,
    )
    rows = tokenizer()(TEXTS)["input_ids"]

    def check(names: list[str], served: list[str]) -> None:
        enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ref = ref_model(**enc, adapter_names=names).logits
            got = runner(rows, bank.slots_of(served))
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()

    check(["a0", "a1", "a1", "a0", "a1"], ["a0", "a1", "a1", "a0", "a1"])
    slot_a1 = bank.index["a1"]
    bank.remove("a0")  # a hot-swap: one out, one in: same slots, same stacks
    bank.add("a2", read_lora("a2", paths["a2"], bank.model))
    assert bank.index["a1"] == slot_a1 and bank.generation == gen
    check(["a2", "a1", "a1", "a2", "a2"], ["a2", "a1", "a1", "a2", "a2"])
    bank.add("a0", read_lora("a0", paths["a0"], bank.model))  # a third: 2 slots -> 4, stacks reallocated
    assert bank.generation > gen and bank.slots == 4 and bank.index["a1"] == slot_a1
    check(["a2", "a1", "a0", "a0", "a2"], ["a2", "a1", "a0", "a0", "a2"])
    ids, mask = pad_rows(rows, pad)
    assert runner.state()["captured"] == ["8x16"] and ids.shape == (5, 10)


def test_read_lora_refuses_what_the_bank_cannot_serve(tmp_path: Path) -> None:
    base = tiny_classifier("bert").eval()
    tiny_lora(base, seed=1).save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(use_dora=True, bias="all", alora_invocation_tokens=[5, 6], init_lora_weights="pissa_niter_4")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VariantRefused) as e:
        read_lora("a", tmp_path / "a", base)
    for option in ("use_dora", "bias", "alora_invocation_tokens", "pissa"):
        assert any(option in r for r in e.value.reasons), (option, e.value.reasons)
    other = tiny_classifier("roberta")  # a base whose layers the adapter's tensors do not fit
    cfg.update(use_dora=False, bias="none", alora_invocation_tokens=None, init_lora_weights=True)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VariantRefused, match="not an nn.Linear|do not fit"):
        read_lora("a", tmp_path / "a", other)


def test_a_failed_add_leaves_no_trace_in_the_slot(tmp_path: Path) -> None:
    base = tiny_classifier("bert").eval()
    paths = _adapters(tmp_path, base)
    bank = LoraBank(copy.deepcopy(base))
    good = read_lora("a0", paths["a0"], bank.model)
    first = next(iter(good.layers))
    bad = LoraWeights(dict(good.layers), dict(good.heads))
    bad.layers["zz"] = (torch.ones(4, 3), torch.ones(3, 4), 1.0)  # no such layer: fails after `first` was written
    with pytest.raises(KeyError):
        bank.add("bad", bad)
    assert "bad" not in bank.index and float(bank._layers[first]["a"].abs().sum()) == 0.0
    bank.add("a1", read_lora("a1", paths["a1"], bank.model))  # reuses the slot: only its own weights count
    enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = _peft(base, {"a1": paths["a1"]})(**enc, adapter_names=["a1"] * len(TEXTS)).logits
        assert torch.allclose(bank.forward(["a1"] * len(TEXTS), **enc).logits, ref, atol=1e-5)


def test_bank_forwards_on_two_threads_apply_their_own_rows(tmp_path: Path) -> None:
    """Each thread's forward applies its own rows' adapters (the rows are thread-local), as sequentially."""
    from concurrent.futures import ThreadPoolExecutor

    base = tiny_classifier("bert").eval()
    paths = _adapters(tmp_path, base)
    bank = LoraBank(copy.deepcopy(base))
    for name, p in paths.items():
        bank.add(name, read_lora(name, p, bank.model))
    enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    mixes = [["a0"] * 5, ["a1"] * 5, ["a2", "a0", "a1", "a2", "a0"]]
    with torch.inference_mode():
        alone = [bank.forward(m, **enc).logits for m in mixes]

        def run(i: int) -> torch.Tensor:
            return torch.stack([bank.forward(mixes[i % 3], **enc).logits for _ in range(20)])

        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(run, range(6)))
    for i, out in enumerate(outs):
        assert torch.allclose(out, alone[i % 3].expand_as(out), atol=1e-5), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linears_serve_what_the_plain_model_serves(dtype: torch.dtype, tmp_path: Path) -> None:
    """service.runtime.prepack_linears: every Linear packed once; plain logits and a mixed bank batch (its
    hooks still run over packed layers) equal the unpacked model's; the side model's copy shares them."""
    from service.runtime import prepack_linears
    from service.side import SideModel

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN computes no bf16 on this CPU (the runtime leaves such models unpacked)")
    base = tiny_classifier("bert").eval().to(dtype)
    paths = _adapters(tmp_path, base)
    plain, packed = LoraBank(copy.deepcopy(base)), LoraBank(copy.deepcopy(base))
    linears = [m for m in packed.model.modules() if type(m) is torch.nn.Linear]
    assert len(prepack_linears(packed.model)) == len(linears) > 0
    for bank in (plain, packed):
        for name, p in paths.items():
            bank.add(name, read_lora(name, p, bank.model))
    enc = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    names = ["a0", "a1", "a2", "a1", "a3"]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        for got, ref in (
            (packed.model(**enc).logits, plain.model(**enc).logits),
            (packed.forward(names, **enc).logits, plain.forward(names, **enc).logits),
        ):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
        assert not torch.allclose(packed.forward(names, **enc).logits.float(), packed.model(**enc).logits.float())
    serving = copy.deepcopy(base)  # as the runtime builds it: packed, then the side model over it
    prepack_linears(serving)
    side = SideModel(serving)
    pairs = zip(serving.modules(), side.model.modules(), strict=True)
    assert all(a.packed_weight is b.packed_weight for a, b in pairs if type(a) is torch.nn.Linear)


def test_the_runtime_keeps_prepacked_linears_only_where_they_measured_faster(tmp_path: Path) -> None:
    """Runtime._serving probes each architecture once, plain vs packed; the model keeps what won, whole."""
    from service.config import ServiceConfig
    from service.runtime import Runtime
    from tests.tiny import make_store

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=True)
    rt = Runtime(store, ServiceConfig(store=store.root, precision="fp32"))
    rt.load_base()
    full = rt.load("full").model
    assert len(rt.model_prepack) == 1  # the base and "full" share an architecture: probed once
    (kept,) = rt.model_prepack.values()
    for model in (rt.base, full):
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        assert all(("forward" in m.__dict__) == kept and hasattr(m, "packed_weight") == kept for m in linears)
    off = Runtime(store, ServiceConfig(store=store.root, precision="fp32", cpu_prepack=False))
    off.load_base()
    assert not off.model_prepack and not any(hasattr(m, "packed_weight") for m in off.base.modules())


LONG = "Stocks fell sharply on Wall Street as oil prices climbed and investors worried about the economy again today."


def _runtime(store):
    from service.config import ServiceConfig
    from service.runtime import Runtime

    rt = Runtime(store, ServiceConfig(store=store.root, precision="fp32", cpu_prepack=False))
    rt.load_base()
    return rt


def test_each_adapter_is_served_with_its_own_truncation_length(tmp_path: Path) -> None:
    """Adapters over one base with other max_length: over HTTP (the front-end tokenises, fetching the
    tokenizer by key) each answers a long text as the variant alone (was: every adapter truncated to the
    max_length of whichever entry first held the base tokenizer's one key)."""
    import numpy as np
    from service_helpers import running, write_lora

    from models.variant import load_variant
    from tests.tiny import make_store

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)  # lora-0: max_length 64
    write_lora(store, "short", seed=9, max_length=8)
    with running(store.root) as srv:
        for name in ("lora-0", "short"):
            alone = torch.softmax(load_variant(store, name).logits([LONG]), -1).tolist()
            np.testing.assert_allclose(srv.probs(name, [LONG]), alone, atol=1e-4)


def _left_truncating_tokenizer(tmp_path: Path):
    """The tests' tokenizer with truncation_side "left" in its tokenizer_config.json (kept: a long text's end)."""
    directory = tmp_path / "left-tokenizer"
    tokenizer().save_pretrained(str(directory))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "truncation_side": "left"}))
    from models.loading import load_tokenizer

    tok = load_tokenizer(directory)
    assert tok.truncation_side == "left"
    return tok


def test_a_left_truncating_tokenizer_is_honoured_by_the_front_end(tmp_path: Path) -> None:
    """A variant whose tokenizer truncates on the left (tokenizer_config.json truncation_side, which training's
    encode and load_variant honour, and which tokenizer.json does not carry) is answered over HTTP as the
    variant alone scores it (was: the front-end rebuilt the tokenizer from tokenizer.json and cut every long
    text's end off, so the service scored the opening words that training and eval had dropped)."""
    import numpy as np
    from service_helpers import running

    from models import Store
    from models.loading import fingerprint
    from models.variant import load_variant
    from models.writing import write_variant
    from tests.tiny import GOLDEN_TEXTS, LABELS

    store = Store(tmp_path / "store")
    model = tiny_classifier("bert", seed=7)
    with torch.no_grad():  # logits large enough that which tokens were kept shows
        model.classifier.weight.mul_(200)
    write_variant(
        store,
        name="left",
        kind="full",
        model=model,
        tokenizer=_left_truncating_tokenizer(tmp_path),
        labels=LABELS,
        max_length=12,
        base_model="tiny-bert",
        base_fingerprint=fingerprint(model),
        init="random",
        golden_texts=GOLDEN_TEXTS,
    )
    alone = load_variant(store, "left")
    expected = alone.logits([LONG])  # what training's encode and eval score: LONG's last tokens
    alone.tokenizer.truncation_side = "right"
    assert (expected - alone.logits([LONG])).abs().max() > 1e-3  # the ends differ by far more than atol below
    with running(store.root) as srv:
        r = srv.client.post("/models/left", json={"inputs": [LONG], "parameters": {"function_to_apply": "none"}})
        assert r.status_code == 200, r.text
        served = [[next(x["score"] for x in r.json()[0] if x["label"] == label) for label in LABELS]]
    np.testing.assert_allclose(served, expected.tolist(), atol=1e-4)


def test_an_adapter_whose_tokenizer_truncates_on_the_other_side_is_refused(tmp_path: Path) -> None:
    """An adapter trained with a left-truncating tokenizer over a base whose tokenizer truncates on the right:
    tokenizer.json is the same, so the tokenizer check passed, and the service (base tokenizer) cut long texts'
    ends off where the adapter's own tokenizer (training, load_variant) keeps them. Refused with the reason."""
    from service_helpers import write_lora

    from models.manifest import Manifest
    from service.errors import Refused
    from tests.tiny import make_store

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    write_lora(store, "left", seed=9)
    path = store.path("left")
    left = _left_truncating_tokenizer(tmp_path)

    with store.writing("left", overwrite=True) as tmp:  # the same adapter, saved with the left-truncating tokenizer
        for f in path.iterdir():
            if f.name != "manifest.json":
                (tmp / f.name).write_bytes(f.read_bytes())
        left.save_pretrained(str(tmp))
        m = store.manifest("left")
        store.commit(tmp, Manifest.model_validate({**m.model_dump(), "files": {}, "created_at": ""}))
    rt = _runtime(store)
    assert rt.load("lora-0").resident  # the base's own side: served
    with pytest.raises(Refused, match="truncates long texts on the left"):
        rt.load("left")
    assert "left" not in rt.entries and "truncation_side" in rt.refused["left"]


def test_an_adapter_the_base_tokenizer_would_tokenise_otherwise_is_refused(tmp_path: Path) -> None:
    """The base snapshot's tokenizer, which every adapter is served with, is covered by no checksum (the
    base fingerprint hashes weights): it must tokenise as the adapter's own, hashed tokenizer.json.
    Here two vocabulary entries of the snapshot's file are swapped (words absent from the golden texts,
    so the golden check alone passed, and "football" was served as "election")."""
    from service.errors import Refused
    from tests.tiny import make_store

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    assert _runtime(store).load("lora-0").resident  # untampered: served
    (snapshot,) = (store.root / "_bases").iterdir()
    data = json.loads((snapshot / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["football"], vocab["election"] = vocab["election"], vocab["football"]
    (snapshot / "tokenizer.json").write_text(json.dumps(data))
    rt = _runtime(store)
    with pytest.raises(Refused, match="does not tokenise as the adapter's own tokenizer.json"):
        rt.load("lora-0")
    assert "lora-0" not in rt.entries and "tokenizer" in rt.refused["lora-0"]


def test_an_unexpected_error_loading_a_variant_refuses_it_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    """Whatever a loader raises (a layout the code does not handle) refuses that variant with its reason in
    /v1/models, like a bad one; the engine's startup goes on with the others (it stopped on any exception
    that was not the service's own)."""
    from service.errors import Refused
    from tests.tiny import make_store

    store = make_store(tmp_path / "store", arch="bert", n_adapters=2, full=False)
    rt = _runtime(store)
    read = rt._read

    def fails_for_lora_1(name):  # the fault injected: a loader error that is not a VariantRefused
        if name == "lora-1":
            raise RuntimeError("batch1 must be a 3D tensor")
        return read(name)

    monkeypatch.setattr(rt, "_read", fails_for_lora_1)
    assert rt.load("lora-0").resident
    with pytest.raises(Refused, match="RuntimeError: batch1 must be a 3D tensor"):
        rt.load("lora-1")
    assert set(rt.entries) == {"lora-0"} and "RuntimeError" in rt.refused["lora-1"]


@pytest.mark.parametrize(
    ("arch", "cfg"),
    [
        ("roberta", dict(task_type="SEQ_CLS")),  # peft's default: modules_to_save ["classifier", "score"]
        ("roberta", dict(modules_to_save=["classifier"])),
        ("roberta", dict(modules_to_save=["classifier.dense", "classifier.out_proj"])),  # this project's layout
        ("bert", dict(modules_to_save=["pooler", "classifier"])),
        ("bert", dict(task_type="SEQ_CLS")),
    ],
)
def test_the_head_of_any_modules_to_save_layout_is_found(arch: str, cfg: dict, tmp_path: Path) -> None:
    """The store's label check found the head by the last modules_to_save entry's `.weight`: a RoBERTa adapter
    saved with peft's defaults (or the composite `classifier`) was refused as having "no classification head"
    although it has one (and the bank serves it: the test above)."""
    from models.heads import head_out_features

    base = tiny_classifier(arch).eval()
    _random_peft(base, 3, r=2, lora_alpha=4, target_modules=["query", "value"], **cfg).save_pretrained(tmp_path / "a")
    assert head_out_features(tmp_path / "a") == base.config.num_labels
