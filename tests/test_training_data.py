"""Data: each local format, AG News original CSV, validation (all problems at once), splits, batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny import AGNEWS, tokenizer

from training.config import TrainConfig
from training.data import DataError, collate, encode, epoch_batches, golden_texts, load_raw, load_splits

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.read_parquet(AGNEWS / "test.parquet").groupby("label").head(30).reset_index(drop=True)


def _cfg(data, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), **kw)


# .json: JSON lines (as `datasets.to_json` writes it) or one array of records, on one line or indented
# (an array was read as JSON lines: a parse error, or one row of dicts)
@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "json-lines", "json-array", "json-array-indented"])
def test_each_local_format_reads_the_same_rows(tmp_path, rows, fmt):
    path = tmp_path / f"train.{fmt.split('-')[0]}"
    {
        "parquet": lambda: rows.to_parquet(path),
        "csv": lambda: rows.to_csv(path, index=False),
        "jsonl": lambda: rows.to_json(path, orient="records", lines=True),
        "json-lines": lambda: rows.to_json(path, orient="records", lines=True),
        "json-array": lambda: rows.to_json(path, orient="records"),
        "json-array-indented": lambda: path.write_text("\ufeff\n  " + rows.to_json(orient="records", indent=2)),
    }[fmt]()
    raw = load_raw(_cfg(path))
    assert list(raw) == ["train"]
    assert raw["train"]["text"].tolist() == rows["text"].tolist()
    assert raw["train"]["label"].astype(int).tolist() == rows["label"].tolist()


def test_agnews_original_headerless_csv(tmp_path, rows):
    # class,title,description with classes 1..4; text = title + " " + description, label = class - 1
    original = pd.DataFrame(
        {"class": rows["label"] + 1, "title": [f"Title, {i}" for i in range(len(rows))], "description": rows["text"]}
    )
    d = tmp_path / "agnews"
    d.mkdir()
    original.to_csv(d / "train.csv", header=False, index=False)
    original.head(8).to_csv(d / "test.csv", header=False, index=False)
    splits = load_splits(_cfg(d, val_fraction=0.1))
    everything = pd.concat([splits.train, splits.val])
    expected = {f"Title, {i} {t}": lab for i, (t, lab) in enumerate(zip(rows["text"], rows["label"], strict=True))}
    assert dict(zip(everything["text"], everything["label"], strict=True)) == expected
    assert splits.test["label"].tolist() == rows["label"].head(8).tolist()


def test_directory_with_custom_columns_and_label_names(tmp_path, rows):
    df = pd.DataFrame(
        {"body": rows["text"], "topic": [["World", "Sports", "Business", "Sci/Tech"][i] for i in rows["label"]]}
    )
    df.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    df.head(12).to_parquet(tmp_path / "test-part.parquet")
    splits = load_splits(_cfg(tmp_path, text_column="body", label_column="topic", val_fraction=0.2))
    assert sorted(splits.train["label"].unique()) == [0, 1, 2, 3]
    assert splits.test["label"].tolist() == rows["label"].head(12).tolist()


def test_stratified_validation_split_and_caps(tmp_path, rows):
    rows.to_parquet(tmp_path / "train.parquet")
    splits = load_splits(_cfg(tmp_path, val_fraction=0.2, seed=3))
    assert len(splits.val) == 24 and splits.val["label"].value_counts().tolist() == [6, 6, 6, 6]
    assert not set(splits.val["text"]) & set(splits.train["text"])
    assert splits.test is None
    again = load_splits(_cfg(tmp_path, val_fraction=0.2, seed=3, train_subset=40))
    assert len(again.train) == 40 and again.train["label"].value_counts().tolist() == [10, 10, 10, 10]
    assert again.val["text"].tolist() == splits.val["text"].tolist()  # capping train never moves validation rows


def test_bad_data_reports_all_problems_at_once(tmp_path, rows):
    d = tmp_path / "bad"
    d.mkdir()
    train = rows.copy()
    train.loc[0, "label"] = 7
    train.loc[1, "label"] = -1
    train.loc[2, "text"] = "   "
    train.loc[4, "text"] = None  # a missing text (null in Parquet): reported with the others, not in the tokenizer
    train.to_parquet(d / "train.parquet")
    rows.rename(columns={"text": "body"}).to_parquet(d / "test.parquet")
    with pytest.raises(DataError) as e:
        load_splits(_cfg(d))
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert "train: 2 label(s) outside 0..3" in problems[0] and "'-1'" in problems[0] and "'7'" in problems[0]
    assert problems[1] == "train: 2 empty text(s) at rows [2, 4]; drop or fill them"
    assert problems[2].startswith("test: missing column(s) ['text']; columns are ['body', 'label']")


def test_unreachable_hub_names_the_offline_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_raw(_cfg("fancyzhx/ag_news"))
    assert "cannot load Hub dataset 'fancyzhx/ag_news'" in str(e.value)
    assert "--set data=../shared/data/ag_news" in str(e.value)


def test_length_grouped_batches_pad_far_less(rows):
    tok = tokenizer()
    data = encode(pd.concat([rows] * 4, ignore_index=True), tok, 128)
    lengths = data.lengths

    def padded_tokens(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    grouped = epoch_batches(lengths, 16, seed=0, epoch=0, grouped=True)
    plain = epoch_batches(lengths, 16, seed=0, epoch=0, grouped=False)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(len(lengths)))  # every row once per epoch
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
    # deterministic per (seed, epoch), different across epochs: resume replays exactly
    again = epoch_batches(lengths, 16, seed=0, epoch=0, grouped=True)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again, strict=True))
    assert not np.array_equal(grouped[0], epoch_batches(lengths, 16, seed=0, epoch=1, grouped=True)[0])
    batch = collate(data, grouped[0], tok.pad_token_id)
    assert batch["input_ids"].shape[1] == lengths[grouped[0]].max()
    assert batch["attention_mask"].sum().item() == lengths[grouped[0]].sum()


def test_golden_texts_are_fixed_rows_per_class(rows):
    texts = golden_texts(rows, 2, 4)
    assert texts == [t for lab in range(4) for t in rows.loc[rows["label"] == lab, "text"].head(2)]


def test_widths_pad_to_the_multiple_a_bf16_cpu_forward_wants_never_past_max_length(rows):
    from models.hardware import width_multiple
    from models.loading import padded_width

    assert width_multiple("cpu", "bf16") == 16
    assert width_multiple("cpu", "fp32") == width_multiple("cuda", "bf16") == 1  # MKL / graph buckets
    assert [padded_width(n, 16, 128) for n in (1, 16, 17, 120, 128, 130)] == [16, 16, 32, 128, 128, 130]
    assert padded_width(50, 16, 40) == 50  # a row longer than the cap keeps its width
    tok = tokenizer()
    data = encode(rows, tok, 20)
    idx = np.argsort(data.lengths)[:5]
    batch = collate(data, idx, tok.pad_token_id, length_multiple=16, max_length=20)
    longest = int(data.lengths[idx].max())
    assert batch["input_ids"].shape[1] == min(-(-longest // 16) * 16, 20)
    assert batch["attention_mask"].sum().item() == data.lengths[idx].sum()  # the padding is masked


# ---- bring-your-own-data review: each of these failed on the old reader ----
# A configured class with no training rows (binary data + default 4 AG News labels, or a class
#    only in test) trains silently: 4-class head, variant labels World/Sports/Business/Sci/Tech
def test_configured_class_without_training_rows_is_an_error(tmp_path, rows):
    binary = rows[rows["label"] < 2]
    binary.to_csv(tmp_path / "train.csv", index=False)
    rows.to_csv(tmp_path / "test.csv", index=False)  # classes 2 and 3 only in test
    with pytest.raises(DataError) as e:
        load_splits(_cfg(tmp_path))
    assert "Business" in str(e.value) and "Sci/Tech" in str(e.value)


# Parquet shards: only the first train* file is read, the rest silently dropped
def test_every_shard_of_a_split_is_read(tmp_path, rows):
    rows.iloc[::2].to_parquet(tmp_path / "train-00000-of-00002.parquet")
    rows.iloc[1::2].to_parquet(tmp_path / "train-00001-of-00002.parquet")
    assert len(load_raw(_cfg(tmp_path))["train"]) == len(rows)


# CSV / JSONL type inference rewrites texts that look like numbers ("007" -> "7", "1.50" -> "1.5")
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_numeric_looking_texts_are_kept_verbatim(tmp_path, rows, fmt):
    df = pd.DataFrame({"text": [f"00{i}.50" for i in range(len(rows))], "label": rows["label"]})
    path = tmp_path / f"train.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_json(path, orient="records", lines=True)
    s = load_splits(_cfg(path))
    assert set(pd.concat([s.train, s.val])["text"]) == set(df["text"])


# a categorical label column (pandas `category`, kept by Parquet) crashes with a TypeError traceback
def test_categorical_label_names(tmp_path, rows):
    df = rows.assign(label=pd.Categorical([NAMES[i] for i in rows["label"]]))
    df.to_parquet(tmp_path / "train.parquet")
    s = load_splits(_cfg(tmp_path))
    assert sorted(s.train["label"].unique()) == [0, 1, 2, 3]


# JSONL with a UTF-8 BOM: "Expected object or value at position 0", no file named
def test_jsonl_with_bom(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + rows.to_json(orient="records", lines=True).encode())
    assert len(load_raw(_cfg(path))["train"]) == len(rows)


# subset caps the stratified sampler cannot honour: raw sklearn ValueError naming no config key
@pytest.mark.parametrize("kw", [dict(train_subset=2), dict(val_subset=3)])
def test_impossible_subset_names_the_key(tmp_path, rows, kw):
    rows.to_parquet(tmp_path / "train.parquet")
    with pytest.raises(DataError) as e:
        load_splits(_cfg(tmp_path, **kw))
    assert next(iter(kw)) in str(e.value)


# a Hub dataset's ClassLabel names are ignored: config labels in another order mislabel silently
def test_hub_classlabel_names_must_match_labels(monkeypatch, rows):
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(rows, features=feats, preserve_index=False)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    swapped = ["Sports", "World", "Business", "Sci/Tech"]
    with pytest.raises(DataError) as e:
        load_splits(_cfg("someone/news", labels=swapped))
    assert "World" in str(e.value)
