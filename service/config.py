"""Server configuration: one pydantic model; values come from defaults < SERVICE_<NAME> env vars < CLI flags.

pydantic-settings is not a dependency, so the env/CLI layering is a few lines here; the field
descriptions double as `--help` text.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.hardware import usable_cores

ENV_PREFIX = "SERVICE_"


def auto_frontends(device: str, cores: int | None = None) -> int:
    """HTTP front-end processes for `--frontends auto`, from measurements (wrk, one machine each):

    CPU, 2 cores (this project's machine), 2-layer model at c=32: 1 front-end 1,472 req/s,
      2 front-ends 1,367 — the model computes on the same cores, so one front-end (the engine needs the other).
    CUDA, H200 host with 16 cores, RoBERTa-large bf16 at c=64: 1 front-end 1,128 req/s (its one core
      saturated), 4 front-ends 2,007 req/s (3,022 at c=128) — the GPU leaves the CPU cores to the front-ends.
    So: 1 on CPU; on CUDA one per 4 cores, at most 4 (more not measured).
    Caveat: both measurements sent one-letter texts (the load-workload bug fixed on 2026-11-29); on real
    texts a front-end spends ~130 us per request tokenising (30 % of its CPU at 1,685 req/s, 2-layer
    model, py-spy) — the CUDA figure is to be re-measured.
    """
    if device == "cpu":
        return 1
    return max(1, min(4, (cores or usable_cores()) // 4))


def auto_threads(device: str, frontends: int, cores: int | None = None) -> int:
    """Engine threads for `--threads auto`: on CPU, cores minus front-ends (at least 1); on CUDA, all cores.

    Measured on this project's 2-core machine (avx512_bf16), 1 front-end, wrk c=32, three 5 s runs each:
    2-layer model, 2 engine threads 973 / 1,100 / 1,033 req/s, 1 thread 1,971 / 1,972 / 1,936; MiniLM bf16,
    2 threads 494 / 468 / 443 and 498 / 504 / 491, 1 thread 480 / 465 / 474 and 480 / 599 / 639 (c=1 p50
    11.0 vs 12.7 ms: a lone request loses the second core). torch's OpenMP workers spin-wait between
    operators (libgomp's default) on the core the front-end needs; OMP_WAIT_POLICY=PASSIVE instead made the
    2-layer model as fast (2,058 / 2,040 / 1,906) but MiniLM slower (434 / 430 / 478, c=1 12.9 ms).
    Those runs sent one-letter texts (bug fixed 2026-11-29). On AG News texts, MiniLM c=32: bf16 1 thread
    150.8 req/s vs 2 threads 151.6; fp32 77.3 vs 118.5 — so a batch whose measured cost exceeds 20 ms runs
    on every core (--lone-threads; service/batcher.py), and light batches keep this count.
    """
    cores = cores or usable_cores()
    return cores if device == "cuda" else max(1, cores - frontends)


class ServiceConfig(BaseModel):
    """Everything a running server needs to know; see `python -m service --help`."""

    # inf/nan: model_dump_json writes them as null, which the engine and front-end workers cannot read back
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    store: Path = Field(description="model store directory (see models/store.py)")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    api_key: str | None = Field(None, description="admin endpoints require 'Authorization: Bearer KEY' when set")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="compute precision of torch variants; auto = bf16 where the hardware has it natively "
        "(CPU avx512_bf16/AMX, CUDA), else fp32 (fp16 on CUDA without bf16)",
    )
    # validate_default: its check against --precision runs when --device is left at cpu too
    device: Literal["cpu", "cuda"] = Field("cpu", validate_default=True, description="device of torch variants")
    variants: str = Field("all", description="comma-separated variants to load at start, or 'all' (those that verify)")
    base: str | None = Field(
        None, description="fingerprint (prefix) of the shared LoRA base; default: the base most LoRA variants use"
    )
    max_batch_tokens: int = Field(8192, gt=0, description="token budget of one batch (rows x padded length)")
    max_batch_size: int = Field(64, gt=0, description="most rows in one batch")
    # 0: continuous batching, as TEI's router does: a free lane takes every row waiting, and rows gather
    # while lanes run; waiting for company idled the engine (the README's defaults table has the A/B).
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long the batcher waits to fill a batch while other requests are in flight"
    )
    max_queue: int = Field(1024, gt=0, description="most input rows waiting; beyond it requests get 429")
    max_adapters: int = Field(32, gt=0, description="most LoRA adapters resident at once (LRU eviction beyond)")
    max_inputs: int = Field(64, gt=0, description="most inputs in one request (413 beyond)")
    max_input_chars: int = Field(20_000, gt=0, description="most characters in one input (422 beyond)")
    max_body_bytes: int = Field(1_000_000, gt=0, description="largest request body (413 beyond)")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline (504 beyond)")
    threads: int | Literal["auto"] = Field(
        "auto",
        description="engine torch / onnxruntime threads; auto = on CPU the cores the front-ends leave free "
        "(at least 1), on CUDA all cores (measured, see auto_threads)",
    )
    lone_threads: int | Literal["auto"] = Field(
        "auto",
        description="engine threads for a batch that is one request with nothing else queued (the front-ends "
        "are idle then) or whose measured cost exceeds 20 ms; auto = every core on CPU when --threads is auto, "
        "else --threads",
    )
    lanes: int | Literal["auto"] = Field(
        "auto",
        description="CPU: batches of torch models run on this many threads at once, each on --lone-threads/lanes "
        "torch threads; auto = one lane per --lone-threads on CPU for compute-heavy models only (a row costs well "
        "over a front-end's share of the CPU; lighter models run one batch at a time), 1 on CUDA. Measured "
        "(2-core Xeon, MiniLM in-process): two 1-thread lanes gave 1.45x (fp32) to 2x (bf16) the rows/s of one "
        "2-thread lane",
    )
    # Lanes run one batch each on one thread, so a lane preempted by a waking front-end stalls only its own
    # batch (unlike one batch on every core, where one preempted OpenMP thread stalls it: see frontend_nice).
    # Measured, 2-core Xeon (avx512_bf16), MiniLM bf16, interleaved runs of 0 vs 10, order alternated:
    #   hot-swap (demo store, wrk c=4, 20 swaps, 5 pairs): replace p50 54.2/45.1/52.0/54.7/67.5 ->
    #   48.1/46.5/45.9/50.5/48.2 ms (mean 54.7 -> 47.8), reload 54.3/57.5/49.0/46.9/62.3 -> 44.7/45.1/
    #   50.9/49.0/43.6 ms (54.0 -> 46.7); 0 failed swaps and requests either way;
    #   ceiling c=32 (4 pairs, 6 s in 2 rounds), service / in-process: full 0.66/0.64/0.86/0.66 ->
    #   0.77/0.91/0.75/0.65 (no clear effect), adapters 0.60/0.57/0.61/0.51 -> 0.62/0.66/0.62/0.60;
    #   c=1 unchanged (a lone request runs on the batcher thread, which keeps niceness 0).
    lane_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness added to the lane threads (Linux: per thread; 0 = off): the front-ends, the engine's "
        "socket loop and a hot-swap's golden check run first when they wake, the lanes take the rest of the CPU",
    )
    # Measured on this project's CPU (avx512_bf16, 2 threads, batch 16x64): MiniLM fp32 1272 ms,
    # autocast 1871 ms, bf16 weights 208 ms; RoBERTa-base 3204 / 2115 / 1465 ms. Autocast pays a
    # cast per op, so casting the weights once is the default.
    bf16_mode: Literal["autocast", "weights"] = Field(
        "weights", description="bf16 on CPU: weights cast to bf16, or autocast over fp32 weights"
    )
    cpu_prepack: bool = Field(
        True,
        description="CPU: give each Linear of a served torch model its weight pre-reordered for oneDNN once, at "
        "load, instead of on every forward (service/runtime.py: prepack_linears; not under autocast)",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on CUDA, replay each (rows x length) bucket's forward from a CUDA graph "
        "(service/graphs.py; full, merged and the LoRA bank); off: eager launches",
    )
    golden_check_texts: int = Field(
        8,
        ge=1,
        description="golden-set texts re-run when a variant loads at startup (evenly spread over the set, which "
        "training orders by class); exports were already checked on the whole set",
    )
    swap_check_texts: int = Field(
        1,
        ge=1,
        description="golden-set texts re-run when a variant is loaded or replaced while serving (PUT "
        "/v1/adapters): the check's forward is most of a hot-swap. The checksums prove the bytes; the check "
        "proves this code reproduces what training recorded, and one text runs every adapted matrix. Measured "
        "(MiniLM, 2-core Xeon, wrk c=4 background load): replace p50 48 ms fp32 / 42 ms bf16 with 1 text, "
        "58 / 58 ms with 2, ~250 ms with 8",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level (uvicorn and logging)"
    )
    frontends: int | Literal["auto"] = Field(
        "auto",
        description="HTTP front-end processes sharing the port; each parses, validates and tokenises, and "
        "talks to the one engine process over a Unix socket; auto = 1 on CPU, on CUDA one per 4 cores up to 4 "
        "(measured, see auto_frontends)",
    )
    frontend_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="niceness of the front-end processes (the engine keeps 0). On a small CPU serving a heavy "
        "model, a front-end's bursts preempt one of the engine's threads and the whole batch waits for it; "
        "measured (2-core Xeon, wrk, two runs each): MiniLM bf16 c=32 113/120 -> 129/135 req/s with 10, but the "
        "2-layer model (front-end bound) 1,263/1,124 -> 1,012/1,085, so it is off by default",
    )
    engine_address: str | None = Field(
        None, description="Unix socket of a running engine (unix://PATH); default: start one and supervise it"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("--api-key / SERVICE_API_KEY is empty; unset it to leave admin endpoints open")
        return v

    # Checks of one field, or of a field against one declared before it (info.data), are field validators, so
    # that pydantic reports every bad value at once; a model validator runs only once all fields are valid.
    @field_validator("frontends", "threads", "lone_threads", "lanes")
    @classmethod
    def _at_least_one(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or auto")
        return v

    @field_validator("device")
    @classmethod
    def _precision_fits_device(cls, v: str, info: ValidationInfo) -> str:
        if v == "cpu" and info.data.get("precision") == "fp16":
            raise ValueError("fp16 is for --device cuda; on CPU use --precision bf16 (avx512_bf16) or fp32")
        return v

    @field_validator("lanes")
    @classmethod
    def _lanes_fit_device(cls, v: int | str, info: ValidationInfo) -> int | str:
        if isinstance(v, int) and v > 1 and info.data.get("device") == "cuda":
            raise ValueError("--lanes > 1 is for CPU; on CUDA one lane keeps the device busy (leave it auto)")
        return v

    @model_validator(mode="after")
    def _resolve_auto(self) -> ServiceConfig:
        if self.frontends == "auto":
            self.frontends = auto_frontends(self.device)
        every_core = self.threads == "auto" and self.device == "cpu"  # decided before --threads resolves
        if self.threads == "auto":
            self.threads = auto_threads(self.device, self.frontends)
        if self.lone_threads == "auto":
            self.lone_threads = usable_cores() if every_core else self.threads
        return self


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name in ServiceConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            out[name] = env[key]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service",
        description=f"Serve a model store over HTTP. Every flag can also be set as {ENV_PREFIX}<NAME>.",
    )
    for name, field in ServiceConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        # default=None so that "not given" is distinguishable from a value; pydantic fills defaults.
        shown = "" if field.is_required() or field.default is None else f" (default: {field.default})"
        p.add_argument(flag, dest=name, default=None, help=f"{field.description}{shown}")
    return p


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServiceConfig:
    """Defaults < environment < command line; raises SystemExit listing every invalid value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = _env_values(os.environ if env is None else env)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    if "store" not in values:
        parser.error(f"--store DIR (or {ENV_PREFIX}STORE) is required")
    try:
        return ServiceConfig.model_validate(values)
    except ValidationError as e:
        parser.error(f"invalid configuration: {_problems(e)}")
        raise  # unreachable: parser.error exits


def _problems(e: ValidationError) -> str:
    """Every invalid value, named as the user gave it (--flag / SERVICE_NAME), one clause per setting."""
    by_field: dict[str, list[str]] = {}
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if len(err["loc"]) > 1 and err["type"] == "literal_error":  # the 'auto' branch of an int | 'auto' union
            msg = f"or {msg[0].lower()}{msg[1:]}"
        by_field.setdefault(name, []).append(msg)
    return "; ".join(
        f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}: {' '.join(msgs)}" if name else " ".join(msgs)
        for name, msgs in by_field.items()
    )
