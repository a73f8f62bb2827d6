"""Prometheus metrics; each app owns its CollectorRegistry so several servers can live in one process.

Two halves: `FrontendMetrics` (requests as the HTTP processes see them; summed over front-end
processes through prometheus_client's multiprocess mode when there are several) and
`EngineMetrics` (batches, queue, adapters, precision: the engine process renders them and each
front-end appends that text to its own on GET /metrics).
"""

from __future__ import annotations

import os

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from models.provenance import current_rss_bytes

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
UNKNOWN_VARIANT = "_unknown"  # requests naming no loaded variant share one label (bounded cardinality)


class FrontendMetrics:
    """What an HTTP front-end process counts; names carry their unit."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "service_requests",
            "Requests by variant, endpoint and status",
            ["variant", "endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "service_request_latency_seconds",
            "End-to-end request latency",
            ["variant", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.engine_up = Gauge(
            "service_engine_up", "1 while the engine process is connected", registry=r, multiprocess_mode="livemin"
        )
        self.engine_disconnects = Counter(
            "service_engine_disconnects",
            "Times a front-end lost the engine process (crash or restart); summed over front-ends, one crash counts once per front-end",
            registry=r,
        )

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several front-end processes: sum their files
            from prometheus_client import multiprocess

            _forget_dead_frontends()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _forget_dead_frontends() -> None:
    """Drop the live gauges (service_engine_up) of front-end workers that died: uvicorn restarts them under a
    new pid, and a dead one's last value (0 if the engine was down then) would be the minimum for good."""
    import glob

    from prometheus_client import multiprocess

    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "gauge_live*_*.db")):
        pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid)
        except PermissionError:
            pass


class EngineMetrics:
    """What the engine process measures; names carry their unit."""

    def __init__(self, device: str = "cpu"):
        self.registry = r = CollectorRegistry()
        self.precision = Info("service_precision", "Compute precision chosen for torch variants, and why", registry=r)
        self.queue_wait = Histogram(
            "service_queue_wait_seconds",
            "Time a row waited before its batch started",
            ["variant"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute = Histogram(
            "service_compute_seconds", "Forward time of one batch", ["group"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.batches = Counter(
            "service_batches",
            "Batches run, by where: 'lane' (a CPU lane, beside other batches) or 'batcher' (one at a time)",
            ["where"],
            registry=r,
        )
        self.batch_cpu = Counter(
            "service_batch_cpu_seconds",
            "CPU time of the thread that ran each batch's forward, by where (exact for 1-thread CPU lanes; the "
            "OpenMP helpers of a forward on several threads are not counted)",
            ["where"],
            registry=r,
        )
        self.batch_size = Histogram("service_batch_size_rows", "Rows per batch", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "service_batch_tokens",
            "Padded tokens per batch (rows x longest row)",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_adapters = Histogram(
            "service_batch_adapters",
            "Distinct LoRA adapters mixed in one batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("service_queue_depth_rows", "Input rows waiting for the batcher", registry=r)
        self.loaded_adapters = Gauge("service_loaded_adapters", "LoRA adapters resident on the base", registry=r)
        self.loaded_variants = Gauge("service_loaded_variants", "Variants servable by name", registry=r)
        self.adapter_load = Histogram(
            "service_adapter_load_seconds",
            "Time to load and verify a variant, by reason: start (at startup), admin (PUT /v1/adapters), cold (a "
            "request waited for it: an LRU-evicted adapter reattached, or on Ray Serve a variant loaded on its first "
            "request to a replica)",
            ["kind", "reason"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.evictions = Counter(
            "service_adapter_evictions",
            "LoRA adapters evicted by the LRU cap (on Ray Serve: any variant, beyond max_adapters_per_replica)",
            registry=r,
        )
        self.restarts = Counter(
            "service_requests_restarted",
            "Requests computed again from their first row because a hot-swap replaced their variant between "
            "two of their batches (one answer is always one version's)",
            registry=r,
        )
        self.swaps = Counter(
            "service_admin_operations", "Admin load/replace/unload by outcome", ["op", "outcome"], registry=r
        )
        self.rss = Gauge("service_process_resident_memory_bytes", "Resident set size of the server process", registry=r)
        self.rss.set_function(current_rss_bytes)
        if device == "cuda" and torch.cuda.is_available():
            self.cuda_allocated = Gauge(
                "service_cuda_memory_allocated_bytes", "CUDA memory held by tensors", registry=r
            )
            self.cuda_allocated.set_function(torch.cuda.memory_allocated)
            self.cuda_reserved = Gauge(
                "service_cuda_memory_reserved_bytes", "CUDA memory reserved by the allocator", registry=r
            )
            self.cuda_reserved.set_function(torch.cuda.memory_reserved)

    def render(self) -> bytes:
        return generate_latest(self.registry)
