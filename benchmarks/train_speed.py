"""Experiment `train-speed`: `training`'s own loop, steady-state samples/s, MFU and peak memory per
method x batch size x compile, on whatever device this machine has.

    python -m benchmarks train-speed --methods full,lora --batch-sizes 16,64,256 --steps 40 \\
        --out reports/results/train-speed-gpu.json

Each run is `training.loop.train` on the config (default: RoBERTa-large shape, random init,
MiniLM tokenizer, 8k AG News rows; `save_variant: false`, no evaluation but a small final one),
for --steps optimizer steps, loss read every --log-every steps. Figures are the loop's `steady`
throughput: from the first log boundary to the last, so the first interval (allocator warm-up,
cuBLAS / oneDNN selection, compilation) is reported apart (`first_interval_s`), not averaged in.

MFU counts model FLOPs on real (unpadded) tokens, per token of a row of mean length S:
  full  6 N + 12 L H S        (forward 2N, backward 4N; attention scores and mix 4 L H S, x3)
  lora  4 N + 6 N_trainable + 12 L H S  (frozen weights: activation gradients only)
with N the non-embedding parameters. It is divided by the device's dense peak from its datasheet
(H100/H200 SXM bf16 989 TFLOP/s) when known, and always by a matmul measured here at the start
(`matmul_tflops`), which is the ceiling this machine actually reaches.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from benchmarks.experiment import Settings, experiment

# Dense tensor-core peaks from the vendors' datasheets, TFLOP/s, by precision (no sparsity). The first key
# found in the device name wins: the PCIe and NVL cards run lower clocks and power than the SXM boards
# (H100 PCIe 756 bf16, H100 NVL / H200 NVL 835), and their names contain "H100" / "H200" as well.
DATASHEET_TFLOPS = {
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
EPOCH_ROWS = 120_000  # the full AG News train split


class TrainSpeedSettings(Settings):
    config: str = Field("configs/speed-roberta-large-random.yaml", description="training config measured")
    methods: list[str] = Field(["full", "lora"], description="fine-tuning methods, e.g. full,lora")
    batch_sizes: list[int] = Field([16, 64], description="per-step batch sizes, e.g. 16,64,256")
    compile: list[Literal["false", "true", "reduce-overhead"]] = Field(
        ["false"], description="compile settings to measure: false, true (inductor), reduce-overhead (+ CUDA graphs)"
    )
    steps: int = Field(40, ge=2, description="optimizer steps per run")
    log_every: int = Field(10, ge=1, description="steps per log interval (the first one is warm-up)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision (auto = what the hardware computes natively)"
    )
    overrides: list[str] = Field([], description="extra config overrides key=value, comma-separated")
    profile: bool = Field(
        False, description="also run each config under torch.profiler (CPU + CUDA) and keep its top operators"
    )


def model_shape(cfg: Any) -> dict[str, int]:
    """Non-embedding and embedding parameter counts, layers and width, from a meta-device build."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from models.loading import load_tokenizer
    from training.loop import build_model

    with torch.device("meta"):  # a pretrained base: its config only (from_pretrained cannot load onto meta)
        if cfg.init == "pretrained":
            model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.base_model))
        else:
            model = build_model(cfg, load_tokenizer(cfg.tokenizer_path))
    emb = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in n)
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    return {"non_embedding_params": total - emb, "embedding_params": emb, "layers": c.num_hidden_layers,
            "hidden": c.hidden_size}  # fmt: skip


def flops_per_token(method: str, shape: dict[str, int], trainable: int, mean_len: float) -> float:
    n, attention = shape["non_embedding_params"], 12 * shape["layers"] * shape["hidden"] * mean_len
    return (6 * n if method == "full" else 4 * n + 6 * trainable) + attention


def measured_matmul_tflops(device: str, precision: str) -> float:
    """TFLOP/s of a large square matmul in this precision on this device (the reachable ceiling)."""
    import torch

    from models.loading import DTYPES

    dtype = DTYPES[precision]
    n, reps = (8192, 10) if device == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def datasheet_tflops(gpu: str | None, precision: str) -> float | None:
    return next((v.get(precision) for k, v in DATASHEET_TFLOPS.items() if gpu and k in gpu), None)


def run(s: TrainSpeedSettings) -> dict[str, Any]:
    import torch

    from models import Store
    from models.hardware import resolve_precision
    from training.config import load_config
    from training.loop import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    precision = resolve_precision(s.precision, device).precision
    matmul = measured_matmul_tflops(device, precision)
    sheet = datasheet_tflops(gpu, precision)
    print(f"[train-speed] {device} {gpu or ''} {precision}: matmul {matmul:.1f} TFLOP/s; datasheet {sheet}", flush=True)
    runs: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    shape: dict[str, int] | None = None
    for method in s.methods:
        for batch in s.batch_sizes:
            for comp in s.compile:
                key = f"{method} b{batch} compile={comp}"
                cfg = load_config(
                    s.config,
                    [f"method={method}", f"batch_size={batch}", f"max_steps={s.steps}", f"log_every={s.log_every}",
                     f"compile={comp != 'false'}", f"compile_mode={'reduce-overhead' if comp == 'reduce-overhead' else 'default'}",
                     f"precision={s.precision}", "save_variant=false", "eval_every=0",
                     "checkpoint_every=0", "eval_test=false", f"name=train-speed-{method}-b{batch}", *s.overrides],
                )  # fmt: skip
                shape = shape or model_shape(cfg)
                if device == "cuda":
                    torch.cuda.empty_cache()
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        info = train(cfg, store=Store(Path(tmp) / "store"), runs_dir=Path(tmp) / "runs")["train_info"]
                        # a second, profiled run: the profiler's own cost never touches the figures above
                        profile = _profiled(cfg, Path(tmp) / "profiled", device) if s.profile else None
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: recorded, others run
                    failed[key] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"[train-speed] {key}: FAILED {failed[key]}", flush=True)
                    continue
                finally:
                    gc.collect()
                if comp != "false" and not info["compile"]["enabled"]:  # the loop fell back to eager
                    failed[key] = f"compiling failed, measured nothing compiled: {info['compile']['reason']}"
                    print(f"[train-speed] {key}: FAILED {failed[key]}", flush=True)
                    continue
                steady = info.get("steady")
                if not steady:
                    failed[key] = f"fewer than two log boundaries in {s.steps} steps (log_every {s.log_every})"
                    continue
                mean_len = steady["tokens_per_s"] / steady["samples_per_s"]
                fpt = flops_per_token(method, shape, info["trainable_params"], mean_len)
                achieved = fpt * steady["tokens_per_s"] / 1e12
                r = {
                    "method": method,
                    "batch_size": batch,
                    "compile": comp,
                    "precision": info["precision"],
                    "steady": steady,
                    "first_interval_s": info["first_interval_s"],
                    "mean_tokens_per_row": mean_len,
                    "model_tflops_per_s": achieved,
                    "mfu_datasheet": achieved / sheet if sheet else None,
                    "mfu_measured_matmul": achieved / matmul,
                    "epoch_120k_s": EPOCH_ROWS / steady["samples_per_s"],
                    "peak_memory_bytes": info["peak_memory_bytes"],
                    "peak_memory_kind": info["peak_memory_kind"],
                    "trainable_params": info["trainable_params"],
                    **({"profile": profile} if profile else {}),
                }
                runs.append(r)
                print(
                    f"[train-speed] {key}: {steady['samples_per_s']:.1f} samples/s, {steady['ms_per_step']:.1f} ms/step, "
                    f"{achieved:.1f} TFLOP/s (MFU {_pct(r['mfu_datasheet'])} of datasheet, "
                    f"{r['mfu_measured_matmul']:.0%} of measured matmul), peak {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
                    f"first interval {r['first_interval_s']:.1f} s",
                    flush=True,
                )
    return {
        "device": device,
        "gpu": gpu,
        "precision": precision,
        "matmul_tflops": matmul,
        "datasheet_tflops": sheet,
        "model": shape,
        "runs": runs,
        **({"failed": failed} if failed else {}),
    }


def _profiled(cfg: Any, tmp: Path, device: str) -> dict[str, str]:
    """Top operators of a whole short run (warm-up included) by self time on the host and the device."""
    from torch.profiler import ProfilerActivity, profile

    from models import Store
    from training.loop import train

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        train(cfg, store=Store(tmp / "store"), runs_dir=tmp / "runs")
    table = prof.key_averages()
    out = {"by_host_time": table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)}
    if device == "cuda":
        out["by_device_time"] = table.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    from benchmarks.report import no_figure_line, source_line, table

    parts = ["## Training speed of the loop itself (`train-speed`)"]
    for f, doc in docs:
        p = doc["payload"]
        where = p["gpu"] or "CPU"
        parts.append(
            f"\n{where}, {p['precision']}; config `{doc['settings']['config']}` "
            f"({p['model']['layers']} layers × {p['model']['hidden']}, "
            f"{p['model']['non_embedding_params'] / 1e6:.0f} M non-embedding parameters); steady state after the "
            f"first {doc['settings']['log_every']} steps; matmul measured here {p['matmul_tflops']:.0f} TFLOP/s"
            + (f", datasheet {p['datasheet_tflops']:.0f}" if p.get("datasheet_tflops") else "")
            + ".\n"
        )
        rows = [
            [
                r["method"],
                r["batch_size"],
                {True: "on", False: "off"}.get(r["compile"], r["compile"]),  # older files: booleans
                r["steady"]["samples_per_s"],
                r["steady"]["ms_per_step"],
                r["steady"]["tokens_per_s"],
                r["model_tflops_per_s"],
                _pct(r["mfu_datasheet"]),
                f"{r['mfu_measured_matmul']:.0%}",
                r["peak_memory_bytes"] / 2**30,
                r["epoch_120k_s"],
                r["first_interval_s"],
            ]
            for r in p["runs"]
        ]
        header = [
            "method",
            "batch",
            "compile",
            "samples/s",
            "ms/step",
            "tokens/s (unpadded)",
            "model TFLOP/s",
            "MFU (datasheet)",
        ]
        header += ["of measured matmul", "peak GiB", "120k-row epoch s", "first interval s"]
        parts.append(table(header, rows))
        if p.get("failed"):
            parts.append(no_figure_line(p["failed"]))
        parts.append("\n" + source_line(f, doc, out_dir))
    return "\n".join(parts)


experiment(
    "train-speed",
    TrainSpeedSettings,
    help="training loop steady samples/s, MFU and peak memory per method x batch size x compile",
    render=render,
)(run)
