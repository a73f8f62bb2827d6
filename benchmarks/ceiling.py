"""Experiment `ceiling`: the service's HTTP throughput beside its own model's in-process throughput,
and beside the naive `pipeline()` server, in one run.

    python -m benchmarks ceiling --shape minilm --adapters 32 --concurrency 1,32 --duration 10 \\
        --out reports/results/ceiling-minilm.json

Per scenario (the variants the store has: `full`, `adapter-1`, `adapters-N` mixed per request,
`onnx-int8`):
  in-process  the service's own Runtime (same loader, precision, LoRA bank, ONNX session), fed
              batches of --max-batch-size texts drawn as the HTTP requests are, tokenising in the
              loop, for --duration seconds: the ceiling the service can approach.
  service     `python -m service` on the same store and precision, driven by wrk (benchmarks/wrk.py)
              at each --concurrency, one text per request; client and server CPU shares recorded.
  naive       `python -m benchmarks baseline-server` (FastAPI + transformers.pipeline, fp32, one
              request per forward, on --device) serving `full` (else `lora-0` merged), at the same
              concurrencies.
  matched     in-process again with batches of the rows per batch the engine formed at each level
              (from its /metrics): what the serving path itself costs, apart from batch formation.
Printed: service / in-process, service / matched, service / naive, client CPU share, the lanes' CPU
share (the share of the machine's CPU the threads running batches got, in the service from the engine's
service_batch_cpu_seconds, in-process from the lane threads: on a 2-core machine the front-ends and the
client take the rest, which bounds service / in-process) and, at c=1, the median latency minus the
server's median compute_ms (what the serving path adds). Measurements run one
at a time (on a small machine they would compete for the same cores) but in --rounds: each round runs
every in-process loop, every HTTP level of the service and of the naive server for --duration /
--rounds seconds, so a noisy machine's drift hits all figures alike; latency percentiles are the
median of the rounds'. Without --store a
synthetic store (benchmarks/synthetic.py) is built under --scratch: speed does not depend on
training. --device cuda measures the GPU (and GPU memory per scenario, in-process).
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator

from benchmarks.common import free_port, running_server
from benchmarks.experiment import Settings, experiment
from benchmarks.loadgen import Workload, agnews_test_texts, failed_levels, run_level
from benchmarks.paths import agnews_data, offline_env
from models.hardware import usable_cores

SHAPES = ("tiny", "minilm", "roberta-base", "roberta-large")


class CeilingSettings(Settings):
    store: str | None = Field(None, description="model store to measure; default: a synthetic store of --shape")
    shape: Literal[SHAPES] = Field("minilm", description="synthetic store shape when no --store is given")  # type: ignore[valid-type]
    scratch: str = Field("/tmp/ceiling-stores", description="where synthetic stores are built (reused when present)")
    adapters: int = Field(32, ge=1, description="LoRA adapters mixed per request in the adapters-N scenario")
    scenarios: list[str] | None = Field(
        None, description="subset of full, adapter-1, adapters-N, onnx-int8 (default: all the store has)"
    )
    onnx_int8: bool = Field(True, description="synthetic store: also export full to onnx-int8")
    concurrency: list[int] = Field([1, 32], description="wrk concurrency levels, e.g. 1,32")
    duration: float = Field(10.0, gt=0, description="measured seconds per level (and for the in-process loop)")
    warmup: float = Field(2.0, ge=0, description="unmeasured seconds before each HTTP level (each round)")
    rounds: int = Field(
        3,
        ge=1,
        description="every in-process loop and HTTP level runs in this many slices of --duration / --rounds, "
        "in turn, so that drift of a noisy machine hits every figure alike",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="service and in-process precision; auto = bf16 only where native"
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="device of the torch variants")
    max_batch_size: int = Field(64, gt=0, description="rows per batch, in-process and in the service")
    threads: int = Field(
        default_factory=usable_cores,
        gt=0,
        description="in-process torch / onnxruntime threads; the service keeps its default (--threads auto) "
        "unless --service-args sets it",
    )
    lanes: int | None = Field(
        None,
        ge=1,
        description="in-process: torch batches run on this many threads at once, each with threads/lanes torch "
        "threads (inter-op parallelism: on a 2-core Xeon two 1-thread lanes gave ~2x one 2-thread lane, MiniLM "
        "bf16); default: one per core on CPU (what the service's --lanes auto gives a compute-heavy model), 1 on "
        "CUDA. ONNX sessions run one batch at a time on all threads, as in the service",
    )
    naive: bool = Field(True, description="also measure the naive pipeline() server")
    service_args: list[str] = Field(
        [],
        description="extra `python -m service` flags, comma-separated, given with '=': --service-args=--max-wait-ms,0",
    )
    data: str = Field(default_factory=agnews_data, description="AG News dir/file (test texts)")
    seed: int = Field(0, description="seed of the request sequence")
    timeout: float = Field(60.0, gt=0, description="per-request timeout in s")
    start_timeout: float = Field(900.0, gt=0, description="seconds to wait for a server to be ready")

    @model_validator(mode="after")
    def _check(self) -> CeilingSettings:
        if self.lanes is None:
            self.lanes = usable_cores() if self.device == "cpu" else 1
        if min(self.concurrency) < 1:
            raise ValueError(f"--concurrency levels must be >= 1, got {self.concurrency}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device visible here; use --device cpu")
        return self


def scenarios_of(names: set[str], n_adapters: int) -> dict[str, list[str]]:
    """Scenario -> models requested, for the variants the store has."""
    out: dict[str, list[str]] = {}
    if "full" in names:
        out["full"] = ["full"]
    if "lora-0" in names:
        out["adapter-1"] = ["lora-0"]
    loras = [f"lora-{i}" for i in range(n_adapters)]
    if n_adapters > 1 and set(loras) <= names:
        out[f"adapters-{n_adapters}"] = loras
    if "onnx-int8" in names:
        out["onnx-int8"] = ["onnx-int8"]
    return out


class InProcess:
    """One scenario's variants in the service's own Runtime (same loader, precision, LoRA bank, ONNX
    session), loaded and warmed up once; `timed` runs batches drawn like the HTTP requests, tokenising in
    the loop. On CUDA the GPU memory the scenario loads and peaks at is taken at load and warm-up."""

    def __init__(self, store_root: Path, models: list[str], texts: list[str], s: CeilingSettings, precision: str):
        import torch

        from models import Store
        from service.config import ServiceConfig
        from service.runtime import Runtime

        torch.set_num_threads(s.threads)
        cfg = ServiceConfig(
            store=store_root,
            precision=precision,
            device=s.device,
            threads=s.threads,
            variants=",".join(models),
            max_batch_size=s.max_batch_size,
        )
        self.s = s
        cuda = s.device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
        self.rt = rt = Runtime(Store(store_root), cfg)
        if any(Store(store_root).manifest(m).kind == "lora" for m in models):
            rt.load_base()
        self.entries = entries = {m: rt.load(m) for m in models}
        self.memory: dict[str, Any] = {}
        if cuda:
            self.memory["gpu_memory_loaded_bytes"] = torch.cuda.memory_allocated() - mem0
        seq = Workload(texts, models, seed=s.seed).stream(max(s.max_batch_size * 64, 4096))
        bs = s.max_batch_size
        self.batches = [seq[i : i + bs] for i in range(0, len(seq) - bs + 1, bs)]
        # warm-up (allocations, ONNX / oneDNN kernel selection; on CUDA each bucket's graph capture)
        for b in self.batches[: 24 if cuda else 1]:
            self.one(b)
        if cuda:
            self.memory["gpu_memory_peak_bytes"] = torch.cuda.max_memory_allocated() - mem0
        self.lanes = s.lanes if all(rt.lane_parallel(e, by_cost=False) for e in entries.values()) else 1
        from models.variant import ONNX_KINDS

        # a thread's CPU time counts all of a torch batch on a 1-thread lane; an ONNX session computes on
        # its own pool threads too, and a forward on several threads on OpenMP helpers: not counted
        self.cpu_counted = self.lanes > 1 and not any(e.kind in ONNX_KINDS for e in entries.values())
        self.next = 0  # rounds go on through the batch list rather than repeat its start

    def one(self, batch: list[tuple[str, list[str]]]) -> int:
        ents = [self.entries[m] for m, _ in batch]
        rows = ents[0].encode(
            [inputs[0] for _, inputs in batch]
        )  # one tokenizer per group (a LoRA mix shares the base's)
        self.rt.forward(ents, rows)  # returns host fp32 logits: the device work is finished
        return len(rows)

    def timed(self, duration_s: float) -> tuple[int, int, float, float]:
        """(rows, batches, seconds, the lane threads' CPU seconds) of batches on `lanes` threads at once
        for `duration_s`."""
        import torch

        cuda = self.s.device == "cuda"
        if cuda:  # the other scenarios' Runtimes are resident too: count only what this one adds
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
        threads = max(1, self.s.threads // self.lanes)
        rows, n, t0, cpu_s = _lanes(
            self.one, self.batches[self.next :] + self.batches[: self.next], self.lanes, threads, duration_s
        )
        elapsed_s = time.perf_counter() - t0
        self.next = (self.next + n) % len(self.batches)
        if cuda:
            peak = self.memory["gpu_memory_loaded_bytes"] + torch.cuda.max_memory_allocated() - mem0
            self.memory["gpu_memory_peak_bytes"] = max(self.memory["gpu_memory_peak_bytes"], peak)
        return rows, n, elapsed_s, cpu_s

    def summary(self, rounds: list[tuple[int, int, float, float]]) -> dict[str, Any]:
        rows, n, elapsed_s, cpu_s = (sum(r[i] for r in rounds) for i in range(4))
        out: dict[str, Any] = {
            "rows_per_s": rows / elapsed_s,
            "rows": rows,
            "batches": n,
            "batch_size": self.s.max_batch_size,
            "lanes": self.lanes,
            "elapsed_s": elapsed_s,
            "rounds_rows_per_s": [r / e for r, _, e, _ in rounds],
            # the share of the machine's CPU the lane threads got (see _lanes; None where not all counted)
            "lane_cpu_share": self.cpu_share(cpu_s, elapsed_s),
            "precision": sorted({self.rt.entry_precision(e) for e in self.entries.values()}),
            **self.memory,
        }
        if self.s.device == "cuda":
            out["cuda_graphs"] = self.rt.graph_state()  # buckets captured, replays, eager batches, why not
        return out

    def cpu_share(self, cpu_s: float, elapsed_s: float) -> float | None:
        """The lanes' share of the machine's CPU over `elapsed_s` (None where their time is not all counted)."""
        return _machine_share(cpu_s, elapsed_s) if self.cpu_counted else None

    def close(self) -> None:
        self.rt.entries.clear()


def in_process(
    store_root: Path, models: list[str], texts: list[str], s: CeilingSettings, precision: str
) -> dict[str, Any]:
    """Rows/s of a fresh InProcess over --duration seconds (one round)."""
    ip = InProcess(store_root, models, texts, s, precision)
    try:
        return ip.summary([ip.timed(s.duration)])
    finally:
        ip.close()


def _machine_share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds over `wall_s` as a share of every core of this machine."""
    return cpu_s / wall_s / usable_cores()


def _lanes(
    one: Any, batches: list[Any], lanes: int, threads: int, duration_s: float, min_batches: int = 3
) -> tuple[int, int, float, float]:
    """(rows, batches, start, CPU seconds) of `lanes` threads running batches at once, `threads` torch
    threads each, for `duration_s` and at least `min_batches` batches. The CPU seconds are the lane threads'
    own (time.thread_time, as the service's service_batch_cpu_seconds): exact for 1-thread lanes."""
    import threading

    import torch

    lock, done, cpu = threading.Lock(), [0, 0], [0.0]
    t0 = time.perf_counter()

    def lane() -> None:
        torch.set_num_threads(threads)  # per thread (OpenMP), like the batcher's
        cpu0 = time.thread_time()
        while True:
            with lock:
                if time.perf_counter() - t0 >= duration_s and done[1] >= min_batches:
                    cpu[0] += time.thread_time() - cpu0
                    return
                k = done[1]
                done[1] += 1
            n = one(batches[k % len(batches)])
            with lock:
                done[0] += n

    workers = [threading.Thread(target=lane) for _ in range(lanes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return done[0], done[1], t0, cpu[0]


def _service_cmd(store_root: Path, port: int, models: list[str], s: CeilingSettings, precision: str) -> list[str]:
    cmd = [sys.executable, "-m", "service", "--store", str(store_root), "--port", str(port)]
    cmd += ["--precision", precision, "--device", s.device]
    cmd += ["--max-batch-size", str(s.max_batch_size), "--variants", ",".join(models), "--log-level", "warning"]
    return cmd + list(s.service_args)


def engine_batches(url: str) -> tuple[float, float, float, float] | None:
    """(rows, batches, batches run on lanes, CPU seconds of the lane threads that ran them) so far, from
    the engine's /metrics (None from a server without them)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(f"{url}/metrics", timeout=10)
        r.raise_for_status()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if family.name == "service_batch_size_rows":
                    found[sample.name] = sample.value
                elif family.name in ("service_batches", "service_batch_cpu_seconds"):
                    found[f"{sample.name}:{sample.labels.get('where')}"] = sample.value
    except (httpx.HTTPError, ValueError):  # no such endpoint (the naive server), or not Prometheus text
        return None
    if "service_batch_size_rows_count" not in found:
        return None
    lanes = found.get("service_batches_total:lane", 0.0), found.get("service_batch_cpu_seconds_total:lane", 0.0)
    return found["service_batch_size_rows_sum"], found["service_batch_size_rows_count"], *lanes


def http_level(
    url: str,
    pid: int,
    target: str,
    models: list[str],
    texts: list[str],
    s: CeilingSettings,
    c: int,
    duration_s: float,
    cpu_counted: bool = False,
) -> dict[str, Any]:
    """One wrk level (closed loop at concurrency `c`) with the rows per batch the engine formed meanwhile;
    `cpu_counted` (a torch scenario on 1-thread lanes): with the lane threads' CPU share too, when every
    batch of the level ran on a lane."""
    wl = Workload(texts, models, seed=s.seed)
    before, t0 = engine_batches(url), time.perf_counter()
    r = run_level(url, wl, concurrency=c, duration_s=duration_s, warmup_s=s.warmup, timeout_s=s.timeout, server_pid=pid)
    after, wall_s = engine_batches(url), time.perf_counter() - t0
    # rows per batch the engine formed over the level (warm-up included): at c=32 a closed loop
    # tends to alternate two half-full batches, which in-process batches of --max-batch-size never do
    if before and after and after[1] > before[1]:
        r["engine_rows_batches"] = [after[0] - before[0], after[1] - before[1]]
        r["engine_mean_batch_rows"] = (after[0] - before[0]) / (after[1] - before[1])
        # the share of the machine's CPU the lane threads got (in-process: lane_cpu_share); on a small CPU
        # the rest goes to the front-ends, the engine's socket loop and the client. Not where a batch ran
        # elsewhere (a lone request runs on the batcher thread, on every core: its helpers are not counted)
        if cpu_counted and after[2] - before[2] == after[1] - before[1]:
            r["lane_cpu_share"] = _machine_share(after[3] - before[3], wall_s)
    r.update(target=target, models=models)
    if r["ok"] == 0:
        from benchmarks.loadgen import _why_failed

        r["failure"] = _why_failed(url, wl, r)
    print(
        f"[ceiling] {target:>14} c={c:<3} {r['throughput_rps']:8.1f} req/s  p50 {_ms(r['latency']['p50_ms'])}  "
        f"compute p50 {_ms(_compute_p50(r))}  client CPU {r['client_cpu_share']:.0%}  "
        f"server CPU {_pct(r['server_cpu_share'])}  errors {r['errors_by_status'] or 0}"
        + (f"  engine batches {r['engine_mean_batch_rows']:.1f} rows" if r.get("engine_mean_batch_rows") else "")
        + (f"  lanes' CPU {r['lane_cpu_share']:.0%}" if r.get("lane_cpu_share") is not None else ""),
        flush=True,
    )
    return r


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's rounds as one result. Counts, throughput, CPU shares and rows per batch are over all
    rounds (exact); latency and server-timing percentiles are the median of the rounds' own (each exact),
    max the max; every round's throughput and p50 stay in `rounds`."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[-1])
    for k in ("requests", "ok", "errors", "completed_outside_window", "window_s"):
        out[k] = sum(r.get(k) or 0 for r in runs)
    window_s = max(out["window_s"], 1e-9)
    out["throughput_rps"] = out["ok"] / window_s
    errors: dict[str, int] = {}
    per_model: dict[str, int] = {}
    for r in runs:
        for k, n in (r.get("errors_by_status") or {}).items():
            errors[k] = errors.get(k, 0) + n
        for k, n in (r.get("per_model_requests") or {}).items():
            per_model[k] = per_model.get(k, 0) + n
    out["errors_by_status"], out["per_model_requests"] = errors, per_model
    if all(r.get("tokens_per_s") is not None for r in runs):
        out["tokens_per_s"] = sum(r["tokens_per_s"] * r["window_s"] for r in runs) / window_s

    def median_of(dicts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        dicts = [d for d in dicts if d and d.get("p50_ms") is not None]
        if not dicts:
            return None
        return {
            k: (max if k == "max_ms" else statistics.median)(d[k] for d in dicts if d.get(k) is not None)
            for k in dicts[0]
        }

    out["latency"] = median_of([r["latency"] for r in runs]) or runs[-1]["latency"]
    if any(r.get("server_timing") for r in runs):
        out["server_timing"] = {
            k: median_of([(r.get("server_timing") or {}).get(k) for r in runs]) for k in ("queue", "compute")
        }
    for k in ("client_cpu_share", "server_cpu_share", "lane_cpu_share"):
        shares = [(r[k], r["window_s"]) for r in runs if r.get(k) is not None]
        out[k] = sum(v * w for v, w in shares) / max(sum(w for _, w in shares), 1e-9) if shares else None
    eb = [r["engine_rows_batches"] for r in runs if r.get("engine_rows_batches")]
    if eb:
        out["engine_rows_batches"] = [sum(e[0] for e in eb), sum(e[1] for e in eb)]
        out["engine_mean_batch_rows"] = out["engine_rows_batches"][0] / out["engine_rows_batches"][1]
    out["rounds"] = [{"throughput_rps": r["throughput_rps"], "p50_ms": r["latency"]["p50_ms"]} for r in runs]
    failures = [r["failure"] for r in runs if r.get("failure")]
    out.pop("failure", None)
    if out["ok"] == 0 and failures:
        out["failure"] = failures[0]
    return out


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} ms"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def _compute_p50(r: dict[str, Any]) -> float | None:
    return ((r.get("server_timing") or {}).get("compute") or {}).get("p50_ms")


def _load_in_process(
    store_root: Path,
    scenarios: dict[str, list[str]],
    texts: list[str],
    s: CeilingSettings,
    precision: str,
    failed: dict[str, str],
) -> dict[str, InProcess]:
    """One Runtime per scenario, loaded and warmed up (GPU memory per scenario is taken as each loads)."""
    live: dict[str, InProcess] = {}
    for name, models in scenarios.items():
        try:
            live[name] = InProcess(store_root, models, texts, s, precision)
        except Exception as e:  # noqa: BLE001 - a refused variant is recorded, the other scenarios still run
            failed[f"{name} in-process"] = f"{type(e).__name__}: {e}"
    return live


def _rounds(
    store_root: Path,
    scenarios: dict[str, list[str]],
    live: dict[str, InProcess],
    texts: list[str],
    s: CeilingSettings,
    precision: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]], dict[str, Any] | None, dict[str, Any]]:
    """The service (every scenario's variants) and the naive pipeline() server (one model) up together;
    then --rounds rounds of every in-process loop, every HTTP level of the service, then the naive
    server's, --duration / --rounds seconds each, so that a noisy machine's drift hits every figure alike
    (one phase after another, it once made 32 mixed adapters read 0.85x one adapter where the same ops run).
    Returns (in-process, service levels, naive levels, the service's /v1/models at the end); closes `live`."""
    import torch

    all_models = sorted({m for ms in scenarios.values() for m in ms})
    naive_model = next((m for m in ("full", "lora-0") if m in all_models), None) if s.naive else None
    port = free_port()
    naive_port = next(p for p in iter(free_port, None) if p != port)
    url, naive_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{naive_port}"
    cmd = _service_cmd(store_root, port, all_models, s, precision)
    naive_cmd = [sys.executable, "-m", "benchmarks", "baseline-server", "--model", str(naive_model)]
    naive_cmd += ["--store", str(store_root), "--port", str(naive_port), "--device", s.device]
    slice_s = s.duration / s.rounds
    ip_rounds: dict[str, list[tuple[int, int, float, float]]] = {name: [] for name in live}
    http: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as servers:
        proc = servers.enter_context(running_server(cmd, f"{url}/readyz", timeout_s=s.start_timeout, env=offline_env()))
        targets = [(url, proc.pid, name, models) for name, models in scenarios.items()]
        if naive_model:
            naive_proc = servers.enter_context(
                running_server(naive_cmd, f"{naive_url}/readyz", timeout_s=s.start_timeout, env=offline_env())
            )
            targets.append((naive_url, naive_proc.pid, "naive", [naive_model]))
        for k in range(s.rounds):
            print(f"[ceiling] round {k + 1}/{s.rounds}", flush=True)
            for name, ip in live.items():
                ip_rounds[name].append(ip.timed(slice_s))
                rows, _, el, cpu_s = ip_rounds[name][-1]
                share = _pct(ip.cpu_share(cpu_s, el))
                print(f"[ceiling] {name:>14} in-process {rows / el:8.1f} rows/s  lanes' CPU {share}", flush=True)
            for u, pid, name, models in targets:
                for c in s.concurrency:
                    counted = name in live and live[name].cpu_counted
                    level = http_level(u, pid, name, models, texts, s, c, slice_s, cpu_counted=counted)
                    http.setdefault((name, c), []).append(level)
        # what the service computed in, and on CUDA whether it replayed graphs or fell back to eager (and why)
        try:  # a figure source, never a reason to lose the measured rounds
            service_models = httpx.get(f"{url}/v1/models", timeout=30).raise_for_status().json()
        except (httpx.HTTPError, ValueError) as e:
            service_models = {}
            print(f"[ceiling] service /v1/models unreadable ({type(e).__name__}: {e})", flush=True)
        print(f"[ceiling] service precision: {json.dumps(service_models.get('precision'))[:1000]}", flush=True)
        if s.device == "cuda":
            print(f"[ceiling] service CUDA graphs: {json.dumps(service_models.get('cuda_graphs'))[:2000]}", flush=True)
    ceiling = {name: ip.summary(ip_rounds[name]) for name, ip in live.items()}
    for name, ip in live.items():
        ip.close()
        graphs = ceiling[name].get("cuda_graphs")
        print(
            f"[ceiling] {name:>14} in-process {ceiling[name]['rows_per_s']:8.1f} rows/s over {s.rounds} round(s)"
            + (f"  CUDA graphs {json.dumps(graphs)[:300]}" if graphs else ""),
            flush=True,
        )
    live.clear()
    gc.collect()
    if s.device == "cuda":
        torch.cuda.empty_cache()
    service = {name: [merge_rounds(http[(name, c)]) for c in s.concurrency] for name in scenarios}
    naive = (
        {"model": naive_model, "runs": [merge_rounds(http[("naive", c)]) for c in s.concurrency]}
        if naive_model
        else None
    )
    return ceiling, service, naive, service_models


def _matched(
    store_root: Path,
    scenarios: dict[str, list[str]],
    service: dict[str, list[dict[str, Any]]],
    texts: list[str],
    s: CeilingSettings,
    precision: str,
    failed: dict[str, str],
) -> None:
    """In-process again at the rows per batch the engine formed at each level (recorded in the level):
    the service cannot beat its own batches (a closed loop of c=32 settles into two alternating half
    batches), so service / this isolates what the serving path itself costs. Runs after the rounds."""
    matched: dict[tuple[str, int], float] = {}
    for name, runs in service.items():
        for r in runs:
            bs = round(r.get("engine_mean_batch_rows") or 0)
            if not 1 <= bs < s.max_batch_size:
                continue
            if (name, bs) not in matched:
                try:
                    res = in_process(
                        store_root, scenarios[name], texts, s.model_copy(update={"max_batch_size": bs}), precision
                    )
                    matched[(name, bs)] = res["rows_per_s"]
                    print(f"[ceiling] {name:>14} in-process at batch {bs}: {res['rows_per_s']:8.1f} rows/s", flush=True)
                except Exception as e:  # noqa: BLE001 - recorded; the other figures stand
                    failed[f"{name} in-process at batch {bs}"] = f"{type(e).__name__}: {e}"
                    continue
                finally:
                    gc.collect()
            r["in_process_at_engine_batch"] = {"batch_size": bs, "rows_per_s": matched[(name, bs)]}


def run(s: CeilingSettings) -> dict[str, Any]:
    import torch

    from models import Store
    from models.hardware import resolve_precision

    if s.store:
        store_root = Path(s.store)
        if not store_root.is_dir():
            raise FileNotFoundError(f"--store {store_root}: no such directory")
    else:
        from benchmarks.synthetic import build_store

        shape_store = Path(s.scratch) / f"{s.shape}-{s.adapters}"
        t0 = time.perf_counter()
        store_root = build_store(shape_store, s.shape, n_adapters=s.adapters, onnx_int8=s.onnx_int8)
        print(f"[ceiling] synthetic {s.shape} store at {store_root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    choice = resolve_precision(s.precision, s.device)
    # the service and the in-process Runtime both get the requested precision and resolve it alike (auto
    # on a CPU with native bf16 measures bf16 against fp32 per model at load: service/runtime.py)
    precision = s.precision
    available = scenarios_of(set(Store(store_root).names()), s.adapters)
    wanted = s.scenarios or list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ValueError(f"scenario(s) {unknown} not in this store; it has {list(available)}")
    scenarios = {k: available[k] for k in wanted}
    texts = agnews_test_texts(s.data)
    failed: dict[str, str] = {}
    print(
        f"[ceiling] precision {choice.precision} ({choice.reason}), device {s.device}, threads {s.threads}", flush=True
    )

    live = _load_in_process(store_root, scenarios, texts, s, precision, failed)
    ceiling, service, naive, service_models = _rounds(store_root, scenarios, live, texts, s, precision)
    _matched(store_root, scenarios, service, texts, s, precision, failed)

    rows = summary_rows(scenarios, ceiling, service, naive)
    for r in rows:
        print(
            f"[ceiling] {r['scenario']:>14} c={r['concurrency']:<3} service {r['service_rps']:8.1f} req/s = "
            f"x{_x(r['service_over_in_process'])} in-process, x{_x(r['service_over_naive'])} naive"
            + (
                f", x{_x(r['service_over_matched'])} in-process at the engine's batch {r['matched_batch']}"
                if r["service_over_matched"] is not None
                else ""
            )
            + (
                f"; lanes' CPU {r['lane_cpu_share']:.0%} vs {r['in_process_lane_cpu_share']:.0%} in-process"
                if r["lane_cpu_share"] is not None and r["in_process_lane_cpu_share"] is not None
                else ""
            )
            + (
                f"; p50 - compute p50 = {r['p50_minus_compute_ms']:.1f} ms"
                if r["p50_minus_compute_ms"] is not None
                else ""
            ),
            flush=True,
        )
    mix = mix_ratios(rows, ceiling, s.adapters)
    for m in mix:
        print(f"[ceiling] {m['scenario']} / adapter-1 at {m['level']}: x{m['ratio']:.2f}", flush=True)
    for runs in service.values():
        failed.update({f"{k} (service)": v for k, v in failed_levels(runs).items()})
    if naive:
        failed.update({f"{k} (naive)": v for k, v in failed_levels(naive["runs"]).items()})
    return {
        "store": str(store_root),
        "shape": None if s.store else s.shape,
        "precision": choice.as_dict(),
        "service_precision": service_models.get("precision"),  # with each architecture's measurement, if any
        "device": s.device,
        "gpu": torch.cuda.get_device_name(0) if s.device == "cuda" else None,
        "service_cuda_graphs": service_models.get("cuda_graphs"),
        "scenarios": {
            k: {"models": v, "in_process": ceiling.get(k), "runs": service.get(k, [])} for k, v in scenarios.items()
        },
        "naive": naive,
        "rows": rows,
        "mix_vs_one_adapter": mix,
        **({"failed": failed} if failed else {}),
    }


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _lanes_cell(r: dict[str, Any]) -> str:
    """The share of the machine's CPU the batch threads got, service / in-process (older results: –)."""
    if r.get("lane_cpu_share") is None or r.get("in_process_lane_cpu_share") is None:
        return "–"
    return f"{_pct(r['lane_cpu_share'])} / {_pct(r['in_process_lane_cpu_share'])}"


def summary_rows(
    scenarios: dict[str, list[str]],
    ceiling: dict[str, dict[str, Any]],
    service: dict[str, list[dict[str, Any]]],
    naive: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One row per (scenario, concurrency) with the ratios; levels without a success get no figure."""
    naive_at = {r["concurrency"]: r for r in (naive or {}).get("runs", []) if r["ok"]}
    rows = []
    for name in scenarios:
        ip = (ceiling.get(name) or {}).get("rows_per_s")
        ip_lanes = (ceiling.get(name) or {}).get("lane_cpu_share")
        for r in service.get(name, []):
            if not r["ok"]:
                continue
            rps, nv = r["throughput_rps"], naive_at.get(r["concurrency"])
            compute = _compute_p50(r)
            p50 = r["latency"]["p50_ms"]
            m = r.get("in_process_at_engine_batch") or {}
            rows.append(
                {
                    "scenario": name,
                    "concurrency": r["concurrency"],
                    "service_rps": rps,
                    "in_process_rps": ip,
                    "naive_rps": nv["throughput_rps"] if nv else None,
                    "service_over_in_process": rps / ip if ip else None,
                    "service_over_naive": rps / nv["throughput_rps"] if nv else None,
                    "matched_batch": m.get("batch_size"),
                    "service_over_matched": rps / m["rows_per_s"] if m else None,
                    "p50_ms": p50,
                    "naive_p50_ms": nv["latency"]["p50_ms"] if nv else None,
                    "compute_p50_ms": compute,
                    "p50_minus_compute_ms": (p50 - compute) if r["concurrency"] == 1 and compute is not None else None,
                    "client_cpu_share": r["client_cpu_share"],
                    "server_cpu_share": r["server_cpu_share"],
                    "engine_mean_batch_rows": r.get("engine_mean_batch_rows"),
                    # service / in-process ~ (lane_cpu_share / in_process_lane_cpu_share) x rows per lane CPU-s
                    "lane_cpu_share": r.get("lane_cpu_share"),
                    "in_process_lane_cpu_share": ip_lanes,
                    "errors_by_status": r.get("errors_by_status") or {},
                }
            )
    return rows


def mix_ratios(rows: list[dict[str, Any]], ceiling: dict[str, dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """adapters-N throughput / adapter-1 throughput, in-process and per concurrency (same texts)."""
    mix, one = f"adapters-{n}", "adapter-1"
    out = []
    if (ceiling.get(mix) or {}).get("rows_per_s") and (ceiling.get(one) or {}).get("rows_per_s"):
        out.append(
            {"scenario": mix, "level": "in-process", "ratio": ceiling[mix]["rows_per_s"] / ceiling[one]["rows_per_s"]}
        )
    by = {(r["scenario"], r["concurrency"]): r["service_rps"] for r in rows}
    for (name, c), rps in by.items():
        if name == mix and by.get((one, c)):
            out.append({"scenario": mix, "level": f"c={c}", "ratio": rps / by[(one, c)]})
    return out


def _errors(doc: dict[str, Any], row: dict[str, Any]) -> dict[str, int]:
    """Non-200 answers of a row's HTTP level (from the scenario's runs: older rows lack the field)."""
    if "errors_by_status" in row:
        return row["errors_by_status"]
    runs = doc["scenarios"].get(row["scenario"], {}).get("runs", [])
    return next((r.get("errors_by_status") or {} for r in runs if r["concurrency"] == row["concurrency"]), {})


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    """Report section: per run, service vs in-process vs naive per scenario and concurrency."""
    from benchmarks.report import no_figure_line, source_line, table

    parts = ["## Ceiling: the service vs its own model in-process vs the naive server (`ceiling`)"]
    for f, doc in docs:
        p = doc["precision"]
        gpu = f", GPU {doc['gpu']}" if doc.get("gpu") else ""
        parts.append(
            f"\nStore `{doc.get('shape') or doc['store']}`, {p['precision']} ({p['reason']}), {doc['device']}{gpu}; "
            f"batches of {doc['settings']['max_batch_size']} in-process"
            + (f" on {doc['settings']['lanes']} lanes at once" if doc["settings"].get("lanes", 1) > 1 else "")
            + "; wrk for the HTTP levels, "
            f"{doc['settings']['duration']} s each"
            + (
                f", in {doc['settings']['rounds']} interleaved rounds (latency: median of the rounds')"
                if doc["settings"].get("rounds", 1) > 1
                else " (one phase after another)"
            )
            + ".\n"
        )
        per_model = (doc.get("service_precision") or {}).get("per_model") or {}
        if per_model:
            parts.append(
                "Per model, measured by the service at load: "
                + "; ".join(
                    f"`{k}` {m['precision']} (bf16 {m['bf16_ms']:.1f} ms vs fp32 {m['fp32_ms']:.1f} ms)"
                    for k, m in per_model.items()
                )
                + ".\n"
            )
        rows = [
            [
                r["scenario"],
                f"c={r['concurrency']}",
                r["in_process_rps"],
                r["service_rps"],
                r["naive_rps"],
                _x(r["service_over_in_process"]),
                _x(r.get("service_over_matched"))
                + (f" (batch {r['matched_batch']})" if r.get("matched_batch") else ""),
                _x(r["service_over_naive"]),
                r["p50_ms"],
                r["naive_p50_ms"],
                r["p50_minus_compute_ms"],
                _pct(r["client_cpu_share"]),
                _pct(r["server_cpu_share"]),
                _lanes_cell(r),
                r.get("engine_mean_batch_rows"),
                ", ".join(f"{n} × {k}" for k, n in _errors(doc, r).items()) or "0",
            ]
            for r in doc["rows"]
        ]
        header = ["scenario", "level", "in-process rows/s", "service req/s", "naive req/s", "service / in-process"]
        header += ["service / in-process at the engine's batch"]
        header += ["service / naive", "p50 ms", "naive p50 ms", "c=1 p50 − compute ms", "client CPU", "server CPU"]
        header += ["lanes' CPU, service / in-process", "engine rows / batch", "errors (req/s counts answers 200 only)"]
        parts.append(table(header, rows))
        mem = [
            [
                name,
                (sc["in_process"] or {}).get("gpu_memory_loaded_bytes"),
                (sc["in_process"] or {}).get("gpu_memory_peak_bytes"),
            ]
            for name, sc in doc["scenarios"].items()
            if (sc.get("in_process") or {}).get("gpu_memory_loaded_bytes") is not None
        ]
        if mem:
            parts.append(f"\nGPU memory per scenario ({doc['gpu']}, MiB):\n")
            parts.append(
                table(["scenario", "loaded", "peak in forward"], [[n, a / 2**20, b / 2**20] for n, a, b in mem])
            )
        if doc.get("mix_vs_one_adapter"):
            parts.append(
                "\nMixed adapters vs one adapter: "
                + ", ".join(f"{m['level']} ×{m['ratio']:.2f}" for m in doc["mix_vs_one_adapter"])
            )
        if doc.get("failed"):
            parts.append(no_figure_line(doc["failed"]))
        parts.append("\n" + source_line(f, doc, out_dir))
    return "\n".join(parts)


experiment(
    "ceiling",
    CeilingSettings,
    help="service HTTP throughput (wrk) vs the same model in-process vs the naive pipeline() server",
    render=render,
)(run)
