"""Data: load AG News-shaped datasets, validate them, split, tokenise once, length-grouped batches.

Sources: a Hub dataset id (`datasets.load_dataset`) or a local directory / file — Parquet,
CSV (with a header, or the original AG News header-less `class,title,description` layout with
classes 1..4) or JSONL. A directory holds `train*` and optionally `test*` files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.loading import pad_rows, padded_width
from training.config import TrainConfig

OFFLINE_HINT = "--set data=../shared/data/ag_news"
SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


class DataError(ValueError):
    """Data that cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"data: {len(self.problems)} problem(s):\n  - " + "\n  - ".join(self.problems))


# ---- reading ---------------------------------------------------------------------------------


def read_table(path: Path) -> pd.DataFrame:
    """One local file as a DataFrame; AG News original header-less CSV becomes (text, label)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError([f"{path}: unsupported file type {suffix!r}; use one of {list(SUFFIXES)}"])
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            # utf-8-sig: a byte-order mark (Windows editors, Excel) is not a parse error. A .json file
            # is JSON lines as `datasets.to_json` writes it, or one array of records (`json.dump(rows)`,
            # `df.to_json(orient="records")`): read as lines, an array became rows of dicts
            lines = not _starts_with(path, "[")
            orient = None if lines else "records"
            return pd.read_json(path, lines=lines, orient=orient, dtype=False, encoding="utf-8-sig")
        return _read_csv(path)
    except (ValueError, OSError) as e:  # pandas/pyarrow parse errors (ParserError, ArrowInvalid, ...) are ValueErrors
        what = (str(e).splitlines() or [""])[0][:200]
        raise DataError(
            [f"{path}: cannot be read as {suffix[1:]} ({type(e).__name__}: {what}); fix or re-export it"]
        ) from e


def _starts_with(path: Path, char: str) -> bool:
    """Whether the file's first character past a byte-order mark and whitespace is `char`."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0] == char
    return False


def _read_csv(path: Path) -> pd.DataFrame:
    raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    first = raw.iloc[0].tolist() if len(raw) else []
    # Original AG News layout: no header, 3 columns, class 1..4 in the first column.
    if raw.shape[1] == 3 and first and first[0].strip().isdigit():
        classes = pd.to_numeric(raw[0], errors="coerce")
        return pd.DataFrame({"text": raw[1] + " " + raw[2], "label": classes - 1})
    return pd.read_csv(path, keep_default_na=False, dtype=str)  # texts verbatim; `clean` parses the labels


def _split_files(directory: Path) -> dict[str, list[Path]]:
    """Every `<split>*` file of each split, by name (Parquet shards `train-0000N-of-0000M` are one split)."""
    files: dict[str, list[Path]] = {}
    for p in sorted(directory.iterdir()):
        if p.suffix.lower() not in SUFFIXES:
            continue
        for split in ("train", "test"):
            if p.name.lower().startswith(split):
                files.setdefault(split, []).append(p)
    return {split: files[split] for split in ("train", "test") if split in files}


_SHARD = re.compile(r"-\d+-of-\d+$")


def _read_files(split: str, paths: list[Path]) -> pd.DataFrame:
    """One split from its files: shards (`train-00000-of-00002.parquet`, ...) concatenated in name order;
    several other `<split>*` files are an error (a copy in another format or a subset beside the full file)."""
    shards = all(_SHARD.search(p.stem) for p in paths) and len({p.suffix.lower() for p in paths}) == 1
    if len(paths) > 1 and not shards:
        raise DataError(
            [
                f"{split}: several {split}* files {[p.name for p in paths]}; keep one, or name shards {split}-00000-of-00002.parquet, ..."
            ]
        )
    return pd.concat([read_table(p) for p in paths], ignore_index=True)


def load_raw(cfg: TrainConfig) -> dict[str, pd.DataFrame]:
    """{'train': df, 'test': df (when the source has one)} from the configured source."""
    src = Path(cfg.data)
    if src.is_dir():
        files = _split_files(src)
        if "train" not in files:
            raise DataError([f"{src} has no train*.parquet/.csv/.jsonl file; put the training split there"])
        return {split: _read_files(split, paths) for split, paths in files.items()}
    if src.is_file():
        return {"train": read_table(src)}
    return _load_hub(cfg.data, cfg.label_column, cfg.labels)


class MissingSplit(DataError):
    """The source has no such split (callers may fall back to another)."""


@dataclass(frozen=True)
class Columns:
    """Which columns hold text and label, and the label names: what `clean` needs from a config."""

    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")


def read_split(
    data: str | Path,
    split: str = "test",
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] = Columns.labels,
) -> pd.DataFrame:
    """One split as a validated (text, label) frame, picked and read exactly as training does.

    The one AG News reader: evaluation and the benchmarks call this, so every consumer reads
    the same files (a directory's `<split>*` files, in name order; a single file is the split
    asked for; otherwise a Hub dataset id).
    """
    src = Path(data)
    if src.is_dir():
        files = _split_files(src)
        if split not in files:
            raise MissingSplit([f"{src} has no {split}*.parquet/.csv/.jsonl file; put the {split} split there"])
        raw = _read_files(split, files[split])
    elif src.is_file():
        raw = read_table(src)
    else:
        splits = _load_hub(str(data), label_column, list(labels))
        if split not in splits:
            raise MissingSplit([f"Hub dataset '{data}' has no '{split}' split; it has {sorted(splits)}"])
        raw = splits[split]
    df, problems = clean(raw, Columns(text_column, label_column, tuple(labels)), split)  # type: ignore[arg-type]
    if problems:
        raise DataError(problems)
    return df


def _load_hub(dataset_id: str, label_column: str, labels: Sequence[str]) -> dict[str, pd.DataFrame]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id)
    except Exception as e:  # the Hub raises many types when offline (ConnectionError, OfflineModeIsEnabled, ...)
        raise DataError(
            [
                f"cannot load Hub dataset '{dataset_id}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"offline, use a local copy: {OFFLINE_HINT}"
            ]
        ) from e
    splits = [split for split in ("train", "test") if split in ds]
    # A ClassLabel column carries the dataset's own names, in index order: `labels` must be those names in
    # that order (else every name the variant reports is another class's).
    for split in splits:
        names = getattr(ds[split].features.get(label_column), "names", None)
        if names is not None and list(names) != list(labels):
            raise DataError(
                [
                    f"Hub dataset '{dataset_id}' names its {label_column} classes {list(names)} (in index order), "
                    f"labels is {list(labels)}; set labels: {list(names)}"
                ]
            )
    return {split: ds[split].to_pandas() for split in splits}


# ---- validation ------------------------------------------------------------------------------


def clean(df: pd.DataFrame, cfg: TrainConfig, split: str) -> tuple[pd.DataFrame, list[str]]:
    """(text, label) frame with int labels 0..n-1, plus every problem found in this split."""
    problems = []
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in df.columns]
    if missing:
        return df, [
            f"{split}: missing column(s) {missing}; columns are {list(df.columns)} — set text_column / label_column"
        ]
    text = df[cfg.text_column].astype(str)
    raw = df[cfg.label_column]
    if isinstance(raw.dtype, pd.CategoricalDtype):  # pandas `category` (kept by Parquet): compare values, not codes
        raw = raw.astype(object)
    n = len(cfg.labels)
    if not pd.api.types.is_numeric_dtype(raw) and not pd.to_numeric(raw, errors="coerce").notna().all():
        index = {name: i for i, name in enumerate(cfg.labels)}
        labels = raw.map(index)
        bad = sorted({str(v) for v in raw[labels.isna()]})[:5]
        if bad:
            problems.append(f"{split}: label names {bad} are not in labels {cfg.labels}; fix the data or labels")
    else:
        labels = pd.to_numeric(raw, errors="coerce")
    out_of_range = ~labels.between(0, n - 1) | labels.isna() | (labels != labels.round())
    if out_of_range.any() and not problems:
        examples = sorted({str(v) for v in raw[out_of_range]})[:5]
        problems.append(
            f"{split}: {int(out_of_range.sum())} label(s) outside 0..{n - 1} (e.g. {examples}); "
            f"labels must index {cfg.labels} (original AG News classes 1..4 are shifted automatically "
            "only for the header-less CSV)"
        )
    # a missing text (None/NaN in Parquet/JSONL) is empty too: astype(str) keeps it missing, and the tokenizer
    # would fail on it only after the model is built
    empty = df[cfg.text_column].isna().to_numpy() | (text.str.strip() == "").fillna(False).astype(bool).to_numpy()
    if empty.any():
        rows = np.flatnonzero(empty)[:5].tolist()
        problems.append(f"{split}: {int(empty.sum())} empty text(s) at rows {rows}; drop or fill them")
    if problems:
        return df, problems
    out = pd.DataFrame({"text": text.to_numpy(), "label": labels.astype(int).to_numpy()})
    return out, problems


def cap_problem(df: pd.DataFrame, cap: int | None, key: str, split: str) -> str | None:
    """Why `cap` rows cannot be a stratified sample of `df` (sklearn's conditions), or None."""
    if cap is None or cap >= len(df):
        return None
    counts = df["label"].value_counts()
    if counts.size <= cap <= len(df) - counts.size and counts.min() >= 2:
        return None
    return (
        f"{key}: {cap} cannot be a stratified sample of the {len(df)} {split} rows (class counts "
        f"{counts.to_dict()}): it needs {counts.size}..{len(df) - counts.size} rows and >= 2 rows in every class; "
        f"change {key} or set it to null"
    )


def stratified_cap(df: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    if cap is None or cap >= len(df):
        return df
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(df, train_size=cap, stratify=df["label"], random_state=seed)
    return keep.sort_index()


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame | None


def load_splits(cfg: TrainConfig) -> Splits:
    """Train / validation (stratified, carved from train) / test, validated all at once."""
    from sklearn.model_selection import train_test_split

    raw = load_raw(cfg)
    problems: list[str] = []
    cleaned = {}
    for split, df in raw.items():
        out, p = clean(df, cfg, split)
        problems += p
        cleaned[split] = out
    if problems:
        raise DataError(problems)
    train = cleaned["train"]
    # every configured class, those with no row included (value_counts leaves them out)
    counts = train["label"].value_counts().reindex(range(len(cfg.labels)), fill_value=0)
    if counts.min() < 2:
        per_class = {cfg.labels[i]: int(c) for i, c in counts.items()}
        raise DataError(
            [
                f"train: class counts {per_class}; every class in labels needs >= 2 training rows — "
                "set labels to the classes your data has, in index order, or add rows"
            ]
        )
    n_val = max(len(cfg.labels), math.ceil(cfg.val_fraction * len(train)))
    train, val = train_test_split(train, test_size=n_val, stratify=train["label"], random_state=cfg.seed)
    test = cleaned.get("test")
    caps = [(train, cfg.train_subset, "train_subset", "training"), (val, cfg.val_subset, "val_subset", "validation")]
    if test is not None:
        caps.append((test, cfg.test_subset, "test_subset", "test"))
    problems = [p for df, cap, key, split in caps if (p := cap_problem(df, cap, key, split))]
    if problems:
        raise DataError(problems)
    train = stratified_cap(train.sort_index(), cfg.train_subset, cfg.seed)
    val = stratified_cap(val.sort_index(), cfg.val_subset, cfg.seed)
    if test is not None:
        test = stratified_cap(test, cfg.test_subset, cfg.seed)
    return Splits(
        train.reset_index(drop=True), val.reset_index(drop=True), None if test is None else test.reset_index(drop=True)
    )


def golden_texts(df: pd.DataFrame, per_class: int, num_labels: int) -> list[str]:
    """Fixed golden set: the first `per_class` texts of each class, in file order."""
    texts = []
    for label in range(num_labels):
        texts += df.loc[df["label"] == label, "text"].head(per_class).tolist()
    return texts


# ---- tokenising and batching -----------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def encode(df: pd.DataFrame, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise once, unpadded: padding happens per batch."""
    enc = tokenizer(df["text"].tolist(), truncation=True, max_length=max_length)
    return Encoded(list(enc["input_ids"]), df["label"].astype(int).tolist())


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, grouped: bool) -> list[np.ndarray]:
    """Batches of indices for one epoch; a pure function of (seed, epoch) so resume can replay it.

    Length grouping (hand-written for that determinism): shuffle, cut into mega-batches of
    50 batches, sort each by length, split into batches, shuffle the batch order. Each batch
    is padded only to its own longest text.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if grouped:
        mega = batch_size * 50
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if grouped:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def shard(batch: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, int]:
    """(row indices, how many are real) of this process's part of a global batch.

    Every `world`-th row from `rank`: a length-grouped batch is sorted by length, so striding gives
    every process rows of about the same length (equal padding, equal step time). A process whose
    part of a small last batch is empty gets the batch's first row as a filler (0 real rows): its
    DDP peers still wait for its gradient all-reduce. A pure function of its arguments, so a resumed
    run replays the same rows on the same process.
    """
    mine = batch[rank::world]
    return (mine, len(mine)) if len(mine) else (batch[:1], 0)


def collate(
    data: Encoded,
    idx: Sequence[int],
    pad_id: int,
    *,
    real: int | None = None,
    rows: int = 0,
    length_multiple: int = 1,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member, rounded up to `length_multiple` tokens (never past
    `max_length`, which the position embeddings were sized for).

    Rows after the first `real` (default: all are real) and filler rows added to make the batch
    `rows` tall are copies of real text with label -100, which the loss ignores: a compiled step
    then sees a few shapes instead of one per batch.
    """
    idx = list(idx)
    real = len(idx) if real is None else real
    idx += [idx[0]] * (rows - len(idx))
    longest = max(len(data.input_ids[i]) for i in idx)
    target = padded_width(longest, length_multiple, max_length)
    ids, mask = pad_rows([data.input_ids[i] for i in idx], pad_id, width=target)
    labels = torch.tensor([data.labels[i] for i in idx[:real]] + [-100] * (len(idx) - real), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_batches(data: Encoded, batch_size: int) -> Iterator[np.ndarray]:
    """Length-sorted batches (order restored by the caller via the indices)."""
    order = np.argsort(-data.lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]
