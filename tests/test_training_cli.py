"""The real `python -m training` CLI on tiny in-process models: train, files, counts, resume, exports, eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny import AGNEWS

from models import Store
from models.loading import compare_golden, compute_logits, load_full, onnx_session
from models.store import dir_bytes
from training.__main__ import main
from training.config import load_config
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = {"special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"}
FULL_FILES = {"config.json", "model.safetensors", "manifest.json"} | TOKENIZER_FILES
LORA_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json"} | TOKENIZER_FILES
ONNX_FILES = {"config.json", "model.onnx", "manifest.json"} | TOKENIZER_FILES

# tiny-bert preset: vocab 30522, width 32, 2 layers, FFN 64, 128 positions, 4 labels
H, L, FFN, V, P, C = 32, 2, 64, 30522, 128, 4
HEAD = H * C + C
LAYER = 4 * (H * H + H) + 2 * (2 * H) + (H * FFN + FFN) + (FFN * H + H)
FULL_PARAMS = (V + P + 2) * H + 2 * H + L * LAYER + (H * H + H) + HEAD
LORA_R4_ADAPTER = L * 2 * (4 * H + H * 4)  # A (r x in) + B (out x r) on query and value of each layer


def _files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("agnews")
    pd.read_parquet(AGNEWS / "train_subset_20k.parquet").groupby("label").head(50).to_parquet(d / "train.parquet")
    pd.read_parquet(AGNEWS / "test.parquet").groupby("label").head(10).to_parquet(d / "test.parquet")
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> tuple[Store, Path]:
    """tiny-bert full (via main(argv)) and LoRA (via a real `python -m training` subprocess)."""
    root = tmp_path_factory.mktemp("run")
    store, runs = root / "store", root / "runs"
    common = ["--set", f"data={data_dir}", "--store", str(store), "--runs-dir", str(runs)]
    assert main(["train", "configs/tiny-bert-full.yaml", *common]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "training", "train", "configs/tiny-bert-lora.yaml", *common],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["variant"] == "tiny-bert-lora"
    return Store(store), runs


def test_train_writes_exactly_the_expected_files(trained):
    store, runs = trained
    assert store.names() == ["tiny-bert-full", "tiny-bert-lora"]
    assert _files(store.path("tiny-bert-full")) == FULL_FILES
    assert _files(store.path("tiny-bert-lora")) == LORA_FILES
    lora = store.verify("tiny-bert-lora")
    bases = list((store.root / "_bases").iterdir())
    assert [b.name for b in bases] == [lora.base_fingerprint[:16]]
    assert _files(bases[0]) == {"base.json", "config.json", "model.safetensors"} | TOKENIZER_FILES
    assert sorted(p.name for p in store.root.iterdir()) == ["_bases", "tiny-bert-full", "tiny-bert-lora"]
    assert {p.name for p in runs.iterdir()} == {"tiny-bert-full.json", "tiny-bert-lora.json", "tensorboard"}
    assert {p.name for p in (runs / "tensorboard").iterdir()} == {"tiny-bert-full", "tiny-bert-lora"}


def test_trainable_parameter_counts(trained):
    store, runs = trained
    full = json.loads((runs / "tiny-bert-full.json").read_text())["train_info"]
    lora = json.loads((runs / "tiny-bert-lora.json").read_text())["train_info"]
    assert (full["trainable_params"], full["trainable_head_params"], full["trainable_adapter_params"]) == (
        FULL_PARAMS,
        HEAD,
        0,
    )
    assert full["total_params"] == FULL_PARAMS
    assert (lora["trainable_params"], lora["trainable_adapter_params"], lora["trainable_head_params"]) == (
        LORA_R4_ADAPTER + HEAD,
        LORA_R4_ADAPTER,
        HEAD,
    )
    assert lora["total_params"] == FULL_PARAMS + LORA_R4_ADAPTER
    saved = load_file(str(store.path("tiny-bert-lora") / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == LORA_R4_ADAPTER + HEAD  # the adapter never holds the base
    saved_full = load_file(str(store.path("tiny-bert-full") / "model.safetensors"))
    assert sum(t.numel() for t in saved_full.values()) == FULL_PARAMS


def test_results_json_and_manifest(trained, data_dir):
    store, runs = trained
    res = json.loads((runs / "tiny-bert-lora.json").read_text())
    run, info, meta = res["run_info"], res["train_info"], res["meta_info"]
    assert run["status"] == "ok" and run["error"] is None and set(run["git"]) == {"sha", "dirty"}
    assert run["config"]["method"] == "lora" and run["config"]["data"] == str(data_dir)
    assert info["steps"] == 6 and info["samples_seen"] == 6 * 8 and info["tokens_seen"] > 6 * 8
    assert [p["step"] for p in info["validation_curve"]] == [3, 6]
    assert info["best_val_macro_f1"] == max(p["macro_f1"] for p in info["validation_curve"])
    assert info["train_rows"] + info["val_rows"] == 200 and info["val_rows"] == 10
    test = info["test"]
    assert test["n"] == 40 and sum(map(sum, test["confusion_matrix"])) == 40
    assert test["accuracy"] == pytest.approx(sum(test["confusion_matrix"][i][i] for i in range(4)) / 40)
    assert set(test["per_class"]) == {"World", "Sports", "Business", "Sci/Tech"}
    for key in ("macro_f1", "weighted_f1", "macro_precision", "weighted_recall"):
        assert 0.0 <= test[key] <= 1.0
    assert info["samples_per_s"] == pytest.approx(48 / info["train_time_s"])
    assert info["peak_memory_bytes"] > 100 * 2**20 and info["peak_memory_kind"] == "peak_rss"
    assert info["artifact_bytes"] == dir_bytes(store.path("tiny-bert-lora"))
    assert meta["versions"]["torch"] == torch.__version__ and meta["hardware"]["cpu_count"]
    m = store.manifest("tiny-bert-lora")
    assert (m.kind, m.init, m.base_model, m.architecture, m.max_length) == ("lora", "random", "tiny-bert", "bert", 64)
    test_df = pd.read_parquet(data_dir / "test.parquet")
    assert m.golden.texts == [t for lab in range(4) for t in test_df.loc[test_df.label == lab, "text"].head(2)]
    assert m.metrics["test_accuracy"] == test["accuracy"] and m.provenance["config"]["lora"]["r"] == 4


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_equals_uninterrupted(tmp_path, data_dir, method):
    """Dropout and shuffling on; stop after a checkpoint, resume via the CLI, compare final weights."""
    overrides = [f"data={data_dir}", "checkpoint_every=2", "eval_every=2", "max_steps=6", "eval_test=false"]
    path = f"configs/tiny-bert-{method}.yaml"
    store, runs = Store(tmp_path / "store"), tmp_path / "runs"
    cfg = load_config(path, [*overrides, "name=straight"])
    assert cfg.lora.dropout > 0
    train(cfg, store=store, runs_dir=runs)
    cfg = load_config(path, [*overrides, "name=resumed"])
    train(cfg, store=store, runs_dir=runs, stop_after_steps=3)  # "killed" after step 3: last checkpoint at 2
    assert store.names() == ["straight"] and (runs / "resumed.ckpt" / "state.pt").exists()
    args = [
        "train",
        path,
        "--set",
        *overrides,
        "--name",
        "resumed",
        "--store",
        str(store.root),
        "--runs-dir",
        str(runs),
    ]
    assert main([*args, "--resume"]) == 0
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = (load_file(str(store.path(n) / weights)) for n in ("straight", "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ra, rb = (json.loads((runs / f"{n}.json").read_text())["train_info"] for n in ("straight", "resumed"))
    assert ra["validation_curve"] == rb["validation_curve"] and ra["samples_seen"] == rb["samples_seen"]
    assert not (runs / "resumed.ckpt").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data_dir, capsys):
    code = main(
        [
            "train",
            "configs/tiny-bert-lora.yaml",
            "--set",
            f"data={data_dir}",
            "--store",
            str(tmp_path / "s"),
            "--runs-dir",
            str(tmp_path / "r"),
            "--resume",
        ]
    )
    assert code == 2 and "no checkpoint in" in capsys.readouterr().err


def test_exports_pass_parity_and_register(trained, capsys):
    store, _ = trained
    args = ["--store", str(store.root)]
    assert main(["export", "tiny-bert-lora", "--format", "merged", *args]) == 0
    assert main(["export", "tiny-bert-lora-merged", "--format", "onnx", *args]) == 0
    assert main(["export", "tiny-bert-lora-merged", "--format", "onnx-int8", *args]) == 0
    assert main(["export", "tiny-bert-full", "--format", "onnx", *args]) == 0
    capsys.readouterr()
    lora = store.manifest("tiny-bert-lora")
    merged = store.verify("tiny-bert-lora-merged")
    assert _files(store.path(merged.name)) == FULL_FILES
    assert (merged.kind, merged.source, merged.base_fingerprint, merged.golden.texts) == (
        "merged",
        "tiny-bert-lora",
        lora.base_fingerprint,
        lora.golden.texts,
    )
    assert merged.parity.passed and merged.parity.argmax_agreement == 1.0 and merged.parity.max_abs_logit_diff < 1e-4
    model, tok = load_full(store.path(merged.name))
    assert compare_golden(lora.golden, compute_logits(model, tok, lora.golden.texts, lora.max_length))[0] < 1e-4
    for name in ("tiny-bert-lora-merged-onnx", "tiny-bert-full-onnx"):
        m = store.verify(name)
        assert _files(store.path(name)) == ONNX_FILES and m.kind == "onnx"
        assert m.parity.tolerance == 5e-3 and m.parity.argmax_agreement == 1.0 and m.parity.max_abs_logit_diff < 1e-3
        logits = compute_logits(onnx_session(store.path(name)), tok, m.golden.texts, m.max_length)
        assert compare_golden(m.golden, logits)[0] < 1e-5  # golden logits are the export's own
    int8 = store.verify("tiny-bert-lora-merged-onnx-int8")
    assert _files(store.path(int8.name)) == ONNX_FILES and int8.kind == "onnx-int8"
    assert int8.parity.tolerance is None and 0.0 <= int8.parity.argmax_agreement <= 1.0
    assert int8.parity.source == "tiny-bert-lora-merged"
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]


def test_failing_export_is_not_registered(trained, tmp_path, capsys):
    import shutil

    store = Store(tmp_path / "store")
    shutil.copytree(trained[0].root, store.root)
    path = store.path("tiny-bert-full") / "manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["logits"][0][0] += 0.5  # the source's reference disagrees with what its weights produce
    path.write_text(json.dumps(data))
    before = store.names()
    assert main(["export", "tiny-bert-full", "--format", "onnx", "--name", "bad-onnx", "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert "failed parity" in err and "not registered" in err and "max |Δlogit| 0.5" in err
    assert store.names() == before
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp")]
    assert main(["export", "tiny-bert-full", "--format", "merged", "--store", str(store.root)]) == 2
    assert "cannot make merged from 'tiny-bert-full' (kind full)" in capsys.readouterr().err


def test_an_int8_export_that_changes_its_sources_classes_is_refused(tmp_path):
    """int8 parity bounds no logit (quantisation moves them), but a text its source decides by a clear margin
    must keep its class. Here the source's reference says another class, decisively, for every text (as a label
    order mixed up between source and export would): refused like the fp32 export (it registered, passed)."""
    from tiny import make_store

    from models.golden import EXPORT_TOLERANCE
    from training.export import ExportRefused, export

    store = make_store(tmp_path / "store", n_adapters=0)
    assert EXPORT_TOLERANCE["onnx-int8"] is None
    good = export(store, "full", "onnx-int8", name="good-int8")  # an honest export still registers
    assert good.parity.passed and good.parity.argmax_agreement == 1.0
    path = store.path("full") / "manifest.json"
    data = json.loads(path.read_text())
    data["golden"]["logits"] = [
        [5.0 if j == (row.index(max(row)) + 1) % len(row) else 0.0 for j in range(len(row))]
        for row in data["golden"]["logits"]
    ]
    path.write_text(json.dumps(data))
    for fmt in ("onnx", "onnx-int8"):
        with pytest.raises(ExportRefused, match="failed parity"):
            export(store, "full", fmt, name=f"bad-{fmt}")
        assert f"bad-{fmt}" not in store.names()


def test_an_int8_export_that_changes_most_classes_is_refused_whatever_the_margins(tmp_path):
    """The margin rule above cannot fail while no logit moves by more than its slack (1.0): on a source whose
    margins are all small (the tiny model's, a lightly trained one's) an int8 that changed the class of every
    golden text registered as passed. Here the source's reference is each row rolled by one class, as small as
    the real logits: every class changes, no logit moves far."""
    from tiny import make_store

    from models.golden import UNBOUNDED_EXPORT_SLACK
    from training.export import ExportRefused, export

    store = make_store(tmp_path / "store", n_adapters=0)
    path = store.path("full") / "manifest.json"
    data = json.loads(path.read_text())
    rows = data["golden"]["logits"]
    rolled = [row[-1:] + row[:-1] for row in rows]
    assert all(max(r) - sorted(r)[-2] < 2 * UNBOUNDED_EXPORT_SLACK for r in rolled)  # no decisive text
    assert all(r.index(max(r)) != row.index(max(row)) for r, row in zip(rolled, rows, strict=True))
    data["golden"]["logits"] = rolled
    path.write_text(json.dumps(data))
    with pytest.raises(ExportRefused, match=r"failed parity.*argmax agreement 0\.0%"):
        export(store, "full", "onnx-int8", name="bad-int8")
    assert "bad-int8" not in store.names()


def test_eval_works_for_every_kind(trained, data_dir, capsys):
    store, runs = trained
    test_accuracy = json.loads((runs / "tiny-bert-lora.json").read_text())["train_info"]["test_accuracy"]
    accuracy = {}
    names = ["tiny-bert-lora", "tiny-bert-full"]
    names += [n for n in store.names() if n.endswith(("-merged", "-onnx"))]
    for name in names:
        assert main(["eval", name, "--store", str(store.root), "--data", str(data_dir)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["n"] == 40 and out["split"] == "test"
        accuracy[name] = out["accuracy"]
    # fp32 inference (eval) vs bf16 autocast (training) may flip a borderline row of 40 at most
    assert abs(accuracy["tiny-bert-lora"] - test_accuracy) <= 1 / 40
    if "tiny-bert-lora-merged" in accuracy:
        assert accuracy["tiny-bert-lora-merged"] == accuracy["tiny-bert-lora"]
    if "tiny-bert-full-onnx" in accuracy:
        assert accuracy["tiny-bert-full-onnx"] == accuracy["tiny-bert-full"]


def test_eval_of_a_variant_trained_on_one_file_says_it_read_training_rows(trained, data_dir, tmp_path):
    """A single file is whatever split it is asked for; without --data, the one a variant trained on is
    read as its train split, and the result says so (it said "test" over its own training rows)."""
    import shutil

    from training.evaluate import evaluate_variant

    store = Store(tmp_path / "store")
    shutil.copytree(trained[0].root, store.root)
    path = store.path("tiny-bert-full") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["provenance"]["config"]["data"] = str(data_dir / "train.parquet")  # as if trained on that file
    path.write_text(json.dumps(manifest))
    out = evaluate_variant(store, "tiny-bert-full")
    assert (out["split"], out["n"]) == ("train", 200)
    out = evaluate_variant(store, "tiny-bert-full", data=str(data_dir / "test.parquet"))  # named: taken as test
    assert (out["split"], out["n"]) == ("test", 40)


def test_eval_limit_is_a_seeded_stratified_sample_not_the_first_rows(trained, data_dir, tmp_path, capsys):
    """`--limit N` took the first N rows: on a source sorted by label with no test split (AG News'
    train_subset_20k) `--limit 40` scored class 0 only. Now a seeded sample stratified by label."""
    import shutil

    store = Store(tmp_path / "store")
    shutil.copytree(trained[0].root, store.root)
    path = store.path("tiny-bert-full") / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["provenance"]["config"]["data"] = str(data_dir / "train.parquet")  # 4 x 50 rows, sorted by label
    path.write_text(json.dumps(manifest))
    assert pd.read_parquet(data_dir / "train.parquet")["label"].is_monotonic_increasing
    outs = []
    for _ in range(2):
        assert main(["eval", "tiny-bert-full", "--store", str(store.root), "--limit", "40"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    out = outs[0]
    assert (out["split"], out["n"]) == ("train", 40)
    assert {c: v["support"] for c, v in out["per_class"].items()} == dict.fromkeys(out["per_class"], 10)
    assert out["sample"] == "40 of 200 rows, stratified by label, seed 0"
    assert outs[1]["accuracy"] == out["accuracy"]  # seeded: the same rows each time
    assert main(["eval", "tiny-bert-full", "--store", str(store.root), "--limit", "3"]) == 0  # < 4 classes
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and out["sample"] == "3 of 200 rows, random, seed 0"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "stratified by label" in " ".join(capsys.readouterr().out.split())


def test_bad_input_exits_nonzero_with_every_problem(tmp_path, capsys):
    bad = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["ok", "", "fine"], "label": [0, 9, 1]}).to_parquet(bad)
    store, runs = tmp_path / "store", tmp_path / "runs"
    code = main(
        ["train", "configs/tiny-bert-full.yaml", "--set", f"data={bad}", "--store", str(store), "--runs-dir", str(runs)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "2 problem(s)" in err and "outside 0..3" in err and "empty text" in err
    res = json.loads((runs / "tiny-bert-full.json").read_text())["run_info"]
    assert res["status"] == "failed" and "DataError" in res["error"]
    assert Store(store).names() == []
    code = main(["train", "configs/tiny-bert-full.yaml", "--set", "nonsense=1", "lr=-1", "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'nonsense'" in err and "lr: -1.0 must be in (0, 1)" in err


def test_max_length_beyond_the_models_positions_is_a_config_error(tmp_path, data_dir, capsys):
    """It was a RuntimeError from the embeddings' forward ("expanded size ... must match"), at the first batch
    holding a text past the positions the model has."""
    store, runs = tmp_path / "store", tmp_path / "runs"
    args = ["--set", f"data={data_dir}", "max_length=256", "--store", str(store), "--runs-dir", str(runs)]
    assert main(["train", "configs/tiny-bert-full.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert "max_length: 256 tokens is more than tiny-bert has positions for; set max_length <= 128" in err
    assert "Traceback" not in err and Store(store).names() == []
    assert json.loads((runs / "tiny-bert-full.json").read_text())["run_info"]["status"] == "failed"


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-roberta"])
def test_position_limit_is_the_longest_text_the_model_takes(preset):
    """RoBERTa numbers positions from padding_idx + 1: 130 positions with pad id 0 take 129 tokens."""
    from tiny import tokenizer

    from training.loop import build_model, position_limit

    tok = tokenizer()
    cfg = load_config(f"configs/{preset}-{'full' if preset == 'tiny-bert' else 'lora'}.yaml")
    model = build_model(cfg, tok).eval()
    limit = position_limit(model)
    assert limit == {"tiny-bert": 128, "tiny-roberta": 129}[preset]
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 1000), attention_mask=torch.ones(1, limit, dtype=torch.long))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 1000), attention_mask=torch.ones(1, limit + 1, dtype=torch.long))


def test_export_and_eval_name_a_store_that_is_not_there(tmp_path, capsys):
    """A wrong CWD or a missing --store said "no variant 'x' in the store; available: none", naming no store."""
    missing = tmp_path / "nowhere" / "store"
    for argv in (["export", "full", "--format", "onnx"], ["eval", "full"]):
        assert main([*argv, "--store", str(missing)]) == 2
        err = capsys.readouterr().err
        assert f"store {missing} is not a directory" in err and "give --store" in err
    assert not missing.exists()  # nothing was created by looking
