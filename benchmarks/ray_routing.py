"""Experiment `ray-routing`: the service on Ray Serve (service/ray_app.py), 1 vs 2 engine replicas, and how
often Ray's multiplexed routing sends a request to a replica that already holds its adapter.

For each replica count and adapter popularity (uniform, zipf), a fresh application serves a synthetic
store with more adapters than one replica's cap; one seeded request sequence (single-text requests,
AG News test texts, `--concurrency` closed-loop clients) is sent through the HTTP API and every answer
says which replica served it and whether that replica already held the adapter (response headers
`x-engine-replica`, `x-adapter-hit`). Beside each measured hit-rate: the hit-rate an adapter-blind
router (each request to a random replica, each replica an LRU of the same cap) gets on the same
sequence, simulated — what routing by adapter buys.

    python -m benchmarks ray-routing --out reports/results/ray-routing.json

All replicas and the client share this machine's cores (2 on the project's machine): a second replica
adds no compute here, so req/s says what routing and replica overhead cost, not how Ray scales.
Needs the `ray` extra (`pip install '.[ray]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from benchmarks.common import load_split
from benchmarks.experiment import Settings, experiment
from benchmarks.paths import agnews_data
from benchmarks.stats import adapter_weights, latency_summary
from models.hardware import usable_cores

APP = "ray-routing"


class RayRoutingSettings(Settings):
    shape: Literal["tiny", "tiny-roberta", "minilm"] = Field("tiny", description="synthetic store shape (speed only)")
    store: str | None = Field(None, description="store dir (default: a synthetic one in a temp dir)")
    data: str = Field(default_factory=agnews_data, description="AG News dir/file (test texts)")
    adapters: int = Field(16, gt=1, description="LoRA adapters in the store (more than one replica's cap)")
    cap: int = Field(4, gt=0, description="adapters per replica (@serve.multiplexed cap = engine LRU cap)")
    replicas: list[int] = Field([1, 2], description="engine replica counts to compare")
    popularity: list[str] = Field(["uniform", "zipf:1.1"], description="adapter popularity: uniform or zipf:S")
    requests: int = Field(400, gt=0, description="requests per run")
    concurrency: int = Field(4, gt=0, description="closed-loop clients")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 only on native-bf16 CPUs")
    blind_seeds: int = Field(20, gt=0, description="seeds averaged for the simulated adapter-blind router")
    seed: int = Field(0, description="seed of the request sequence")


def blind_hit_rate(sequence: list[int], replicas: int, cap: int, seeds: int) -> float:
    """Hit-rate of an adapter-blind router on `sequence`: each request to a random replica, LRU caches."""
    rates = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        caches = [OrderedDict() for _ in range(replicas)]
        hits = 0
        for a, r in zip(sequence, rng.integers(0, replicas, len(sequence)), strict=True):
            cache = caches[r]
            if a in cache:
                hits += 1
                cache.move_to_end(a)
            else:
                cache[a] = True
                if len(cache) > cap:
                    cache.popitem(last=False)
        rates.append(hits / len(sequence))
    return float(np.mean(rates))


async def _drive(url: str, names: list[str], texts: list[str], concurrency: int) -> list[dict[str, Any]]:
    """Send names[i] with texts[i] from `concurrency` closed-loop clients; one record per request."""
    import httpx

    records: list[dict[str, Any]] = [{} for _ in names]
    next_i = iter(range(len(names)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_i:
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/classify", json={"model": names[i], "inputs": texts[i]})
                ok, status = r.status_code == 200, r.status_code
                rep, hit = r.headers.get("x-engine-replica"), r.headers.get("x-adapter-hit") == "1"
                loads = int(r.headers.get("x-replica-loads", 0))
            except httpx.HTTPError as e:
                ok, status, rep, hit, loads = False, type(e).__name__, None, False, 0
            records[i] = {
                "ok": ok,
                "status": status,
                "replica": rep,
                "hit": hit,
                "loads": loads,
                "latency_ms": (time.perf_counter() - t0) * 1e3,
            }

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=30).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray Serve application at {url} was not ready after {timeout_s:.0f}s")


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    from benchmarks.report import source_line, table

    parts = ["## Adapter-aware routing on Ray Serve (`ray-routing`)"]
    for f, doc in docs:
        p = doc["payload"]
        parts.append(
            f"\n{p['adapters']} adapters, cap {p['cap']} per replica, {p['requests']} single-text requests per run, "
            f"{p['concurrency']} clients, {p['precision']} {p['shape']} store. All replicas and the client share "
            f"{p['cores']} cores: a second replica adds no compute on this machine. Hit = the replica already held "
            "the adapter when the request arrived; no load = the request caused no load (it may have waited for "
            "another request's load of the same adapter); adapter-blind = random replica per request, LRU caches of "
            "the same cap, simulated on the same sequence (one request at a time: compare with no load).\n"
        )
        rows = [
            [
                r["replicas"],
                r["popularity"],
                f"{r['hit_rate']:.1%}",
                f"{r['no_load_share']:.1%}",
                f"{r['blind_hit_rate']:.1%}",
                r["loads"],
                r["req_per_s"],
                r["latency"]["p50_ms"],
                r["latency"]["p99_ms"],
                r["failed_requests"],
            ]
            for r in p["runs"]
        ]
        parts.append(
            table(
                [
                    "replicas",
                    "popularity",
                    "hit-rate",
                    "no load",
                    "adapter-blind (sim.)",
                    "loads",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "failed",
                ],
                rows,
            )
        )
        parts.append("\n" + source_line(f, doc, out_dir))
    return "\n".join(parts)


@experiment(
    "ray-routing",
    RayRoutingSettings,
    help="Ray Serve: 1 vs 2 engine replicas, multiplexed routing hit-rate under uniform and zipf popularity",
    render=render,
)
def run(s: RayRoutingSettings) -> dict[str, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeError("Ray is not installed; pip install '.[ray]' (make setup installs it)") from None

    from benchmarks import synthetic
    from models.hardware import resolve_precision
    from service.ray_app import build_app

    for dist in s.popularity:
        adapter_weights(2, dist)  # raises with what to write
    cores = usable_cores()
    precision = resolve_precision(s.precision, "cpu")
    with tempfile.TemporaryDirectory(prefix="ray-routing-") as tmp:
        store = Path(s.store) if s.store else Path(tmp) / "store"
        synthetic.build_store(store, s.shape, n_adapters=s.adapters, full=False)
        texts, _ = load_split(s.data, "test")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
        runs, failed = [], {}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for n in s.replicas:
                for dist in s.popularity:
                    rng = np.random.default_rng(s.seed)
                    seq = rng.choice(s.adapters, size=s.requests, p=adapter_weights(s.adapters, dist)).tolist()
                    app = build_app(
                        {
                            "store": str(store),
                            "engine_replicas": n,
                            "engine_cpus": cores / n,
                            "max_adapters_per_replica": s.cap,
                            "service": {"precision": s.precision, "threads": max(1, cores // n)},
                        }
                    )
                    serve.run(app, name=APP, route_prefix="/", blocking=False)
                    _wait_ready(url)
                    t0 = time.perf_counter()
                    recs = asyncio.run(
                        _drive(
                            url,
                            [f"lora-{a}" for a in seq],
                            [texts[i % len(texts)] for i in range(len(seq))],
                            s.concurrency,
                        )
                    )
                    wall_s = time.perf_counter() - t0
                    serve.delete(APP)
                    ok = [r for r in recs if r["ok"]]
                    per_replica: dict[str, dict[str, int]] = {}
                    for r in ok:
                        d = per_replica.setdefault(r["replica"], {"requests": 0, "loads": 0})
                        d["requests"] += 1
                        d["loads"] = max(d["loads"], r["loads"])
                    res = {
                        "replicas": n,
                        "popularity": dist,
                        "hit_rate": sum(r["hit"] for r in ok) / max(1, len(ok)),
                        "blind_hit_rate": blind_hit_rate(seq, n, s.cap, s.blind_seeds),
                        "loads": (loads := sum(d["loads"] for d in per_replica.values())),
                        # requests that caused no load (a request that waited for another's load of the same
                        # adapter counts here, not as a hit): the figure the sequential simulation compares to
                        "no_load_share": 1 - loads / max(1, len(ok)),
                        "per_replica": per_replica,
                        "distinct_adapters": len(set(seq)),
                        "req_per_s": len(ok) / wall_s,
                        "latency": latency_summary([r["latency_ms"] for r in ok]),
                        "failed_requests": len(recs) - len(ok),
                        "failed_statuses": dict(Counter(str(r["status"]) for r in recs if not r["ok"])),
                    }
                    print(
                        f"[ray-routing] replicas={n} {dist}: hit-rate {res['hit_rate']:.1%}, no load needed "
                        f"{res['no_load_share']:.1%} (adapter-blind router {res['blind_hit_rate']:.1%}), "
                        f"{res['loads']} loads, "
                        f"{res['req_per_s']:.1f} req/s, p50 {res['latency']['p50_ms']:.1f} ms, "
                        f"{res['failed_requests']} failed",
                        flush=True,
                    )
                    runs.append(res)
                    if res["failed_requests"]:
                        failed[f"replicas={n} {dist}"] = f"{res['failed_requests']} failed: {res['failed_statuses']}"
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    return {
        "cores": cores,
        "shape": s.shape,
        "precision": precision.precision,
        "adapters": s.adapters,
        "cap": s.cap,
        "requests": s.requests,
        "concurrency": s.concurrency,
        "runs": runs,
        **({"failed": failed} if failed else {}),
    }
