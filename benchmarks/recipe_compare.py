"""The study's training recipe vs `training`, same model, same rows, one run: samples/s and accuracy.

    python benchmarks/recipe_compare.py [--samples 1000] [--batch-size 16] [--lr 1e-4] [--test-samples 1000]

Study recipe: `datasets.map(batched=True)` tokenising 1,000-row chunks with `padding=True` (every
chunk padded to its longest text), `DataCollatorWithPadding`, transformers `Trainer`, fp32.
`training`: tokenise once, length-grouped batches padded per batch, bf16 autocast, one accelerate loop.
Both fully fine-tune the same pretrained model on the same training rows (one pass, same batch size,
lr, warmup and decay); both are then scored by the same fp32 function on the same stratified test rows.
A script that prints figures, not a test. Run it alone: other heavy jobs distort samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import Store  # noqa: E402
from models.loading import compute_logits, load_full, load_tokenizer  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import load_splits  # noqa: E402
from training.loop import train  # noqa: E402


def accuracy(model, tokenizer, texts: list[str], labels: list[int], max_length: int) -> float:
    """The same fp32 scoring for both models (length-sorted batches, order restored)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    logits = compute_logits(model, tokenizer, [texts[i] for i in order], max_length).numpy()
    preds = np.empty(len(texts), dtype=np.int64)
    preds[order] = logits.argmax(-1)
    return float((preds == np.asarray(labels)).mean())


def study_recipe(cfg, train_df, out_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The study's recipe, as it was written: Trainer + padding=True per 1,000-row map chunk, fp32."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    t_wall = time.perf_counter()
    tokenizer = load_tokenizer(cfg.base_model)
    ds = Dataset.from_pandas(train_df[["text", "label"]].rename(columns={"label": "labels"}), preserve_index=False)
    ds = ds.map(
        lambda b: tokenizer(b["text"], padding=True, truncation=True),
        batched=True,
        batch_size=1000,
        remove_columns=["text"],
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.base_model, num_labels=len(cfg.labels))
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=1,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type="linear",
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
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
    padded = sum(len(x) for x in ds["input_ids"])
    real = sum(sum(m) for m in ds["attention_mask"])
    return model.eval(), {
        "train_time_s": out.metrics["train_runtime"],
        "samples_per_s": out.metrics["train_samples_per_second"],
        "wall_s_incl_tokenise_and_load": time.perf_counter() - t_wall,
        "tokens_fed_padded": padded,
        "tokens_real": real,
        "precision": "fp32",
    }


def ours(cfg, store: Store, runs: Path) -> tuple[torch.nn.Module, dict]:
    t_wall = time.perf_counter()
    info = train(cfg, store=store, runs_dir=runs)["train_info"]
    model, _ = load_full(store.path(cfg.name))
    return model, {
        "train_time_s": info["train_time_s"],
        "samples_per_s": info["samples_per_s"],
        "wall_s_incl_tokenise_and_load": time.perf_counter() - t_wall,
        "tokens_real": info["tokens_seen"],
        "precision": cfg.precision,
        "peak_memory_bytes": info["peak_memory_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo-minilm-full.yaml", help="model, data, lr, seed come from here")
    ap.add_argument(
        "--samples",
        type=int,
        default=1000,
        help="training rows (one pass) for each recipe; 1,000 = one study map chunk",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--test-samples", type=int, default=1000, help="stratified test rows scored for both")
    ap.add_argument("--max-length", type=int, default=256, help="`training` truncation (the study: 512)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    steps = args.samples // args.batch_size
    cfg = load_config(
        args.config,
        [
            f"train_subset={steps * args.batch_size}",
            f"batch_size={args.batch_size}",
            f"max_steps={steps}",
            f"lr={args.lr}",
            f"test_subset={args.test_samples}",
            "eval_every=0",
            "checkpoint_every=0",
            "eval_test=false",
            f"max_length={args.max_length}",
            "name=recipe-compare-ours",
        ],
    )
    splits = load_splits(cfg)
    test = splits.test
    print(
        f"model {cfg.base_model}; {len(splits.train)} training rows, batch {cfg.batch_size}, {steps} steps, "
        f"lr {cfg.lr}; {len(test)} test rows; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    texts, labels = test["text"].tolist(), test["label"].tolist()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(cfg.base_model)
        model, r = ours(cfg, Store(Path(tmp) / "store"), Path(tmp) / "runs")
        r["test_accuracy"] = accuracy(model, tok, texts, labels, 512)
        results["training"] = r
        print("training:", json.dumps(r), flush=True)
        model, r = study_recipe(cfg, splits.train, Path(tmp) / "trainer")
        r["test_accuracy"] = accuracy(model, tok, texts, labels, 512)
        results["study_recipe"] = r
        print("study recipe:", json.dumps(r), flush=True)
    ratio = results["training"]["samples_per_s"] / results["study_recipe"]["samples_per_s"]
    results.update(
        {
            "samples_per_s_ratio": ratio,
            "samples": len(splits.train),
            "test_rows": len(test),
            "accuracy_delta_points": 100
            * (results["training"]["test_accuracy"] - results["study_recipe"]["test_accuracy"]),
        }
    )
    print(
        f"\nsamples/s: training {results['training']['samples_per_s']:.1f} vs study recipe "
        f"{results['study_recipe']['samples_per_s']:.1f} -> {ratio:.1f}x"
    )
    print(
        f"test accuracy ({len(test)} rows): training {results['training']['test_accuracy']:.4f} vs study recipe "
        f"{results['study_recipe']['test_accuracy']:.4f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
