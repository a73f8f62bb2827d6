"""Experiment `recipe-compare`: the study's training pipeline vs `training`, same model, same steps.

    python -m benchmarks recipe-compare --steps 30 --out reports/results/recipe-compare.json

The study's pipeline as the study ran it: the *whole* train sample mapped with
`datasets.map(batched=True, batch_size=1000)` and `padding=True` (every 1,000-row chunk padded to
its longest text), `DataCollatorWithPadding`, transformers `Trainer` with its shuffled sampler —
so batches mix rows of different chunks and are nearly as wide as the widest chunk.
`training`: tokenise once, length-grouped batches padded per batch, precision chosen by the
hardware, one accelerate loop, timed over `--training-runs` runs (medians). Both fully fine-tune
the same pretrained model for the same number of optimizer steps at the same batch size, lr and
schedule (so the same number of samples), then are scored by the same fp32 function on the same
stratified test rows.
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
    steady_after: int = Field(10, ge=1, description="steps left out of the steady samples/s of both (warm-up)")
    study_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the study recipe's precision (its Trainer default: fp32; bf16 = its GPU setting)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="`training`'s precision")
    training_runs: int = Field(
        3,
        ge=1,
        description="runs of `training` in this process (same seed and steps); its samples/s are the runs' "
        "medians, every run's kept. Its timed window is ~20x shorter than the study's, so one run is at the mercy "
        "of a noisy machine's minute; later runs find oneDNN's kernels for its widths made, as a long run's steps do",
    )
    overrides: list[str] = Field([], description="extra config overrides key=value (both recipes), comma-separated")


def _accuracy(model: Any, tokenizer: Any, texts: list[str], labels: list[int]) -> float:
    """The same fp32 scoring for both models (length-sorted batches, order restored)."""
    import numpy as np

    from models.loading import compute_logits

    order = np.argsort([-len(t) for t in texts], kind="stable")
    logits = compute_logits(model, tokenizer, [texts[i] for i in order], 512).numpy()
    preds = np.empty(len(texts), dtype=np.int64)
    preds[order] = logits.argmax(-1)
    return float((preds == np.asarray(labels)).mean())


def study_recipe(
    cfg: Any, train_df: Any, steps: int, precision: str, out_dir: Path, steady_after: int
) -> tuple[Any, dict[str, Any]]:
    """The study's recipe, as it was written: whole sample mapped in 1,000-row chunks, Trainer, shuffled."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from models.loading import load_tokenizer
    from training.loop import build_model

    tokenizer = load_tokenizer(cfg.tokenizer_path)
    ds = Dataset.from_pandas(train_df[["text", "label"]].rename(columns={"label": "labels"}), preserve_index=False)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)  # the same builder (and seed) as `training`: the same initial model
    # The study truncates at the tokenizer's limit (512); a test model with fewer positions caps it.
    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings - 2)
    t_map = time.perf_counter()
    ds = ds.map(
        lambda b: tokenizer(b["text"], padding=True, truncation=True, max_length=limit),
        batched=True,
        batch_size=1000,
        remove_columns=["text"],
    )
    map_s = time.perf_counter() - t_map
    widths = [len(x) for x in ds["input_ids"]]
    marks: dict[int, float] = {}  # Trainer step -> wall time, device work finished

    class StepClock(TrainerCallback):
        """Times the Trainer's step `steady_after` and its last: the same warm-up left out as `training`'s."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (steady_after, state.max_steps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

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
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[StepClock()],
    )
    out = trainer.train()
    return model.eval(), {
        "train_time_s": out.metrics["train_runtime"],
        "samples_per_s": out.metrics["train_samples_per_second"],
        "steady_samples_per_s": _steady_samples_per_s(marks, cfg.batch_size),
        "map_s": map_s,
        "mapped_rows": len(ds),
        "chunk_width_min": min(widths),
        "chunk_width_max": max(widths),
        "precision": precision,
    }


def _steady_samples_per_s(marks: dict[int, float], batch: int) -> float | None:
    """Samples/s between the first and last marked Trainer steps (wall time at each)."""
    (s0, t0), (s1, t1) = min(marks.items()), max(marks.items())
    return batch * (s1 - s0) / (t1 - t0) if s1 > s0 else None


def ours(cfg: Any, tmp: Path) -> tuple[Any, dict[str, Any]]:
    from models import Store
    from models.loading import load_full
    from training.loop import train

    store = Store(tmp / "store")
    result = train(cfg, store=store, runs_dir=tmp / "runs")
    info = result["train_info"]
    model = load_full(store.path(cfg.name))[0] if cfg.save_variant else None
    keep = ("train_time_s", "samples_per_s", "tokens_seen", "peak_memory_bytes", "precision", "compile")
    out = {k: info[k] for k in keep if k in info}
    out["steady_samples_per_s"] = (info.get("steady") or {}).get("samples_per_s")
    return model, out


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each speed figure of `training` as the median over its runs, beside every run's figures."""
    import statistics

    keys = ("train_time_s", "samples_per_s", "steady_samples_per_s")
    out: dict[str, Any] = {"runs": [{k: r.get(k) for k in keys} for r in runs]}
    for k in keys:
        values = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(values) if values else None
    return out


def _precision(p: Any) -> str:
    return p["precision"] if isinstance(p, dict) else str(p)


def _acc(v: float | None) -> str:
    return "– (random init)" if v is None else f"{v:.4f}"


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    from benchmarks.report import source_line, table

    parts = ["## Training speed vs the study's recipe (`recipe-compare`)"]
    for f, doc in docs:
        p, s = doc["payload"], doc["settings"]
        t, r = p["training"], p["study_recipe"]
        where = f"GPU {p['gpu']}" if p.get("gpu") else "CPU"
        scored = p.get("accuracy_delta_points") is not None
        parts.append(
            f"\n{where}: {s['steps']} steps × {s['batch_size']} on the same model ({p['model']}"
            f"{', random init' if p.get('init') == 'random' else ''}); the study's pipeline maps "
            f"all {r['mapped_rows']:,} train rows in 1,000-row chunks (chunk widths {r['chunk_width_min']}–"
            f"{r['chunk_width_max']} tokens)"
            + (f"; test accuracy on {p['test_rows']} stratified rows.\n" if scored else ".\n")
        )
        parts.append(
            table(
                ["recipe", "precision", "samples/s (whole run)", f"samples/s after step {s.get('steady_after', '–')}"]
                + ["train s", "test accuracy"],
                [
                    ["training", _precision(t.get("precision")), t["samples_per_s"], t.get("steady_samples_per_s")]
                    + [t["train_time_s"], _acc(t["test_accuracy"])],
                    ["study recipe", r["precision"], r["samples_per_s"], r.get("steady_samples_per_s")]
                    + [r["train_time_s"], _acc(r["test_accuracy"])],
                ],
            )
        )
        if len(t.get("runs") or []) > 1:
            per_run = ", ".join(_x(run.get("steady_samples_per_s")) for run in t["runs"])
            parts.append(f"\ntraining: medians of {len(t['runs'])} runs (after the warm-up: {per_run} samples/s).")
        steady = p.get("steady_samples_per_s_ratio")
        parts.append(
            f"\n**{p['samples_per_s_ratio']:.1f}×** the study recipe's samples/s over the whole run"
            + (f", **{steady:.1f}×** after the warm-up steps" if steady else "")
            + (f"; accuracy {p['accuracy_delta_points']:+.2f} points" if scored else "")
            + ".\n\n"
            + source_line(f, doc, out_dir)
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

    overrides = [
        f"batch_size={s.batch_size}",
        f"max_steps={s.steps}",
        f"lr={s.lr}",
        f"precision={s.precision}",
        f"test_subset={s.test_samples}",
        f"log_every={s.steady_after}",  # its first log boundary starts the steady interval
        "eval_every=0",
        "checkpoint_every=0",
        "eval_test=false",
        "name=recipe-compare-ours",
        *s.overrides,
    ]
    cfg = load_config(s.config, overrides)
    scored = cfg.init == "pretrained"  # random weights: speed only, accuracy is never reported
    if not scored:
        cfg = load_config(s.config, [*overrides, "save_variant=false"])
    splits = load_splits(cfg)
    test = splits.test
    print(
        f"[recipe-compare] {cfg.base_model}; {len(splits.train)} train rows, batch {cfg.batch_size}, {s.steps} steps, "
        f"lr {cfg.lr}; {len(test)} test rows; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    texts, labels = test["text"].tolist(), test["label"].tolist()
    tok = load_tokenizer(cfg.tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        model, ours_r = ours(cfg, Path(tmp))
        ours_r["test_accuracy"] = _accuracy(model, tok, texts, labels) if scored else None
        print(f"[recipe-compare] training: {ours_r}", flush=True)
        # Further runs time the same steps again (no store written); the first run's model is the one scored.
        speed_cfg = load_config(s.config, [*overrides, "save_variant=false"])
        runs = [ours_r] + [ours(speed_cfg, Path(tmp) / f"run{k}")[1] for k in range(1, s.training_runs)]
        medians = _medians(runs)
        ours_r = {**ours_r, **medians}
        print(f"[recipe-compare] training, median of {len(runs)} runs: {medians}", flush=True)
        model, study_r = study_recipe(
            cfg, splits.train, s.steps, s.study_precision, Path(tmp) / "trainer", s.steady_after
        )
        study_r["test_accuracy"] = _accuracy(model.cpu().float(), tok, texts, labels) if scored else None
        print(f"[recipe-compare] study recipe: {study_r}", flush=True)
    ratio = ours_r["samples_per_s"] / study_r["samples_per_s"]
    a, b = ours_r["steady_samples_per_s"], study_r["steady_samples_per_s"]
    steady_ratio = a / b if a and b else None
    delta = 100 * (ours_r["test_accuracy"] - study_r["test_accuracy"]) if scored else None
    print(
        f"[recipe-compare] samples/s: training {ours_r['samples_per_s']:.1f} vs study recipe "
        f"{study_r['samples_per_s']:.1f} -> {ratio:.1f}x (steady after step {s.steady_after}: "
        f"{_x(steady_ratio)}x); accuracy {'–' if delta is None else f'{delta:+.2f}'} points",
        flush=True,
    )
    return {
        "model": cfg.base_model,
        "init": cfg.init,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "training": ours_r,
        "study_recipe": study_r,
        "samples_per_s_ratio": ratio,
        "steady_samples_per_s_ratio": steady_ratio,
        "test_rows": len(test) if scored else 0,
        "accuracy_delta_points": delta,
    }


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"
