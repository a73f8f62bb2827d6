"""models.load_variant across kinds, golden checks (int8 included), the atomic writer, one metrics
function, one AG News reader, and no import circles in models/."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny import AGNEWS, GOLDEN_TEXTS, LABELS, make_store, tiny_classifier, tiny_lora

from models import Store, VariantRefused
from models.atomic import atomic_dir
from models.golden import (
    EXPORT_TOLERANCE,
    LEGACY_BATCH,
    check_golden,
    compare_golden,
    golden_subset,
    load_tolerance,
    score_golden,
)
from models.loading import load_base
from models.variant import LoadedVariant, load_variant

TEXTS = [*GOLDEN_TEXTS, "A short one.", "Markets rallied after the central bank held rates steady for a third month."]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """lora-0, lora-1, full; exported through training's exporter: merged, onnx, onnx-int8."""
    from training.export import export

    st = make_store(tmp_path_factory.mktemp("variants") / "store", arch="bert", n_adapters=2)
    export(st, "lora-0", "merged")  # lora-0-merged
    export(st, "full", "onnx")  # full-onnx
    export(st, "full-onnx", "onnx-int8")  # full-onnx-int8
    return st


def test_every_kind_loads_into_one_typed_object(store):
    import models

    assert models.load_variant is load_variant and models.LoadedVariant is LoadedVariant
    kinds = {}
    for name in ("full", "lora-0", "lora-0-merged", "full-onnx", "full-onnx-int8"):
        v = load_variant(store, name)
        assert isinstance(v, LoadedVariant) and v.name == name and v.manifest.name == name
        assert (v.model is None) == v.kind.startswith("onnx") and (v.session is None) != v.kind.startswith("onnx")
        logits = v.logits(TEXTS)
        assert logits.dtype == torch.float32 and logits.shape == (len(TEXTS), len(LABELS))
        enc = v.encode(TEXTS[:3])  # an encoded batch gives the same rows as texts (int8: batch-dependent scales)
        assert torch.allclose(v.logits(enc), logits[:3], atol=1e-3 if v.kind == "onnx-int8" else 1e-5)
        kinds[v.kind] = name
    assert set(kinds) == {"full", "lora", "merged", "onnx", "onnx-int8"}


def test_logits_agree_across_kinds(store):
    full = load_variant(store, "full").logits(TEXTS)
    onnx = load_variant(store, "full-onnx").logits(TEXTS)
    assert (full - onnx).abs().max().item() < 1e-4  # ONNX fp32 vs torch fp32: kernel-order noise only
    lora = load_variant(store, "lora-0").logits(TEXTS)
    merged = load_variant(store, "lora-0-merged").logits(TEXTS)
    assert (lora - merged).abs().max().item() < 1e-4  # merge_and_unload reorders sums only
    int8 = load_variant(store, "full-onnx-int8")
    # int8 moves logits by design; it must stay close and follow its own golden record exactly
    assert (int8.logits(TEXTS) - full).abs().max().item() < 0.5
    assert check_golden(int8).max_abs_logit_diff < 1e-6


def test_lora_via_load_variant_equals_peft_directly(store):
    """The stored adapter, loaded onto the stored base, computes what the in-memory peft model computed."""
    direct = tiny_lora(tiny_classifier("bert", seed=0), seed=100)  # what make_store saved as lora-0
    v = load_variant(store, "lora-0")
    enc = v.encode(TEXTS)
    with torch.no_grad():
        expected = direct(**enc).logits
    assert torch.allclose(v.logits(TEXTS), expected, atol=1e-5)


def test_adapters_share_a_base_through_onto(store):
    alone = {n: load_variant(store, n).logits(TEXTS) for n in ("lora-0", "lora-1")}
    first = load_variant(store, "lora-0", adapter_name="a")
    second = load_variant(store, "lora-1", onto=first, adapter_name="b")
    assert second.model is first.model  # one base, two adapters
    assert set(second.model.peft_config) == {"a", "b"}
    for v, name in ((first, "lora-0"), (second, "lora-1")):
        assert torch.allclose(v.logits(TEXTS), alone[name], atol=1e-5)
    base, tok, fp = load_base(store, store.manifest("lora-0"))
    with pytest.raises(VariantRefused, match="built on base"):
        load_variant(store, "lora-0", onto=base, tokenizer=tok, expected_base_fingerprint="0" * 64)


def test_dtype_and_device_are_applied_and_recorded(store):
    v = load_variant(store, "full", dtype="bf16")
    assert next(v.model.parameters()).dtype == torch.bfloat16 and v.dtype == "bf16"
    assert v.logits(TEXTS).dtype == torch.float32  # logits always come back fp32
    lv = load_variant(store, "lora-0", dtype="bf16")
    assert {p.dtype for p in lv.model.parameters()} == {torch.bfloat16}  # the adapter too, not only the base
    assert load_variant(store, "full-onnx", dtype="bf16").dtype == "fp32"  # ONNX runs fp32 whatever is asked
    with pytest.raises(ValueError, match="unknown dtype"):
        load_variant(store, "full", dtype="int4")


def test_refused_variant_is_refused_by_load_variant(store, tmp_path):
    import shutil

    shutil.copytree(store.root, tmp_path / "s", symlinks=True)
    st = Store(tmp_path / "s")
    weights = st.path("full") / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4:] = b"\0\0\0\1"
    weights.write_bytes(bytes(raw))
    with pytest.raises(VariantRefused, match="sha256"):
        load_variant(st, "full")


# ---- golden checks ---------------------------------------------------------------------------
def test_int8_golden_is_scored_one_per_batch_and_any_subset_reproduces_it(store):
    m = store.manifest("full-onnx-int8")
    assert m.golden.one_per_batch and m.parity.tolerance is None
    assert not store.manifest("full-onnx").golden.one_per_batch  # fp32 kinds are batch-independent
    v = load_variant(store, "full-onnx-int8")
    for k in (1, 2, 3, None):
        res = check_golden(v, subset=k)
        assert res.passed and res.max_abs_logit_diff == 0.0 and res.argmax_agreement == 1.0
        assert res.texts == (k or len(m.golden.texts))
    # Why: the same texts scored in shared batches give other numbers (activation scales per batch).
    sub = golden_subset(m.golden, 2)
    together = score_golden(v, sub.texts, alone=False)
    assert compare_golden(sub, together)[0] > 0.0


def test_legacy_int8_record_still_loads(store, tmp_path):
    """A manifest written before one_per_batch (whole set scored in shared batches) is re-checked whole."""
    import shutil

    shutil.copytree(store.root, tmp_path / "s", symlinks=True)
    st = Store(tmp_path / "s")
    v = load_variant(st, "full-onnx-int8")
    legacy = score_golden(v, v.manifest.golden.texts, alone=False)  # what the old exporter recorded
    path = st.path("full-onnx-int8") / "manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["logits"] = legacy.tolist()
    del data["golden"]["one_per_batch"]
    path.write_text(json.dumps(data))
    v = load_variant(st, "full-onnx-int8")
    assert not v.manifest.golden.one_per_batch
    res = check_golden(v, subset=2)
    assert res.passed and res.texts == len(GOLDEN_TEXTS) and res.max_abs_logit_diff == 0.0


def test_tolerances_live_in_one_place(store):
    from service.runtime import Runtime
    from training import export as export_mod

    assert export_mod.TOLERANCE is EXPORT_TOLERANCE
    assert load_tolerance("onnx", "bf16") == load_tolerance("full", "fp32") == 1e-3
    assert load_tolerance("full", "bf16") == 0.25 and load_tolerance("onnx-int8") == 0.1
    # the service's golden check asks models.golden at the precision a variant computes in; no table of its own
    src = inspect.getsource(Runtime._check_golden)
    assert "check_golden(" in src and "precision=self.precision_of(" in src and "load_tolerance" not in src


def test_tampered_golden_fails_with_a_reason(store, tmp_path):
    import shutil

    shutil.copytree(store.root, tmp_path / "s", symlinks=True)
    st = Store(tmp_path / "s")
    path = st.path("full") / "manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["logits"] = [[x + 0.01 for x in row] for row in data["golden"]["logits"]]
    path.write_text(json.dumps(data))
    res = check_golden(load_variant(st, "full"), subset=2)
    assert not res.passed and res.max_abs_logit_diff == pytest.approx(0.01, abs=1e-4)
    assert "differ by" in res.reason and "tolerance 0.001" in res.reason


def test_int8_export_loads_in_the_service_with_a_different_golden_subset(store):
    """Export checked 4 golden texts in one go; the service re-checks 2 (another batch company): it must load."""
    from service_helpers import running

    assert len(store.manifest("full-onnx-int8").golden.texts) == 4
    with running(store.root, golden_check_texts=2, variants="full-onnx-int8,full") as srv:
        models = {m["name"]: m for m in srv.client.get("/v1/models").json()["data"]}
        assert models["full-onnx-int8"]["loaded"], models["full-onnx-int8"]
        r = srv.classify("full-onnx-int8", GOLDEN_TEXTS)
        assert r.status_code == 200, r.text
        got = [max(p, key=lambda d: d["score"])["label"] for p in r.json()["predictions"]]
        want = [LABELS[i] for i in torch.tensor(store.manifest("full-onnx-int8").golden.logits).argmax(-1).tolist()]
        assert got == want


def test_accuracy_reports_a_refused_variant_with_why_never_a_figure(store, tmp_path):
    """The service refuses a variant (golden mismatch): accuracy lists it under `failed` with the
    service's reason, the run is `partial` (exit 1), and the report prints no figure for it."""
    import shutil

    from service_helpers import running, tamper_golden

    from benchmarks.accuracy import AccuracySettings
    from benchmarks.experiment import REGISTRY, run_experiment
    from benchmarks.report import write_report
    from models.manifest import Manifest

    root = tmp_path / "s"
    shutil.copytree(store.root, root, symlinks=True)
    for name in ("full", "full-onnx-int8"):  # flagged pretrained so accuracy evaluates them (weights are random)
        m = Manifest.load(root / name)
        m.init = "pretrained"
        m.save(root / name)
    tamper_golden(Store(root), "full-onnx-int8")
    with running(root, variants="full,full-onnx-int8") as srv:
        settings = AccuracySettings(store=str(root), url=srv.url, variants=["full", "full-onnx-int8"], limit=16)
        code, doc = run_experiment(REGISTRY["accuracy"], settings, out=tmp_path / "res" / "acc.json", command=["x"])
    assert code == 1 and doc["status"] == "partial"
    payload = doc["payload"]
    assert list(payload["variants"]) == ["full"] and payload["variants"]["full"]["n"] == 16
    reason = payload["failed"]["full-onnx-int8"]
    assert reason.startswith("refused by the service") and "golden-set logits differ" in reason
    report = write_report([tmp_path / "res"], tmp_path / "REPORT.md").read_text()
    assert "full-onnx-int8" in report and "golden-set logits differ" in report
    assert "| full-onnx-int8 | onnx-int8 |" not in report  # no accuracy row for the refused variant


# ---- atomic writer ---------------------------------------------------------------------------
def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("writer died")
    assert (final / "a").read_text() == "1"  # unchanged
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # replaced whole
    with pytest.raises(FileExistsError), atomic_dir(final, overwrite=False):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary left behind


def test_copy_adapter_goes_through_the_atomic_writer(store, tmp_path):
    import shutil

    from benchmarks.common import copy_adapter

    shutil.copytree(store.root, tmp_path / "s", symlinks=True)
    copy_adapter(tmp_path / "s", "lora-0", "lora-0-copy")
    st = Store(tmp_path / "s")
    assert st.verify("lora-0-copy").name == "lora-0-copy"
    assert not [p for p in st.root.iterdir() if p.name.startswith(".tmp")]


def test_int8_export_from_onnx_never_writes_into_its_source(store, tmp_path, monkeypatch):
    """onnxruntime's quantize_dynamic writes `model-inferred.onnx` beside its input: quantising the source
    variant's own file put it there, so the source was refused (unlisted file) during the export, and for good
    when the export died before removing it. Here it dies right after shape inference."""
    import shutil

    from onnxruntime.quantization import quant_utils

    from training.export import export

    shutil.copytree(store.root, tmp_path / "s", symlinks=True)
    st = Store(tmp_path / "s")
    before = sorted(p.name for p in st.path("full-onnx").iterdir())
    during = {}

    def killed(path, *args, **kwargs):
        during["source"] = sorted(p.name for p in st.path("full-onnx").iterdir())
        raise KeyboardInterrupt  # a kill (OOM, Ctrl-C) while the inferred model loads

    monkeypatch.setattr(quant_utils.onnx, "load", killed)
    with pytest.raises(KeyboardInterrupt):
        export(st, "full-onnx", "onnx-int8", name="again-int8")
    assert during["source"] == before
    assert sorted(p.name for p in st.path("full-onnx").iterdir()) == before
    assert st.verify("full-onnx").name == "full-onnx"  # still servable
    assert "again-int8" not in st.names() and not [p for p in st.root.iterdir() if p.name.startswith(".tmp")]


# ---- one metrics function, one reader ----------------------------------------------------------
def test_one_metrics_function_with_one_key_spelling():
    import benchmarks.accuracy as acc
    from training.metrics import classification_metrics

    assert acc.classification_metrics is classification_metrics  # the benchmark uses training's function
    y_true, y_pred = [0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 1, 1, 2, 3, 3, 3]
    m = acc.accuracy_metrics(y_true, y_pred, LABELS)
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["macro_recall"] == 0.75 and m["weighted_f1"] == pytest.approx(m["macro_f1"])  # balanced classes
    assert m["per_class"]["World"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert not [k for k in m if k.startswith(("f1_", "precision_", "recall_"))]
    assert set(classification_metrics(y_true, y_pred, LABELS)) | {"accuracy_ci95"} == set(m)


def test_benchmarks_and_training_read_the_same_ag_news_file(tmp_path):
    from benchmarks.common import load_split
    from benchmarks.loadgen import agnews_test_texts
    from training.data import DataError, read_split

    texts, labels = load_split(AGNEWS)
    df = read_split(AGNEWS, "test")
    assert texts == df["text"].tolist() and labels == df["label"].tolist() and len(texts) == 7600
    # what every load / ceiling run sends (it once sent the letters of the column name 'text')
    assert agnews_test_texts(str(AGNEWS)) == texts
    # Shards of one split: both readers join them in name order.
    d = tmp_path / "data"
    d.mkdir()
    pd.DataFrame({"text": ["first"], "label": [1]}).to_parquet(d / "test-00000-of-00002.parquet")
    pd.DataFrame({"text": ["second"], "label": [2]}).to_parquet(d / "test-00001-of-00002.parquet")
    pd.DataFrame({"text": ["t"], "label": [0]}).to_parquet(d / "train.parquet")
    both = (["first", "second"], [1, 2])
    assert load_split(d) == (read_split(d)["text"].tolist(), read_split(d)["label"].tolist()) == both
    # Two other candidate files (a copy in another format): neither reader picks one silently.
    pd.DataFrame({"text": ["from csv"], "label": [1]}).to_csv(d / "test.csv", index=False)
    for reader in (load_split, read_split):
        with pytest.raises(DataError, match="several test\\* files"):
            reader(d)


# ---- import structure ------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every `models.*` module a file imports, at any depth, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("models"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("models")}
    return out


def test_models_package_has_no_import_circles():
    root = Path(__file__).resolve().parents[1] / "models"
    graph = {f"models.{p.stem}": _imports(p) - {"models"} for p in root.glob("*.py") if p.stem != "__init__"}
    assert "models.store" not in graph["models.manifest"]  # the circle this replaced

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, f"import circle: {' -> '.join([*stack, node])}"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])

    for mod in graph:
        visit(mod, [])


def test_legacy_batch_matches_the_old_default():
    import inspect

    from models.loading import compute_logits

    assert inspect.signature(compute_logits).parameters["batch_size"].default == LEGACY_BATCH


def test_golden_subset_takes_the_shortest_text_of_each_stratum():
    from models.manifest import Golden

    texts = ["aaaa", "a", "bbb", "bbbbbb", "cc", "c", "dddd", "ddd"]  # 4 classes x 2, ordered by class
    golden = Golden(texts=texts, logits=[[float(i), 0.0] for i in range(8)])
    sub = golden_subset(golden, 4)
    assert sub.texts == ["a", "bbb", "c", "ddd"]  # one per class, the shortest: a small padded batch
    assert [row[0] for row in sub.logits] == [1.0, 2.0, 5.0, 7.0]  # logits follow their texts
    assert golden_subset(golden, None) is golden and golden_subset(golden, 8) is golden


def test_a_lora_variant_loads_with_its_own_hashed_tokenizer(tmp_path):
    """load_variant of a LoRA variant (training eval, exports, benchmarks) tokenises with the adapter's own
    tokenizer.json, which its manifest hashes, not the base snapshot's, which no checksum covers: here two
    vocabulary entries of the snapshot's file are swapped, and the merged export and eval stay right."""
    import json

    from models.variant import load_variant
    from tests.tiny import make_store

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    text = "the football final"
    before = load_variant(store, "lora-0").tokenizer(text)["input_ids"]
    (snapshot,) = (store.root / "_bases").iterdir()
    data = json.loads((snapshot / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["football"], vocab["election"] = vocab["election"], vocab["football"]
    (snapshot / "tokenizer.json").write_text(json.dumps(data))
    assert load_variant(store, "lora-0").tokenizer(text)["input_ids"] == before


def test_a_text_scores_the_same_alone_and_in_a_batch_whatever_the_padding_side(store):
    """A tokenizer_config.json with padding_side "left" made eval and golden logits depend on the batch (BERT
    numbers positions absolutely; training and the service pad on the right): a short text's logits moved with
    the longest text beside it."""
    from models.loading import compute_logits

    v = load_variant(store, "full")
    v.tokenizer.padding_side = "left"
    short, long = "stocks", " ".join(GOLDEN_TEXTS)
    alone = v.logits([short])
    assert torch.allclose(v.logits([short, long])[:1], alone, atol=1e-5)
    got = compute_logits(v.model, v.tokenizer, [short, long], v.manifest.max_length)
    assert torch.allclose(got[:1], alone, atol=1e-5)
