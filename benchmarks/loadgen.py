"""HTTP load generator: closed loop (N concurrent clients) or Poisson open loop (rate R).

Several targets (`name=URL,...`) run one after another with the same texts, model sequence
and settings, so the service and the naive baseline are compared side by side in one run.
Latency is measured by the client (send -> full response); in open loop it is measured from
the scheduled arrival time, so a server that falls behind is charged for the queueing it
causes (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from benchmarks.stats import adapter_weights, latency_summary, poisson_arrivals

MAX_INFLIGHT_OPEN_LOOP = 2048  # bound on outstanding requests when the server falls behind


@dataclass
class Sample:
    """One finished request."""

    start_s: float  # sent, relative to the window start (scheduled arrival in open loop)
    latency_ms: float
    status: str  # "200", "503", "timeout", "ConnectError", ...
    model: str
    tokens: int | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None


@dataclass
class Workload:
    """What to send: texts and model names drawn from a seeded stream, identical across targets."""

    texts: list[str]
    models: list[str]
    adapter_dist: str = "uniform"
    seed: int = 0
    api: str = "v1"  # v1: POST /v1/classify; hf: POST /models/{name}
    inputs_per_request: int = 1
    _weights: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("no texts to send")
        self._weights = adapter_weights(len(self.models), self.adapter_dist)

    def stream(self, n: int) -> list[tuple[str, list[str]]]:
        """The first `n` (model, inputs) pairs of this workload's fixed request sequence."""
        rng = np.random.default_rng(self.seed)
        model_idx = rng.choice(len(self.models), size=n, p=self._weights)
        text_idx = rng.integers(0, len(self.texts), size=(n, self.inputs_per_request))
        return [(self.models[m], [self.texts[t] for t in row]) for m, row in zip(model_idx, text_idx, strict=True)]


async def _send(client: httpx.AsyncClient, base_url: str, wl: Workload, model: str, inputs: list[str]) -> Sample:
    if wl.api == "hf":
        url, body = f"{base_url}/models/{model}", {"inputs": inputs if len(inputs) > 1 else inputs[0]}
    else:
        url, body = f"{base_url}/v1/classify", {"model": model, "inputs": inputs}
    t0 = time.perf_counter()
    tokens = queue_ms = compute_ms = None
    try:
        r = await client.post(url, json=body)
        status = str(r.status_code)
        if r.status_code == 200 and wl.api == "v1":
            data = r.json()
            tokens = (data.get("usage") or {}).get("tokens")
            timing = data.get("timing") or {}
            queue_ms, compute_ms = timing.get("queue_ms"), timing.get("compute_ms")
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.HTTPError as e:
        status = type(e).__name__
    latency_ms = (time.perf_counter() - t0) * 1000
    return Sample(0.0, latency_ms, status, model, tokens, queue_ms, compute_ms)


async def closed_loop(
    base_url: str, wl: Workload, concurrency: int, duration_s: float, warmup_s: float = 0.0, timeout_s: float = 30.0
) -> tuple[list[Sample], float, int]:
    """`concurrency` clients each send the next request as soon as their previous one returns.

    The measured window is [warm-up end, warm-up end + duration]; a request is counted when it
    completes inside it (whenever it was sent), so slow requests are neither lost nor cut
    short. Clients stop sending at the window's end and their last requests are awaited.
    Returns (samples completed in the window, window in s, requests sent but completed
    outside it).
    """
    # The sequence wraps around; 50k distinct requests is far more than a short run sends here.
    seq = wl.stream(50_000)
    next_i = 0
    samples: list[Sample] = []
    outside = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t_start = time.perf_counter()
        t_measure = t_start + warmup_s
        t_stop = t_measure + duration_s

        async def worker() -> None:
            nonlocal next_i, outside
            while time.perf_counter() < t_stop:
                i, next_i = next_i, next_i + 1
                model, inputs = seq[i % len(seq)]
                t_sent = time.perf_counter()
                s = await _send(client, base_url, wl, model, inputs)
                if t_measure <= time.perf_counter() <= t_stop:
                    s.start_s = t_sent - t_measure
                    samples.append(s)
                else:
                    outside += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, duration_s, outside


async def open_loop(
    base_url: str, wl: Workload, rate_per_s: float, duration_s: float, timeout_s: float = 30.0, seed: int = 0
) -> tuple[list[Sample], float, int]:
    """Requests arrive as a Poisson process of `rate_per_s`, independent of completions.

    Returns (samples, window in s, requests dropped client-side because more than
    MAX_INFLIGHT_OPEN_LOOP were outstanding).
    """
    arrivals = poisson_arrivals(rate_per_s, duration_s, np.random.default_rng(seed + 1))
    seq = wl.stream(len(arrivals))
    samples: list[Sample] = []
    dropped = 0
    inflight: set[asyncio.Task] = set()
    limits = httpx.Limits(max_connections=MAX_INFLIGHT_OPEN_LOOP, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(at_s: float, model: str, inputs: list[str]) -> None:
            try:
                s = await _send(client, base_url, wl, model, inputs)
            except asyncio.CancelledError:  # still unanswered when the drain deadline passed
                samples.append(Sample(at_s, (time.perf_counter() - t0 - at_s) * 1000, "unfinished", model))
                raise
            # latency from the scheduled arrival: includes any client-side lag behind the schedule
            s.latency_ms = max(s.latency_ms, (time.perf_counter() - t0 - at_s) * 1000)
            s.start_s = at_s
            samples.append(s)

        for at_s, (model, inputs) in zip(arrivals, seq, strict=True):
            delay = t0 + at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= MAX_INFLIGHT_OPEN_LOOP:
                dropped += 1
                continue
            task = asyncio.create_task(one(float(at_s), model, inputs))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(list(inflight), timeout=timeout_s + 5)
        window_s = time.perf_counter() - t0
        for task in list(inflight):
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
    return samples, window_s, dropped


def summarize(samples: list[Sample], window_s: float, slo_ms: float | None) -> dict[str, Any]:
    """Throughput, latency percentiles (successful requests), goodput under the SLO, errors by status."""
    ok = [s for s in samples if s.status == "200"]
    errors = Counter(s.status for s in samples if s.status != "200")
    tokens = [s.tokens for s in ok if s.tokens is not None]
    window_s = max(window_s, 1e-9)
    out: dict[str, Any] = {
        "requests": len(samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
        "window_s": window_s,
        "throughput_rps": len(ok) / window_s,
        "tokens_per_s": (sum(tokens) / window_s) if tokens and len(tokens) == len(ok) else None,
        "latency": latency_summary([s.latency_ms for s in ok]),
        "per_model_requests": dict(sorted(Counter(s.model for s in samples).items())),
    }
    if slo_ms is not None:
        good = sum(1 for s in ok if s.latency_ms <= slo_ms)
        out.update(slo_ms=slo_ms, goodput_rps=good / window_s, slo_attainment=good / len(samples) if samples else None)
    q = [s.queue_ms for s in ok if s.queue_ms is not None]
    c = [s.compute_ms for s in ok if s.compute_ms is not None]
    out["server_timing"] = {"queue": latency_summary(q), "compute": latency_summary(c)} if (q or c) else None
    return out


def parse_targets(spec: str) -> list[tuple[str, str, list[str] | None]]:
    """'URL' or 'name=URL,name2=URL2#m1+m2' -> [(name, url, models or None)].

    A '#m1+m2' suffix gives that target its own model list (otherwise --models), e.g. one
    adapter vs 32 adapters vs the merged model on the same server, in one run.
    """
    out = []
    for i, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        name, url = part.split("=", 1) if "=" in part.split("://", 1)[0] else (f"target{i}" if i else "target", part)
        url, _, models = url.partition("#")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"target {part!r}: URL must start with http:// (e.g. service=http://127.0.0.1:8000)")
        out.append((name, url.rstrip("/"), [m for m in models.split("+") if m] or None))
    if not out:
        raise ValueError("no --url given")
    return out


def run_load(
    targets: list[tuple[str, str, list[str] | None]],
    wl: Workload,
    *,
    concurrency: list[int] | None = None,
    rate_per_s: float | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 1.0,
    slo_ms: float | None = None,
    timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """Run every target at every level, one after another; one result dict per (target, level).

    A target's own model list replaces the workload's; texts and the seeded sequence stay
    the same, so targets are compared on identical inputs.
    """
    if (concurrency is None) == (rate_per_s is None):
        raise ValueError("give exactly one of --concurrency or --rate")
    runs = []
    for name, url, models in targets:
        twl = Workload(wl.texts, models, wl.adapter_dist, wl.seed, wl.api, wl.inputs_per_request) if models else wl
        common = {"target": name, "url": url, "models": twl.models}
        if concurrency is not None:
            for n in concurrency:
                samples, window_s, outside = asyncio.run(closed_loop(url, twl, n, duration_s, warmup_s, timeout_s))
                res = {**common, "mode": "closed", "concurrency": n, "completed_outside_window": outside}
                res.update(summarize(samples, window_s, slo_ms))
                runs.append(res)
                print(_line(res), flush=True)
        else:
            samples, window_s, dropped = asyncio.run(open_loop(url, twl, rate_per_s, duration_s, timeout_s, wl.seed))
            res = {
                **common,
                "mode": "open",
                "rate_rps": rate_per_s,
                "dropped_client_side": dropped,
                **summarize(samples, window_s, slo_ms),
            }
            runs.append(res)
            print(_line(res), flush=True)
    return runs


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's throughput and p99 relative to the first target at the same level."""
    if not runs:
        return []
    first = runs[0]["target"]
    ref = {(r.get("concurrency"), r.get("rate_rps")): r for r in runs if r["target"] == first}
    out = []
    for r in runs:
        base = ref.get((r.get("concurrency"), r.get("rate_rps")))
        if r["target"] == first or base is None or not base["throughput_rps"]:
            continue
        out.append(
            {
                "target": r["target"],
                "reference": first,
                "concurrency": r.get("concurrency"),
                "rate_rps": r.get("rate_rps"),
                "throughput_ratio": r["throughput_rps"] / base["throughput_rps"],
                "p99_ms": r["latency"]["p99_ms"],
                "reference_p50_ms": base["latency"]["p50_ms"],
            }
        )
    return out


def _line(r: dict[str, Any]) -> str:
    lat = r["latency"]
    level = f"c={r['concurrency']}" if r["mode"] == "closed" else f"rate={r['rate_rps']}/s"
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (
        f"[load] {r['target']:>12} {level:>10}: {r['ok']}/{r['requests']} ok, {r['throughput_rps']:.1f} req/s, "
        f"p50 {fmt(lat['p50_ms'])} p90 {fmt(lat['p90_ms'])} p99 {fmt(lat['p99_ms'])} ms, errors {r['errors_by_status'] or 0}"
        + (
            f" — no request completed inside the {r['window_s']:.0f} s window ({r['completed_outside_window']} outside it); "
            "raise --duration / --warmup"
            if r["requests"] == 0 and r.get("completed_outside_window")
            else ""
        )
    )
