"""The training loop: one function, read top to bottom, for every method (full, lora).

Method differences live in training.methods (which parameters train, default lr, store kind).

Speed rules the loop keeps (issue 9):
- a step never reads a device value back: token/sample counts come from host-side lengths, the
  loss is summed on the device and read every `log_every` steps (tests/test_training_loop_speed.py);
- precision comes from the hardware (`models.hardware.resolve_precision`), compilation from
  `resolve_compile`; both are recorded in the results with why;
- one process or many: `accelerate launch --multi_gpu --num_processes N -m training train CONFIG`
  (torchrun underneath; NCCL on GPUs, gloo on a CPU-only machine). Every process builds the same
  epoch of length-grouped global batches and takes its strided share, so a resumed run replays
  exactly and N processes x b rows train like 1 process x N*b rows. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import Store
from models.atomic import atomic_dir, set_aside
from models.hardware import resolve_precision, width_multiple
from models.loading import (
    encoder_of,
    fingerprint,
    load_tokenizer,
    mask_in_autocast_dtype,
    model_mask,
    not_loadable,
    padded_width,
    save_base_snapshot,
)
from models.provenance import git_info, hardware, package_versions, peak_rss_bytes
from models.store import dir_bytes
from models.writing import write_variant
from training.config import ConfigError, TrainConfig, arch_config
from training.data import Encoded, collate, encode, epoch_batches, eval_batches, golden_texts, load_splits, shard
from training.dropout import use_cpu_dropout
from training.methods import METHODS, trainable_counts
from training.metrics import classification_metrics

CKPT_STATE = "state.pt"
CKPT_TRAINABLE = "trainable.safetensors"
CKPT_BEST = "best.safetensors"
# What a resumed run may set differently from the run its checkpoint came from: how often it reports and
# checkpoints, how it compiles, what it does at the end. Every other key decides the data order, the model
# or the optimisation, so a new value would silently train something other than the run being resumed.
RESUME_MAY_CHANGE = frozenset(
    {"checkpoint_every", "log_every", "compile", "compile_mode", "eval_batch_size", "eval_test", "save_variant"}
)
# On CPU: eager attention (training SDPA falls back to the same math there, with its dropout
# inside), so that every dropout, attention probabilities' too, is a module CPUDropout replaces.
CPU_ATTENTION = "eager"


def for_cpu_training(model: nn.Module) -> int:
    """The model as `training` trains it on a CPU: every dropout a CPUDropout (training.dropout), and the
    attention mask built in autocast's dtype, so eager attention's probabilities stay bf16
    (models.loading.mask_in_autocast_dtype; CUDA's SDPA casts its mask itself). Returns the dropouts replaced."""
    mask_in_autocast_dtype(model)
    return use_cpu_dropout(model)


def build_model(cfg: TrainConfig, tokenizer: Any, attention: str | None = None) -> nn.Module:
    """The sequence classifier to fine-tune: pretrained weights, or a published architecture at random.

    `attention`: transformers' attn_implementation (None: its default, SDPA where the model has it).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    labels = {
        "num_labels": len(cfg.labels),
        "id2label": dict(enumerate(cfg.labels)),
        "label2id": {n: i for i, n in enumerate(cfg.labels)},
    }
    if cfg.init == "random":
        arch = arch_config(cfg, tokenizer)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch, **labels)
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is the point of fine-tuning
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            cfg.base_model, torch_dtype=torch.float32, attn_implementation=attention, **labels
        )
    except OSError as e:
        raise not_loadable(cfg.base_model, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def position_limit(model: nn.Module) -> int | None:
    """The most tokens a text may have for `model`'s position embeddings (None: no absolute positions).
    RoBERTa-style embeddings number positions from padding_idx + 1, so they cover fewer than they hold."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return None
    padding_idx = getattr(getattr(encoder_of(model), "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1 if padding_idx is not None else 0)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (as in BERT/RoBERTa fine-tuning)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.inference_mode()
def predict(
    model: nn.Module,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    autocast: Any,
    rank: int = 0,
    world: int = 1,
    **shape: Any,
) -> np.ndarray:
    """fp32 logits for every row of `data`, in row order (batches are length-sorted).

    `shape`: collate's padding (length_multiple, max_length), as the training batches are padded.

    With several processes each computes every `world`-th batch and the logits are gathered, so
    every process ends with the same full array (and makes the same "best" decision).
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for idx in list(eval_batches(data, batch_size))[rank::world]:
        batch = collate(data, idx, pad_id, **shape)
        with autocast():
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        parts.append((idx, out.logits.float().cpu().numpy()))
    model.train(was_training)
    if world > 1:
        parts = gather_object(parts)
    logits = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    for idx, part in parts:
        logits[idx] = part
    return logits


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_dir: Path, model: nn.Module, best: dict[str, torch.Tensor] | None, state: dict[str, Any]
) -> None:
    """Trainable weights (safetensors) + optimizer/scheduler/RNG/data position, replaced atomically."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt_dir) as tmp:  # the store's atomic directory writer (models.atomic)
        save_file(trainable_state(model), str(tmp / CKPT_TRAINABLE))
        if best is not None:
            save_file(best, str(tmp / CKPT_BEST))
        # Optimizer/RNG states are nested Python objects; this is our own run directory, not the store.
        torch.save(state, tmp / CKPT_STATE)
    for d in set_aside(ckpt_dir):  # a checkpoint a kill left aside is older than the one just written
        shutil.rmtree(d, ignore_errors=True)


def remove_checkpoints(ckpt_dir: Path) -> None:
    """The run's checkpoint and any earlier one a kill left aside (they only serve --resume)."""
    for d in [ckpt_dir, *set_aside(ckpt_dir)]:
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    from safetensors.torch import load_file

    if not (ckpt_dir / CKPT_STATE).exists():
        # A kill between save_checkpoint's two renames leaves only the previous checkpoint, moved aside by
        # models.atomic.replace_dir: resuming from it replays the same steps (the data order is a pure
        # function of the step).
        aside = [d for d in set_aside(ckpt_dir) if (d / CKPT_STATE).exists()]
        if not aside:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt_dir}; run without --resume (set checkpoint_every to make one)"
            )
        ckpt_dir = aside[0]
    best = load_file(str(ckpt_dir / CKPT_BEST)) if (ckpt_dir / CKPT_BEST).exists() else None
    state = torch.load(ckpt_dir / CKPT_STATE, weights_only=False)  # our own file (see save_checkpoint)
    return load_file(str(ckpt_dir / CKPT_TRAINABLE)), best, state


def data_digest(*parts: Encoded) -> str:
    """What the run trained and validated on, as tokenised: a changed file or tokenizer under the same path
    changes it (the config, which only names them, does not)."""
    h = hashlib.sha256()
    for d in parts:
        h.update(np.asarray(d.labels, dtype=np.int64).tobytes())
        for ids in d.input_ids:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def resume_conflicts(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """The config keys (outside RESUME_MAY_CHANGE) whose value differs from the checkpoint's run."""
    if saved is None:  # a checkpoint from before configs were recorded in it
        return []
    keys = sorted((saved.keys() | now.keys()) - RESUME_MAY_CHANGE)
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def resolve_compile(requested: str | bool, device_type: str) -> tuple[bool, str]:
    """Whether to torch.compile the training step, and why.

    On CUDA eager mode is launch-bound (thousands of small kernels per step, issue 9's 233 ms/step at
    batch 64 vs 204 at 16) and compiling fuses them: on by default.
    On CPU it does not pay, measured (2-core Xeon with AMX, torch 2.13 inductor, MiniLM full, batch 16
    of length-grouped AG News, CPUDropout; one process, 6 alternating rounds of 10 steps, compiled
    forward+loss with one dynamic-shape graph for every padded width): bf16 autocast, eager padded to
    multiples of 16 (models.hardware.width_multiple) 288 vs compiled 304 ms a step (0.95x); fp32, eager
    at exact widths 424 vs compiled 468 (0.91x); and compiling takes ~1-2 min. (Before CPUDropout and
    the bf16 width multiple, compiling won 1.26x: it had fused away torch's slow CPU dropout masks.)
    """
    if isinstance(requested, bool):
        return requested, f"compile={str(requested).lower()} requested explicitly"
    if device_type == "cuda":
        return True, "auto: on CUDA a compiled step fuses kernels and launches far fewer of them"
    return False, (
        "auto: on CPU a compiled step measured no faster than eager (0.95x bf16, 0.91x fp32; see resolve_compile)"
    )


def compiler_failed(e: BaseException) -> bool:
    """Whether `e` is torch.compile's backend failing to compile (not an error of the step itself)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled (importing dynamo takes ~1 s)
        return False
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(e, BackendCompilerFailed)


def compiler_error(e: BaseException) -> str:
    """What made the compiler fail, in one line: the backend's own error, not dynamo's wrapper."""
    inner = getattr(e, "inner_exception", None) or e
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__


def bucket_tokens(max_length: int) -> int:
    """Pad widths to multiples of this when compiling: at most ~8 shapes (one CUDA graph each with reduce-overhead)."""
    return 16 * max(1, math.ceil(max_length / 8 / 16))


def steady_throughput(marks: list[tuple[int, float, int, int]]) -> dict[str, Any]:
    """Throughput from the first log boundary to the last: the first interval (warm-up, compilation)
    left out. Empty when the run had fewer than two boundaries."""
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        return {}
    (s0, t0, n0, k0), (s1, t1, n1, k1) = marks[0], marks[-1]
    return {
        "steady": {
            "from_step": s0,
            "to_step": s1,
            "seconds": t1 - t0,
            "ms_per_step": 1000 * (t1 - t0) / (s1 - s0),
            "samples_per_s": (n1 - n0) / (t1 - t0),
            "tokens_per_s": (k1 - k0) / (t1 - t0),
        },
        "first_interval_s": t0,
    }


def launcher_watch() -> Any:
    """Under torchrun / `accelerate launch` (TORCHELASTIC_RUN_ID set): a check that raises once this worker's
    launcher is gone. torch elastic starts each worker in a session of its own, so a SIGKILL of the launcher
    leaves the workers training the killed run on, racing a --resume for its checkpoint and the store."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return lambda: None
    launcher = os.getppid()

    def check() -> None:
        if os.getppid() != launcher:
            raise RuntimeError(f"the launcher (pid {launcher}) is gone: this run was killed; continue it with --resume")

    return check


class _NoWriter:
    """TensorBoard writer of the processes that are not the main one: they write nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def train(
    cfg: TrainConfig,
    *,
    store: Store,
    runs_dir: Path,
    resume: bool = False,
    overwrite: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train `cfg`, write the variant into `store` and the results JSON into `runs_dir`.

    Returns the results dict. A failed run still writes its JSON (status failed, error) and
    then re-raises. `stop_after_steps` stops early without writing a variant (to test resume).
    Under `accelerate launch` every process calls this; only the main one writes files.
    """
    from accelerate import PartialState

    is_main = PartialState(cpu=_cpu_only()).is_main_process
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "run_info": {
            "name": cfg.name,
            "config": cfg.to_dict(),
            "git": git_info(),
            "status": "running",
            "error": None,
            "resumed": resume,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "train_info": {},
        "meta_info": {"versions": package_versions(), "hardware": hardware()},
    }
    results_path = runs_dir / f"{cfg.name}.json"
    try:
        with torch.enable_grad():  # never inherit a caller's no-grad / inference mode
            results["train_info"] = _train(cfg, store, runs_dir, resume, overwrite, stop_after_steps)
        results["run_info"]["status"] = "ok" if stop_after_steps is None else "stopped"
        return results
    except BaseException as e:
        results["run_info"]["status"] = "failed"
        results["run_info"]["error"] = f"{type(e).__name__}: {e}"
        results["run_info"]["traceback"] = traceback.format_exc(limit=8)
        raise
    finally:
        results["run_info"]["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if is_main:
            results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def _cpu_only() -> bool:
    """Train on CPU processes. Passed to accelerate explicitly: only when told `cpu` does it join
    the processes of `accelerate launch --multi_gpu` / torchrun on a GPU-less machine into one gloo
    group; otherwise each of them would train alone, unsynchronised."""
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _train(
    cfg: TrainConfig, store: Store, runs_dir: Path, resume: bool, overwrite: bool, stop_after_steps: int | None
) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    method = METHODS[cfg.method]
    # The schedule is stepped once per optimizer step, whatever the process count (accelerate's
    # default steps it num_processes times, assuming a dataloader it sharded itself).
    # mixed_precision / dynamo_backend pinned: otherwise `accelerate launch` (its config file or flags,
    # through ACCELERATE_MIXED_PRECISION / ACCELERATE_DYNAMO_BACKEND) adds its own autocast, GradScaler or
    # torch.compile on top of the precision and compile decisions below, which the results then misreport.
    accelerator = Accelerator(
        cpu=_cpu_only(), mixed_precision="no", dynamo_backend="no", step_scheduler_with_optimizer=False
    )
    device = accelerator.device
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # ---- precision and compilation, chosen from the hardware (recorded in the results) ----
    # Autocast is ours, not accelerate's `mixed_precision`: that one is fixed once per process
    # (AcceleratorState), and one process may train several configs (tests, benchmarks).
    # bf16 on CPU as autocast (fp32 weights, cast per op) rather than bf16 weights + an fp32 master
    # copy: measured on this repo's avx512_bf16 CPU, 6-layer width-384, batch 16 x 64, best of 3:
    # fp32 677, autocast 441, bf16 weights + master copy 489 ms/step (its grad casts and weight
    # copy-back cost more than autocast's per-forward weight casts, which autocast caches per forward).
    precision = resolve_precision(cfg.precision, device.type)
    amp_dtype = AMP_DTYPES[precision.precision]

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    # fp16 only (GPUs without bf16): the loss scaler reads its found-inf flag once per step, the one
    # per-step sync left, inherent to fp16; bf16 and fp32 need no scaler (disabled = pass-through).
    scaler = torch.amp.GradScaler(device.type, enabled=precision.precision == "fp16")

    # ---- data: load, validate, split, tokenise once ----
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    splits = load_splits(cfg)
    train_data = encode(splits.train, tokenizer, cfg.max_length)
    val_data = encode(splits.val, tokenizer, cfg.max_length)
    golden_source = splits.test if splits.test is not None else splits.val
    golden = golden_texts(golden_source, cfg.golden_per_class, len(cfg.labels))
    pad_id = tokenizer.pad_token_id
    lengths = train_data.lengths  # host-side: token counts never come from the device
    global_batch = cfg.batch_size * world  # rows per micro-step over all processes
    batches_per_epoch = math.ceil(len(train_data) / global_batch)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    compiled, compile_reason = resolve_compile(cfg.compile, device.type)
    # A compiled step sees fixed-height batches padded to a few widths; eager pads to the longest text,
    # rounded up to the multiple its kernels want (16 for bf16 on CPU: models.hardware.width_multiple).
    eval_shape = {"max_length": cfg.max_length, "length_multiple": width_multiple(device.type, precision.precision)}
    shape = eval_shape
    if compiled:
        shape = {**eval_shape, "rows": cfg.batch_size, "length_multiple": bucket_tokens(cfg.max_length)}

    # ---- model: build, fingerprint the base before any wrap, apply the method ----
    on_cpu = device.type == "cpu"
    model = build_model(cfg, tokenizer, attention=CPU_ATTENTION if on_cpu else None)
    base_name = cfg.base_model if cfg.init == "pretrained" else (cfg.arch_preset or cfg.base_model)
    # A longer text would fail in the embeddings' forward at the first batch holding one (or in the service).
    limit = position_limit(model)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(
            [
                f"max_length: {cfg.max_length} tokens is more than {base_name} has positions for; set max_length <= {limit}"
            ]
        )
    base_fp = fingerprint(model)
    if method.kind == "lora" and is_main and cfg.save_variant:  # adapters reference a base stored once
        save_base_snapshot(store, model, tokenizer, base_name, cfg.init)
    model = method.prepare(model, cfg).to(device)
    cpu_dropouts = for_cpu_training(model) if on_cpu else 0  # after prepare: LoRA's dropouts too
    model.train()
    counts = trainable_counts(model)
    if rank:  # same initial weights everywhere (seeded above); dropout masks of their own per process
        torch.manual_seed(cfg.seed + rank)

    # ---- optimisation: AdamW, warmup + linear decay; each step takes one global batch per micro-step ----
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    # fused AdamW: one kernel per step instead of a Python loop over tensors (~2.7x faster on this CPU)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=lr, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    unwrapped = model  # weights are read and written here; `model` may become a DDP wrapper
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # no host read in the forward: BERT / RoBERTa get the mask as (batch, query, key) (models.loading)
    step_mask = model_mask(unwrapped)

    def forward_loss(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Summed, not averaged: the step divides by its global row count (known on the host), so
        # N processes x b rows train exactly as 1 process x N*b rows, and filler rows (-100) add 0.
        with autocast():
            logits = model(input_ids=input_ids, attention_mask=step_mask(attention_mask)).logits
        return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=-100)

    eager_forward_loss = forward_loss
    if compiled:
        from torch import _dynamo
        from torch.fx.experimental import _config as fx_config

        # Widths are padded to a few buckets (bucket_tokens) and rows are fixed: dynamic=True compiles
        # once for all of them (and for every batch size: the compile caches then serve the next run);
        # never fall back to eager over recompiles. reduce-overhead records one CUDA graph per width on top.
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 16)
        # no duck sizing: a first batch as tall as it is wide (64 rows x 64 tokens) would give rows and width one
        # symbol, and the first batch of another width would compile the whole step again
        fx_config.use_duck_shape = False
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        forward_loss = torch.compile(forward_loss, dynamic=True, mode=mode)
    # a CUDA-graphed step's outputs live in the graph's memory until the next step begins
    graphed = compiled and cfg.compile_mode == "reduce-overhead" and device.type == "cuda"
    # ... gradients included: AccumulateGrad adopts a graphed backward's outputs as .grad, and the next
    # micro-batch's replay overwrites them ("accessing gradient tensor output of CUDAGraphs that has been
    # overwritten"). With accumulation, gradients go into .grad buffers made here, outside the graphs' pool.
    keep_grads = graphed and cfg.grad_accum > 1
    if keep_grads:
        for p in unwrapped.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)

    def micro_batches(step_batches: list[np.ndarray], step_rows: int) -> torch.Tensor:
        """Forward + backward of one optimizer step's micro-batches; their summed loss, on the device."""
        step_loss = torch.zeros((), device=device)
        for k, rows in enumerate(step_batches):
            idx, real = shard(rows, rank, world)
            batch = collate(train_data, idx, pad_id, real=real, **shape)
            batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
            # gradients are all-reduced once per step, on its last micro-batch
            with accelerator.no_sync(model) if k < len(step_batches) - 1 else contextlib.nullcontext():
                if graphed:
                    torch.compiler.cudagraph_mark_step_begin()
                loss_sum = forward_loss(**batch)
                # DDP averages gradients over processes: x world makes it the mean over the step's rows
                accelerator.backward(scaler.scale(loss_sum * (world / step_rows)))
            step_loss += loss_sum.detach()
        return step_loss

    def warm_graphs() -> None:
        """Record every padded width's CUDA graphs before the steps timed as steady: cudagraph trees run a new
        shape eagerly once, record it the second time and replay it from the third, and length-grouped batches
        meet some widths first late in a run. Dummy rows, gradients dropped, the CUDA RNG put back."""
        rng = torch.cuda.get_rng_state(device)
        rows = shape["rows"]
        widths = {padded_width(int(n), shape["length_multiple"], shape["max_length"]) for n in np.unique(lengths)}
        for width in sorted(widths, key=lambda w: (w == rows, w)):  # never rows x rows first (duck sizing)
            ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
            for _ in range(2):
                torch.compiler.cudagraph_mark_step_begin()
                with accelerator.no_sync(model):
                    accelerator.backward(
                        forward_loss(ids, torch.ones_like(ids), torch.zeros(rows, dtype=torch.long, device=device))
                    )
        optimizer.zero_grad(set_to_none=not keep_grads)
        torch.cuda.set_rng_state(rng, device)

    # ---- state that a checkpoint carries ----
    step = 0  # optimizer steps done
    micro = 0  # global batches consumed: the data position (epoch = micro // batches_per_epoch)
    samples_seen = tokens_seen = 0  # over all processes
    train_time_s = 0.0
    best: dict[str, torch.Tensor] | None = None
    best_f1, best_step = -1.0, 0
    curve: list[dict[str, Any]] = []  # validation
    loss_curve: list[dict[str, Any]] = []  # training loss, mean per row over each log interval
    interval_loss = torch.zeros((), device=device)  # summed on the device, read every log_every steps
    interval_rows = 0
    # (step, train seconds, samples, tokens) at each log boundary of this process's run: throughput
    # after the first interval excludes warm-up (allocator, cuBLAS/oneDNN selection, compilation)
    marks: list[tuple[int, float, int, int]] = []
    ckpt_dir = runs_dir / f"{cfg.name}.ckpt"
    # what a resume must find unchanged besides the config: the rows as tokenised, the precision `auto` chose
    inputs = {"data": data_digest(train_data, val_data), "precision": precision.precision}
    if resume:
        weights, best, st = load_checkpoint(ckpt_dir)
        if st["num_processes"] != world:
            raise ValueError(
                f"checkpoint in {ckpt_dir} was written by {st['num_processes']} process(es), this run has {world}; "
                f"resume with accelerate launch --num_processes {st['num_processes']} (the data order depends on it)"
            )
        conflicts = resume_conflicts(st.get("config"), cfg.to_dict())
        conflicts += [f"{k}: checkpoint {st[k]!r}, this run {v!r}" for k, v in inputs.items() if st.get(k, v) != v]
        if conflicts:
            raise ValueError(
                f"checkpoint in {ckpt_dir} is of a run with other settings ({'; '.join(conflicts)}); resume with "
                "the checkpoint's settings, or start over without --resume"
            )
        load_trainable(unwrapped, weights)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        step, micro, samples_seen, tokens_seen = st["step"], st["micro"], st["samples_seen"], st["tokens_seen"]
        train_time_s, best_f1, best_step, curve = st["train_time_s"], st["best_f1"], st["best_step"], st["curve"]
        loss_curve, interval_rows = st["loss_curve"], st["interval_rows"]
        interval_loss.fill_(st["interval_loss"] if is_main else 0.0)  # a global sum, held once
        set_rng_state(st["rng"][rank])
    elif is_main:  # a fresh run: an earlier run's checkpoint under this name must not be resumed into it
        remove_checkpoints(ckpt_dir)

    def evaluate_val() -> None:
        nonlocal best, best_f1, best_step
        logits = predict(unwrapped, val_data, cfg.eval_batch_size, pad_id, autocast, rank, world, **eval_shape)
        m = classification_metrics(val_data.labels, logits.argmax(-1), cfg.labels)
        curve.append({"step": step, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        writer.add_scalar("val/macro_f1", m["macro_f1"], step)
        writer.add_scalar("val/accuracy", m["accuracy"], step)
        if m["macro_f1"] > best_f1:
            best, best_f1, best_step = trainable_state(unwrapped), m["macro_f1"], step
        # tqdm is off when stderr is not a terminal (logs); one line per evaluation keeps logs readable.
        if is_main:
            bar.write(
                f"step {step}/{total_steps}: val accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} "
                f"(best {best_f1:.4f} at step {best_step}), train {train_time_s:.0f}s"
            )

    writer = SummaryWriter(log_dir=str(runs_dir / "tensorboard" / cfg.name)) if is_main else _NoWriter()
    bar = tqdm(total=total_steps, initial=step, desc=cfg.name, disable=None if is_main else True)
    epoch_cache: dict[int, list[np.ndarray]] = {}
    t_resume = time.perf_counter()
    orphaned = launcher_watch()
    warm_pending = graphed
    while step < total_steps:
        orphaned()  # one getppid() a step: a killed launcher's workers stop before they write anything more
        # ---- one optimizer step: no device value is read back to the host in here ----
        step_batches = []
        for _ in range(cfg.grad_accum):
            epoch, i = divmod(micro, batches_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(lengths, global_batch, cfg.seed, epoch, cfg.length_grouping)}
            step_batches.append(epoch_cache[epoch][i])
            micro += 1
        step_rows = sum(len(b) for b in step_batches)  # global rows in this step
        try:
            if warm_pending:  # inside the first interval, which steady_throughput leaves out
                warm_pending = False
                try:
                    warm_graphs()
                except Exception as e:  # a measuring aid, never the run's end (a compiler failure still is)
                    if compiler_failed(e):
                        raise
                    optimizer.zero_grad(set_to_none=not keep_grads)
                    print(f"warning: warming CUDA graphs failed ({e!r}); widths record on first use", file=sys.stderr)
            step_loss = micro_batches(step_batches, step_rows)
        except Exception as e:
            if not (compiled and compiler_failed(e)):
                raise
            # A compiler the machine cannot run (no working C++ compiler or Triton, an unsupported
            # GPU): the run goes on eagerly, the step is redone from its first micro-batch, the
            # results say why. Every process meets the same failure at the same micro-batch.
            compile_reason = f"compile failed at step {step + 1} ({compiler_error(e)}); trained eagerly"
            print(f"warning: {compile_reason}", file=sys.stderr, flush=True)
            compiled = graphed = False
            forward_loss, shape = eager_forward_loss, eval_shape
            optimizer.zero_grad(set_to_none=True)
            step_loss = micro_batches(step_batches, step_rows)
        interval_loss += step_loss
        samples_seen += step_rows
        tokens_seen += sum(int(lengths[rows].sum()) for rows in step_batches)
        interval_rows += step_rows
        scaler.unscale_(optimizer)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        step += 1
        bar.update(1)

        # ---- boundaries: logging, evaluation, checkpoint; the only places that wait for the device ----
        log_now = step % cfg.log_every == 0 or step == total_steps
        eval_now = cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps
        ckpt_now = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps
        stop_now = stop_after_steps is not None and step >= stop_after_steps
        if not (log_now or eval_now or ckpt_now or stop_now):
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()  # so the clock includes the queued work
        train_time_s += time.perf_counter() - t_resume
        if log_now:
            marks.append((step, train_time_s, samples_seen, tokens_seen))
            loss_value = accelerator.reduce(interval_loss, "sum").item() / interval_rows
            loss_curve.append({"step": step, "loss": loss_value})
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            interval_loss.zero_()
            interval_rows = 0
        if eval_now:
            evaluate_val()
        if ckpt_now:
            rngs = gather_object([rng_state()])  # every process's own RNG, so resume replays its dropout
            pending_loss = accelerator.reduce(interval_loss, "sum").item()
            if is_main:
                save_checkpoint(
                    ckpt_dir,
                    unwrapped,
                    best,
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rngs,
                        "num_processes": world,
                        "config": cfg.to_dict(),  # a resume must continue this run (resume_conflicts)
                        **inputs,  # ... on the same rows, in the same precision
                        "step": step,
                        "micro": micro,
                        "samples_seen": samples_seen,
                        "tokens_seen": tokens_seen,
                        "train_time_s": train_time_s,
                        "best_f1": best_f1,
                        "best_step": best_step,
                        "curve": curve,
                        "loss_curve": loss_curve,
                        "interval_loss": pending_loss,
                        "interval_rows": interval_rows,
                    },
                )
        if stop_now:
            bar.close()
            writer.close()
            return {"stopped_at_step": step}
        t_resume = time.perf_counter()
    bar.close()
    evaluate_val()  # the final weights compete for "best" too

    # ---- best checkpoint -> test split, once ----
    load_trainable(unwrapped, best)
    info: dict[str, Any] = {
        "method": cfg.method,
        "steps": step,
        "epochs_done": micro / batches_per_epoch,
        "lr": lr,
        "precision": precision.as_dict(),
        "compile": {"enabled": compiled, "reason": compile_reason, **({"mode": cfg.compile_mode} if compiled else {})},
        "length_multiple": shape["length_multiple"],  # batch widths padded to a multiple of this
        "cpu_dropout_modules": cpu_dropouts,
        "num_processes": world,
        "global_batch_size": global_batch * cfg.grad_accum,  # rows per optimizer step
        "train_rows": len(train_data),
        "val_rows": len(val_data),
        "best_step": best_step,
        "best_val_macro_f1": best_f1,
        "validation_curve": curve,
        "train_loss_curve": loss_curve,
        "train_time_s": train_time_s,
        "samples_per_s": samples_seen / train_time_s,
        "tokens_per_s": tokens_seen / train_time_s,
        "samples_seen": samples_seen,
        "tokens_seen": tokens_seen,
        **steady_throughput(marks),
        **counts,
    }
    if cfg.eval_test and splits.test is not None:
        test_data = encode(splits.test, tokenizer, cfg.max_length)
        t0 = time.perf_counter()
        logits = predict(unwrapped, test_data, cfg.eval_batch_size, pad_id, autocast, rank, world, **eval_shape)
        info["test_eval_time_s"] = time.perf_counter() - t0
        test = classification_metrics(test_data.labels, logits.argmax(-1), cfg.labels)
        info["test"] = test
        info.update({f"test_{k}": v for k, v in test.items() if isinstance(v, float)})
    info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    info["peak_memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"
    writer.close()
    if not is_main:
        return info
    if not cfg.save_variant:  # a measure-only run: the results JSON (written by train()) is its output
        remove_checkpoints(ckpt_dir)
        return info

    # ---- write the variant (fp32 weights; temp dir + rename inside the store) ----
    orphaned()
    metrics = {k: v for k, v in info.items() if k.startswith("test_") and isinstance(v, float)}
    metrics.update({"best_val_macro_f1": best_f1, "train_time_s": train_time_s})
    model = unwrapped.to("cpu")
    manifest = write_variant(
        store,
        name=cfg.name,
        kind=method.kind,
        model=model,
        tokenizer=tokenizer,
        labels=cfg.labels,
        max_length=cfg.max_length,
        base_model=base_name,
        base_fingerprint=base_fp,
        init=cfg.init,
        golden_texts=golden,
        metrics=metrics,
        overwrite=overwrite,
        provenance={"config": cfg.to_dict(), "git": git_info(), "versions": package_versions()},
    )
    info["artifact_bytes"] = dir_bytes(store.path(manifest.name))
    info["variant"] = manifest.name
    remove_checkpoints(ckpt_dir)  # the run finished; checkpoints only serve --resume
    return info
