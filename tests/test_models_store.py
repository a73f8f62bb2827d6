"""The store contract (models/): manifest round-trip, verification refusals, atomic writes, loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import LABELS, make_store

from models import Manifest, ManifestError, Store, VariantNotFound, VariantRefused
from models.loading import attach_adapter, compare_golden, compute_logits, load_base, load_full
from models.store import sha256_file


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"), n_adapters=1).root


@pytest.fixture
def store(pristine, tmp_path) -> Store:
    import shutil

    shutil.copytree(pristine, tmp_path / "s")
    return Store(tmp_path / "s")


def _rehash(store: Store, name: str, rel: str) -> None:
    """Record a deliberately edited file's new hash, so only the edit's meaning is under test."""
    path = store.path(name)
    data = json.loads((path / "manifest.json").read_text())
    data["files"][rel] = sha256_file(path / rel)
    (path / "manifest.json").write_text(json.dumps(data))


def _reasons(store: Store, name: str, **kw) -> list[str]:
    with pytest.raises(VariantRefused) as e:
        store.verify(name, **kw)
    return e.value.reasons


def test_manifest_round_trip(store):
    m = store.manifest("lora-0")
    assert Manifest.load(store.path("lora-0")) == m
    again = Manifest.model_validate_json(m.model_dump_json())
    assert again == m
    assert m.kind == "lora" and m.labels == LABELS and m.num_labels == 4
    assert set(m.files) == {
        p.relative_to(store.path("lora-0")).as_posix()
        for p in store.path("lora-0").rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert store.names() == ["full", "lora-0"]
    assert store.verify("lora-0", expected_base_fingerprint=m.base_fingerprint) == m


def test_corrupted_file_is_refused(store):
    p = store.path("lora-0") / "adapter_model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    reasons = _reasons(store, "lora-0")
    assert reasons == [
        "adapter_model.safetensors does not match its sha256 in the manifest (corrupt or modified); re-export it"
    ]


def test_extra_and_missing_files_are_refused(store):
    (store.path("full") / "notes.txt").write_text("x")
    (store.path("full") / "vocab.txt").unlink()
    reasons = _reasons(store, "full")
    assert any("missing: ['vocab.txt']" in r for r in reasons)
    assert any("not listed in the manifest: ['notes.txt']" in r for r in reasons)
    assert len(reasons) == 2


def test_pickle_file_is_refused(store):
    torch.save({"w": torch.zeros(1)}, store.path("full") / "pytorch_model.bin")
    reasons = _reasons(store, "full")
    assert any("pickle weight files are not allowed: ['pytorch_model.bin']" in r for r in reasons)


def test_label_count_mismatch_is_refused(store):
    path = store.path("full")
    data = json.loads((path / "manifest.json").read_text())
    data["labels"] = LABELS + ["Extra"]
    data["golden"]["logits"] = [row + [0.0] for row in data["golden"]["logits"]]
    (path / "manifest.json").write_text(json.dumps(data))
    assert _reasons(store, "full") == [f"weights produce 4 classes but the manifest has 5 labels {LABELS + ['Extra']}"]


def test_lora_without_head_is_refused(store):
    path = store.path("lora-0")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["modules_to_save"] = None
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _rehash(store, "lora-0", "adapter_config.json")
    assert _reasons(store, "lora-0") == [
        "adapter has no classification head (modules_to_save); retrain with the head saved"
    ]


def test_wrong_base_fingerprint_is_refused(store):
    reasons = _reasons(store, "lora-0", expected_base_fingerprint="0" * 64)
    assert len(reasons) == 1 and "train the adapter on this base" in reasons[0]


def test_invalid_manifests_are_refused(store):
    (store.path("full") / "manifest.json").write_text("{not json")
    assert "is not valid JSON" in _reasons(store, "full")[0]
    path = store.path("lora-0")
    data = json.loads((path / "manifest.json").read_text())
    del data["golden"]
    data["kind"] = "bogus"
    (path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        Manifest.load(path)
    assert "golden" in str(e.value) and "kind" in str(e.value)
    listed = {info.name: info for info in store.list()}
    assert listed["lora-0"].manifest is None and "invalid" in listed["lora-0"].error
    with pytest.raises(VariantNotFound, match="available: full, lora-0"):
        store.path("nope")


def test_writing_is_atomic(store):
    with pytest.raises(RuntimeError), store.writing("half") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("crash while writing")
    assert "half" not in store.names()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]
    with store.writing("pickled") as tmp:
        (tmp / "model.pt").write_bytes(b"x")
        with pytest.raises(ValueError, match="refusing to store pickle"):
            store.commit(tmp, store.manifest("full").model_copy(update={"name": "pickled"}))
    assert "pickled" not in store.names()


def test_two_writers_of_one_new_name_first_commit_wins(store):
    """writing(overwrite=False) checks the name at the start; a training run later commits minutes after.
    A second writer of the same name that committed meanwhile must not be replaced silently."""
    full = store.path("full")
    first = store.manifest("full").model_copy(update={"name": "new"})
    with store.writing("new") as tmp_a, store.writing("new") as tmp_b:
        for tmp, tag in ((tmp_a, b"a"), (tmp_b, b"b")):
            for f in full.iterdir():
                if f.name != "manifest.json":
                    (tmp / f.name).write_bytes(f.read_bytes())
            (tmp / "writer.txt").write_bytes(tag)
        store.commit(tmp_a, first.model_copy(deep=True))
        with pytest.raises(FileExistsError, match="pass overwrite"):
            store.commit(tmp_b, first.model_copy(deep=True))
    assert (store.path("new") / "writer.txt").read_bytes() == b"a"
    assert store.verify("new").name == "new"
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]
    with store.writing("new", overwrite=True) as tmp:  # asked for: replaced
        for f in store.path("new").iterdir():
            if f.name != "manifest.json":
                (tmp / f.name).write_bytes(b"c" if f.name == "writer.txt" else f.read_bytes())
        store.commit(tmp, first.model_copy(deep=True))
    assert (store.path("new") / "writer.txt").read_bytes() == b"c"


def test_loaded_variants_reproduce_golden_logits(store):
    m = store.verify("lora-0")
    base, tok, fp = load_base(store, m)
    assert fp == m.base_fingerprint
    model = attach_adapter(base, store.path("lora-0"), "lora-0")
    max_abs, agreement = compare_golden(m.golden, compute_logits(model, tok, m.golden.texts, m.max_length))
    assert max_abs < 1e-5 and agreement == 1.0
    full, tok = load_full(store.path("full"))
    mf = store.manifest("full")
    max_abs, agreement = compare_golden(mf.golden, compute_logits(full, tok, mf.golden.texts, mf.max_length))
    assert max_abs < 1e-5 and agreement == 1.0


def test_golden_agreement_counts_only_decisive_texts():
    """A near-tie may swap within the logit tolerance (random-init models at bf16 did on an H200);
    a decisive flip is still a disagreement, and a logit beyond the tolerance still fails."""
    import torch

    from models.manifest import Golden

    golden = Golden(texts=["tie", "clear"], logits=[[0.50, 0.49, 0.0], [2.0, 0.0, 0.0]])
    swapped_tie = torch.tensor([[0.49, 0.51, 0.0], [2.0, 0.0, 0.0]])
    assert compare_golden(golden, swapped_tie, tolerance=0.25) == pytest.approx((0.02, 1.0))
    assert compare_golden(golden, swapped_tie)[1] == 0.5  # no tolerance: every text counts
    flipped = torch.tensor([[0.50, 0.49, 0.0], [0.0, 2.1, 0.0]])
    assert compare_golden(golden, flipped, tolerance=0.25)[1] == 0.0


ROOT = Path(__file__).resolve().parents[1]

# A writer replacing `full` (its files plus writer.txt) that dies at the window: between replace_dir's two
# renames ("two-renames", the fallback where renameat2's exchange is missing, forced here) or right after the
# exchange, before the old version is removed ("exchange").
KILLED_REPLACE = """
import os, shutil, sys
import models.atomic as atomic
from models import Manifest, Store

store, mode = Store(sys.argv[1]), sys.argv[2]
if mode == "two-renames":
    atomic._renameat2_fn = None
real_replace, real_rmtree, renames = os.replace, shutil.rmtree, []

def replace(src, dst):
    renames.append(dst)
    if mode == "two-renames" and len(renames) == 2:
        os._exit(9)
    return real_replace(src, dst)

def rmtree(path, *args, **kw):  # replace_dir's removal of the old version, once it is out of the way
    if mode == "exchange" and os.path.basename(path).startswith(".tmp-"):
        os._exit(9)
    return real_rmtree(path, *args, **kw)

os.replace, shutil.rmtree = replace, rmtree
src = store.path("full")
with store.writing("full", overwrite=True) as tmp:
    for f in src.iterdir():
        if f.name != "manifest.json":
            (tmp / f.name).write_bytes(f.read_bytes())
    (tmp / "writer.txt").write_bytes(b"new")
    store.commit(tmp, Manifest.load(src))
"""


def _child(script: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env, **kw)


def _temps(store: Store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("mode", ["two-renames", "exchange"])
def test_a_writer_killed_mid_replace_leaves_the_variant(store, monkeypatch, mode):
    """A kill between replace_dir's two renames left no `full` at all, only `.tmp-old-full-*`, which no reader
    or writer of the store ever looked at (only training checkpoints did). Now a reader renames that version
    back, and on Linux the exchange leaves no such window; the next writer removes what the kill left behind."""
    import models.atomic as atomic

    monkeypatch.setattr(atomic, "RECOVER_AFTER_S", 0.0, raising=False)  # the kill was long ago
    monkeypatch.setattr(atomic, "ABANDONED_AFTER_S", 0.0, raising=False)
    old = store.manifest("full")
    child = _child(KILLED_REPLACE, str(store.root), mode)
    assert child.wait(120) == 9  # killed at the window, not finished
    after = Store(store.root)  # a fresh reader, as the service after the kill
    assert "full" in after.names()
    m = after.verify("full")
    if mode == "two-renames":  # the replacement never completed: the old version, whole
        assert m == old and not (after.path("full") / "writer.txt").exists()
    else:  # the exchange completed: the new version
        assert (after.path("full") / "writer.txt").read_bytes() == b"new"
    with after.writing("other") as tmp:  # the next writer cleans up after the dead one
        (tmp / "x.json").write_text("{}")
    assert _temps(after) == []


# Holds a writer's temporary directories open ("live") or dies inside them ("dead"): a `Store.writing` and an
# ONNX export killed between its fp32 export (into `.tmp-export-*`) and the quantisation.
WRITERS = """
import os, sys, time
from models import Store

store, mode = Store(sys.argv[1]), sys.argv[2]
if mode == "live":
    with store.writing("live") as tmp:
        (tmp / "x.json").write_text("{}")
        print("ready", flush=True)
        time.sleep(600)
else:
    import onnxruntime.quantization
    from training.export import export

    def killed(*args, **kw):
        os._exit(9)

    onnxruntime.quantization.quantize_dynamic = killed
    export(store, "full", "onnx-int8", name="int8", overwrite=True)
"""


def test_only_dead_writers_temporary_directories_are_removed(store, monkeypatch):
    """Killed writers' `.tmp-*` directories (a variant half written, an export's scratch) stayed in the store
    for good. A writer now removes the ones nobody holds, never a live writer's, however old."""
    import models.atomic as atomic

    monkeypatch.setattr(atomic, "ABANDONED_AFTER_S", 0.0, raising=False)  # age alone proves nothing here
    live = _child(WRITERS, str(store.root), "live", stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        held = _temps(store)
        assert len(held) == 1 and held[0].startswith(".tmp-live-")
        dead = _child(WRITERS, str(store.root), "dead")
        assert dead.wait(300) == 9
        left = set(_temps(store)) - set(held)
        assert any(n.startswith(".tmp-export-") for n in left) and any(n.startswith(".tmp-int8-") for n in left)
        with store.writing("next") as tmp:
            (tmp / "x.json").write_text("{}")
        assert _temps(store) == held  # the dead export's gone, the live writer's kept
    finally:
        live.kill()
        live.wait(30)
    with store.writing("after") as tmp:  # the live writer died too: its directory goes now
        (tmp / "x.json").write_text("{}")
    assert _temps(store) == []
