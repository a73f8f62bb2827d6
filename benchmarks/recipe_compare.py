"""Experiment `recipe-compare`: the study's training pipeline vs `training`, same model, same steps.

    python -m benchmarks recipe-compare --steps 30 --out reports/results/recipe-compare.json

The study's pipeline as the study ran it: the *whole* train sample mapped with
`datasets.map(batched=True, batch_size=1000)` and `padding=True` (every 1,000-row chunk padded to
its longest text), `DataCollatorWithPadding`, transformers `Trainer` with its shuffled sampler —
so batches mix rows of different chunks and are nearly as wide as the widest chunk.
`training`: tokenise once, length-grouped batches padded per batch, precision chosen by the
hardware, one accelerate loop. Both fully fine-tune the same pretrained model for the same number
of optimizer steps at the same batch size, lr and schedule (so the same number of samples), then
are scored by the same fp32 function on the same stratified test rows.
Run it alone: other heavy jobs on the machine distort samples/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from benchmarks.experiment import Settings, experiment


class RecipeCompareSettings(Settings):
    config: str = Field("configs/demo-minilm-full.yaml", description="model, data, lr, seed come from this config")
    steps: int = Field(30, gt=0, description="optimizer steps timed for each recipe (same batch size: same samples)")
    batch_size: int = Field(16, gt=0, description="per-step batch for both (the study's: 16)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate for both")
    test_samples: int = Field(1000, gt=0, description="stratified test rows scored for both")
    study_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the study recipe's precision (its Trainer default: fp32; bf16 = its GPU setting)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="`training`'s precision")


def _accuracy(model: Any, tokenizer: Any, texts: list[str], labels: list[int]) -> float:
    """The same fp32 scoring for both models (length-sorted batches, order restored)."""
    import numpy as np

    from models.loading import compute_logits

    order = np.argsort([-len(t) for t in texts], kind="stable")
    logits = compute_logits(model, tokenizer, [texts[i] for i in order], 512).numpy()
    preds = np.empty(len(texts), dtype=np.int64)
    preds[order] = logits.argmax(-1)
    return float((preds == np.asarray(labels)).mean())


def study_recipe(cfg: Any, train_df: Any, steps: int, precision: str, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The study's recipe, as it was written: whole sample mapped in 1,000-row chunks, Trainer, shuffled."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.base_model)
    ds = Dataset.from_pandas(train_df[["text", "label"]].rename(columns={"label": "labels"}), preserve_index=False)
    t_map = time.perf_counter()
    ds = ds.map(
        lambda b: tokenizer(b["text"], padding=True, truncation=True),
        batched=True,
        batch_size=1000,
        remove_columns=["text"],
    )
    map_s = time.perf_counter() - t_map
    widths = [len(x) for x in ds["input_ids"]]
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.base_model, num_labels=len(cfg.labels))
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=steps,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type="linear",
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer))
    out = trainer.train()
    return model.eval(), {
        "train_time_s": out.metrics["train_runtime"],
        "samples_per_s": out.metrics["train_samples_per_second"],
        "map_s": map_s,
        "mapped_rows": len(ds),
        "chunk_width_min": min(widths),
        "chunk_width_max": max(widths),
        "precision": precision,
    }


def ours(cfg: Any, tmp: Path) -> tuple[Any, dict[str, Any]]:
    from models import Store
    from models.loading import load_full
    from training.loop import train

    store = Store(tmp / "store")
    result = train(cfg, store=store, runs_dir=tmp / "runs")
    info = result["train_info"]
    model, _ = load_full(store.path(cfg.name))
    keep = ("train_time_s", "samples_per_s", "tokens_seen", "peak_memory_bytes", "precision", "compile")
    return model, {k: info[k] for k in keep if k in info}


def _precision(p: Any) -> str:
    return p["precision"] if isinstance(p, dict) else str(p)


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    from benchmarks.report import source_line, table

    parts = ["## Training speed vs the study's recipe (`recipe-compare`)"]
    for f, doc in docs:
        p, s = doc["payload"], doc["settings"]
        t, r = p["training"], p["study_recipe"]
        parts.append(
            f"\n{s['steps']} steps × {s['batch_size']} on the same model ({p['model']}); the study's pipeline maps "
            f"all {r['mapped_rows']:,} train rows in 1,000-row chunks (chunk widths {r['chunk_width_min']}–"
            f"{r['chunk_width_max']} tokens); test accuracy on {p['test_rows']} stratified rows.\n"
        )
        parts.append(
            table(
                ["recipe", "precision", "samples/s", "train s", "test accuracy"],
                [
                    [
                        "training",
                        _precision(t.get("precision")),
                        t["samples_per_s"],
                        t["train_time_s"],
                        f"{t['test_accuracy']:.4f}",
                    ],
                    [
                        "study recipe",
                        r["precision"],
                        r["samples_per_s"],
                        r["train_time_s"],
                        f"{r['test_accuracy']:.4f}",
                    ],
                ],
            )
        )
        parts.append(
            f"\n**{p['samples_per_s_ratio']:.1f}×** the study recipe's samples/s; accuracy "
            f"{p['accuracy_delta_points']:+.2f} points.\n\n" + source_line(f, doc, out_dir)
        )
    return "\n".join(parts)


@experiment(
    "recipe-compare",
    RecipeCompareSettings,
    help="training samples/s and accuracy vs the study's Trainer pipeline, same steps",
    render=render,
)
def run(s: RecipeCompareSettings) -> dict[str, Any]:
    import torch

    from models.loading import load_tokenizer
    from training.config import load_config
    from training.data import load_splits

    cfg = load_config(
        s.config,
        [
            f"batch_size={s.batch_size}",
            f"max_steps={s.steps}",
            f"lr={s.lr}",
            f"precision={s.precision}",
            f"test_subset={s.test_samples}",
            "eval_every=0",
            "checkpoint_every=0",
            "eval_test=false",
            "name=recipe-compare-ours",
        ],
    )
    splits = load_splits(cfg)
    test = splits.test
    print(
        f"[recipe-compare] {cfg.base_model}; {len(splits.train)} train rows, batch {cfg.batch_size}, {s.steps} steps, "
        f"lr {cfg.lr}; {len(test)} test rows; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    texts, labels = test["text"].tolist(), test["label"].tolist()
    tok = load_tokenizer(cfg.base_model)
    with tempfile.TemporaryDirectory() as tmp:
        model, ours_r = ours(cfg, Path(tmp))
        ours_r["test_accuracy"] = _accuracy(model, tok, texts, labels)
        print(f"[recipe-compare] training: {ours_r}", flush=True)
        model, study_r = study_recipe(cfg, splits.train, s.steps, s.study_precision, Path(tmp) / "trainer")
        study_r["test_accuracy"] = _accuracy(model, tok, texts, labels)
        print(f"[recipe-compare] study recipe: {study_r}", flush=True)
    ratio = ours_r["samples_per_s"] / study_r["samples_per_s"]
    delta = 100 * (ours_r["test_accuracy"] - study_r["test_accuracy"])
    print(
        f"[recipe-compare] samples/s: training {ours_r['samples_per_s']:.1f} vs study recipe "
        f"{study_r['samples_per_s']:.1f} -> {ratio:.1f}x; accuracy {delta:+.2f} points",
        flush=True,
    )
    return {
        "model": cfg.base_model,
        "training": ours_r,
        "study_recipe": study_r,
        "samples_per_s_ratio": ratio,
        "test_rows": len(test),
        "accuracy_delta_points": delta,
    }
