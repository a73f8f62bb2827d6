"""Experiment `load`: HTTP load, closed loop (N concurrent requests) or Poisson open loop (rate R).

    python -m benchmarks load --url service=http://127.0.0.1:8000,baseline=http://127.0.0.1:8100 \
        --models full --concurrency 1,8,32 --duration 10 --out reports/results/load.json

Closed loop runs on `wrk` (benchmarks/wrk.py; a C client that is not the bottleneck), open loop
on the asyncio httpx client below (wrk cannot pace arrivals); every level records the client's
CPU share so a saturated client is visible. Several targets (`name=URL,...`) run one after
another with the same texts, model sequence and settings, so the service and the naive baseline
are compared side by side in one run. Latency is measured by the client (send -> full
response); in open loop from the scheduled arrival time, so a server that falls behind is
charged for the queueing it causes (no coordinated omission). A level where no request
succeeded is listed in the payload's `failed` (the run is then partial; no figure is shown).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from pydantic import Field, model_validator

from benchmarks.experiment import Settings, experiment
from benchmarks.paths import agnews_data
from benchmarks.stats import adapter_weights, latency_summary, poisson_arrivals
from benchmarks.wrk import process_tree_cpu_s, run_wrk
from models.hardware import usable_cores

MAX_INFLIGHT_OPEN_LOOP = 2048  # bound on outstanding requests when the server falls behind
WRK_SEQUENCE_LEN = 20_000  # distinct requests written for wrk; it cycles through them


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


def summarize(samples: list[Sample], window_s: float, slo_ms: float | None, dropped: int = 0) -> dict[str, Any]:
    """Throughput, latency percentiles (successful requests), goodput under the SLO, errors by status.

    `dropped`: open-loop arrivals the client never sent (too many outstanding): not in `requests` (sent),
    but failed requests for the SLO, since the schedule wanted them sent."""
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
        wanted = len(samples) + dropped
        out.update(slo_ms=slo_ms, goodput_rps=good / window_s, slo_attainment=good / wanted if wanted else None)
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


def _cpu_self_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _httpx_measured(coro_fn, server_pid: int | None):
    """Run one httpx-client level; returns (result of coro, client CPU share, server CPU share).

    The client's share is this whole process's CPU (a server run in a thread of the same process,
    as in some tests, is counted with it).
    """
    cores = usable_cores()
    srv0, cpu0, t0 = process_tree_cpu_s(server_pid), _cpu_self_s(), time.perf_counter()
    out = asyncio.run(coro_fn())
    wall_s = time.perf_counter() - t0
    srv1 = process_tree_cpu_s(server_pid)
    server_share = None if srv0 is None or srv1 is None else (srv1 - srv0) / wall_s / cores
    return out, (_cpu_self_s() - cpu0) / wall_s / cores, server_share


def _wrk_summary(w: dict[str, Any], slo_ms: float | None) -> dict[str, Any]:
    """A wrk run in summarize()'s shape (one result shape for both clients)."""
    window_s = max(w["window_s"], 1e-9)
    out: dict[str, Any] = {
        "requests": w["requests"],
        "ok": w["ok"],
        "errors": sum(w["errors_by_status"].values()),
        "errors_by_status": w["errors_by_status"],
        "window_s": w["window_s"],
        "throughput_rps": w["ok"] / window_s,
        "tokens_per_s": (w["tokens"] / window_s) if w["tokens"] else None,
        # wrk's histogram covers every completed request; equal to the successful ones' when errors == 0
        "latency": {k: w["latency_all"][k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")},
        "latency_includes_errors": bool(w["errors_by_status"]),
        "per_model_requests": w["per_model_sent"],
    }
    if slo_ms is not None:
        # within-SLO count from wrk's histogram (all statuses): exact when there are no errors, else an upper bound
        good = min(w["within_slo"] or 0, w["ok"])
        out.update(
            slo_ms=slo_ms, goodput_rps=good / window_s, slo_attainment=good / w["requests"] if w["requests"] else None
        )
    timing = {k: (w[k] and {m: w[k][m] for m in w[k] if m != "n"}) or latency_summary([]) for k in ("queue", "compute")}
    out["server_timing"] = timing if (w["queue"] or w["compute"]) else None
    return out


def run_level(
    url: str,
    wl: Workload,
    *,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 1.0,
    slo_ms: float | None = None,
    timeout_s: float = 30.0,
    client: str = "wrk",
    server_pid: int | None = None,
) -> dict[str, Any]:
    """One target at one level (closed loop: `concurrency`; open loop: `rate_per_s`), summarised.

    Closed loop runs on wrk (client='wrk', the default: not the bottleneck) or on the httpx
    client (client='httpx', kept to compare clients). Open loop always runs on the httpx client:
    wrk cannot pace Poisson arrivals, and a rate is set by the user, so a reader only needs to
    know whether the client kept up — the client's CPU share is printed beside the figures, and
    arrivals it could not send on time are charged to latency (measured from the schedule).
    """
    if concurrency is not None:
        res: dict[str, Any] = {"mode": "closed", "concurrency": concurrency, "client": client}
        if client == "wrk":
            seq = wl.stream(WRK_SEQUENCE_LEN)
            if warmup_s > 0:  # a separate, discarded run: wrk has no warm-up phase of its own
                run_wrk(url, seq, api=wl.api, connections=concurrency, duration_s=warmup_s, timeout_s=timeout_s)
            w = run_wrk(
                url,
                seq,
                api=wl.api,
                connections=concurrency,
                duration_s=duration_s,
                timeout_s=timeout_s,
                server_pid=server_pid,
                slo_ms=slo_ms,
            )
            res.update(_wrk_summary(w, slo_ms), completed_outside_window=0, wrk_threads=w["threads"])
            res.update(client_cpu_share=w["client_cpu_share"], server_cpu_share=w["server_cpu_share"])
        else:
            (samples, window_s, outside), cshare, sshare = _httpx_measured(
                lambda: closed_loop(url, wl, concurrency, duration_s, warmup_s, timeout_s), server_pid
            )
            res.update(completed_outside_window=outside, **summarize(samples, window_s, slo_ms))
            res.update(client_cpu_share=cshare, server_cpu_share=sshare)
        return res
    (samples, window_s, dropped), cshare, sshare = _httpx_measured(
        lambda: open_loop(url, wl, rate_per_s, duration_s, timeout_s, wl.seed), server_pid
    )
    res = {"mode": "open", "rate_rps": rate_per_s, "client": "httpx", "dropped_client_side": dropped}
    res.update(summarize(samples, window_s, slo_ms, dropped), client_cpu_share=cshare, server_cpu_share=sshare)
    return res


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
    client: str = "wrk",
    server_pid: int | None = None,
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
        levels = [{"concurrency": n} for n in concurrency] if concurrency is not None else [{"rate_per_s": rate_per_s}]
        for level in levels:
            res = {"target": name, "url": url, "models": twl.models}
            res.update(
                run_level(
                    url,
                    twl,
                    **level,
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    slo_ms=slo_ms,
                    timeout_s=timeout_s,
                    client=client,
                    server_pid=server_pid,
                )
            )
            if res["ok"] == 0:
                res["failure"] = _why_failed(url, twl, res)
            runs.append(res)
            print(_line(res), flush=True)
    return runs


def level_name(r: dict[str, Any]) -> str:
    return f"{r['target']}@c={r['concurrency']}" if r["mode"] == "closed" else f"{r['target']}@rate={r['rate_rps']}"


def failed_levels(runs: list[dict[str, Any]]) -> dict[str, str]:
    """{'target@c=N': why} for every level where no request succeeded (the report shows no figure)."""
    return {level_name(r): r["failure"] for r in runs if r["ok"] == 0}


def _why_failed(url: str, wl: Workload, res: dict[str, Any]) -> str:
    """'N requests answered 404: <the server's message>' — one probe request fetches the message."""
    errors = res["errors_by_status"]
    if not errors:
        return f"no request completed inside the {res['window_s']:.0f} s window; raise --duration / --timeout"
    status, n = max(errors.items(), key=lambda kv: kv[1])
    if status == "ConnectError":
        return f"could not connect to {url} ({n} attempts); is the server running there?"
    detail = ""
    if status.isdigit():
        model, inputs = wl.stream(1)[0]
        path, body = (
            (f"/models/{model}", {"inputs": inputs[0]})
            if wl.api == "hf"
            else ("/v1/classify", {"model": model, "inputs": inputs})
        )
        try:
            r = httpx.post(url + path, json=body, timeout=10)
            err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            # the service's {"error": {"message"}}, or the HF route's {"error": message} (service.errors.error_body)
            message = err.get("message") if isinstance(err, dict) else err
            detail = message if isinstance(message, str) and message else r.text[:300]
        except (httpx.HTTPError, ValueError):
            detail = ""
    return f"{n} requests answered {status}" + (f": {detail}" if detail else "")


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's throughput and p99 relative to the first target at the same level."""
    if not runs:
        return []
    first = runs[0]["target"]
    ref = {(r.get("concurrency"), r.get("rate_rps")): r for r in runs if r["target"] == first}
    out = []
    for r in runs:
        base = ref.get((r.get("concurrency"), r.get("rate_rps")))
        if r["target"] == first or base is None or not base["ok"] or not r["ok"]:
            continue  # a level without a successful request has no figure, so no ratio
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
    cpu = r.get("client_cpu_share")
    srv = r.get("server_cpu_share")
    level = f"c={r['concurrency']}" if r["mode"] == "closed" else f"rate={r['rate_rps']}/s"
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (
        f"[load] {r['target']:>12} {level:>10}: {r['ok']}/{r['requests']} ok, {r['throughput_rps']:.1f} req/s, "
        f"p50 {fmt(lat['p50_ms'])} p90 {fmt(lat['p90_ms'])} p99 {fmt(lat['p99_ms'])} ms, errors {r['errors_by_status'] or 0}"
        + (f", dropped by the client {r['dropped_client_side']}" if r.get("dropped_client_side") else "")
        + (f", client {r.get('client', '?')} CPU {cpu:.0%}" if cpu is not None else "")
        + (f", server CPU {srv:.0%}" if srv is not None else "")
        + (
            f" — no request completed inside the {r['window_s']:.0f} s window ({r['completed_outside_window']} outside it); "
            "raise --duration / --warmup"
            if r["requests"] == 0 and r.get("completed_outside_window")
            else ""
        )
    )


# ---- the experiment --------------------------------------------------------------------------
def agnews_test_texts(data: str) -> list[str]:
    """AG News test-split texts through the one AG News reader (benchmarks.common.load_split -> training's).

    Until 2026-11-29 this function unpacked the reader's DataFrame as if it
    were a (texts, labels) pair, so every load and ceiling run sent the four one-letter "texts" of the
    column name 'text'. A load figure is only meaningful on real texts."""
    from benchmarks.common import load_split

    texts, _ = load_split(data, "test")
    return texts


class LoadSettings(Settings):
    url: str = Field(
        description="URL, or name=URL,name2=URL2 to run several targets in one run; "
        "name=URL#m1+m2 gives a target its own models"
    )
    models: list[str] | None = Field(None, description="model names to request (a target's #m1+m2 overrides)")
    adapter_dist: str = Field("uniform", description="model popularity: uniform | zipf:S")
    concurrency: list[int] | None = Field(None, description="closed loop: concurrent requests per level, e.g. 1,8,32")
    rate: float | None = Field(None, gt=0, description="open loop: Poisson arrivals per second")
    duration: float = Field(10.0, gt=0, description="measured seconds per level (wrk: whole seconds, rounded up)")
    warmup: float = Field(1.0, ge=0, description="unmeasured seconds before each closed-loop level")
    slo_ms: float | None = Field(None, gt=0, description="latency SLO for goodput")
    data: str = Field(default_factory=agnews_data, description="AG News dir/file (texts come from the test split)")
    inputs_per_request: int = Field(1, gt=0, description="texts per request")
    api: Literal["v1", "hf"] = Field("v1", description="v1: POST /v1/classify; hf: POST /models/NAME")
    timeout: float = Field(30.0, gt=0, description="per-request timeout in s")
    seed: int = Field(0, description="seed of the request sequence (same across targets)")
    client: Literal["wrk", "httpx"] = Field(
        "wrk", description="closed-loop client: wrk (not the bottleneck) or the Python httpx client, to compare"
    )
    server_pid: int | None = Field(None, description="pid of the server, to record its CPU share (process tree)")

    @model_validator(mode="after")
    def _check(self) -> LoadSettings:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) or --rate (open loop)")
        if self.concurrency is not None and (not self.concurrency or min(self.concurrency) < 1):
            raise ValueError(f"--concurrency levels must be >= 1, got {self.concurrency}")
        adapter_weights(1, self.adapter_dist)  # raises with what to write
        targets = parse_targets(self.url)
        if self.models is None and any(models is None for _, _, models in targets):
            raise ValueError("give --models a,b or a model list per target (name=URL#m1+m2)")
        return self


def run(s: LoadSettings) -> dict[str, Any]:
    targets = parse_targets(s.url)
    wl = Workload(
        agnews_test_texts(s.data), s.models or targets[0][2], s.adapter_dist, s.seed, s.api, s.inputs_per_request
    )
    runs = run_load(
        targets,
        wl,
        concurrency=s.concurrency,
        rate_per_s=s.rate,
        duration_s=s.duration,
        warmup_s=s.warmup,
        slo_ms=s.slo_ms,
        timeout_s=s.timeout,
        client=s.client,
        server_pid=s.server_pid,
    )
    rel = ratios(runs)
    for r in rel:
        level = f"c={r['concurrency']}" if r["concurrency"] is not None else f"rate={r['rate_rps']}/s"
        print(f"[load] {r['target']} / {r['reference']} at {level}: throughput x{r['throughput_ratio']:.2f}")
    failed = failed_levels(runs)
    return {"runs": runs, "ratios": rel, **({"failed": failed} if failed else {})}


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    """Report section: one table per run (levels without a successful request show why, no figure),
    ratios to the first target, and throughput vs p99 over every closed-loop run."""
    from benchmarks.report import _plt, source_line, table

    parts = ["## Throughput and latency (HTTP load)"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for n, (f, doc) in enumerate(docs):
        s = doc.get("settings", {})
        parts.append(
            f"\n### Load run {n + 1} (`{f.stem}`): models drawn {s.get('adapter_dist', '')}, {s.get('duration')} s "
            f"measured per level after {s.get('warmup')} s warm-up; targets run one after another on the same texts\n"
        )
        rows, failed_rows = [], []
        for r in doc["runs"]:
            level = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate_rps']}/s"
            if not r["ok"]:
                failed_rows.append([r["target"], level, r.get("failure") or f"errors {r['errors_by_status']}"])
                continue
            lat, st = r["latency"], r.get("server_timing") or {}
            models = r.get("models") or s.get("models") or []
            cpu = r.get("client_cpu_share")
            rows.append(
                [
                    r["target"],
                    models[0] if len(models) == 1 else f"{len(models)} models",
                    level,
                    r["throughput_rps"],
                    r.get("tokens_per_s"),
                    lat["p50_ms"],
                    lat["p90_ms"],
                    lat["p99_ms"],
                    r.get("goodput_rps"),
                    str(r["errors_by_status"] or 0)
                    # open loop: arrivals the client never sent are failed requests too (not in the errors)
                    + (f"; {r['dropped_client_side']} dropped by the client" if "dropped_client_side" in r else ""),
                    (st.get("queue") or {}).get("p50_ms"),
                    (st.get("compute") or {}).get("p50_ms"),
                    f"{r.get('client', 'httpx')} {cpu:.0%}" if cpu is not None else r.get("client", "httpx"),
                ]
            )
        header = ["target", "models", "level", "req/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms", "goodput req/s"]
        header += ["errors", "server queue p50 ms", "server compute p50 ms", "client, CPU share"]
        parts.append(table(header, rows))
        if failed_rows:
            parts.append("\nNo figure (no request succeeded):\n")
            parts.append(table(["target", "level", "why"], failed_rows))
        if doc.get("ratios"):
            parts.append("\nRatios to the first target at the same level:\n")
            ratio_rows = [
                [
                    x["target"],
                    x["reference"],
                    f"c={x['concurrency']}" if x.get("concurrency") else f"{x['rate_rps']}/s",
                    f"{x['throughput_ratio']:.2f}",
                    x["p99_ms"],
                    x["reference_p50_ms"],
                ]
                for x in doc["ratios"]
            ]
            parts.append(table(["target", "vs", "level", "throughput ×", "p99 ms", "reference p50 ms"], ratio_rows))
        parts.append("\n" + source_line(f, doc, out_dir))
        by_target: dict[str, list[dict[str, Any]]] = {}
        for r in doc["runs"]:
            if r["mode"] == "closed" and r["ok"] and r["latency"]["p99_ms"] is not None:
                by_target.setdefault(r["target"], []).append(r)
        for target, rs in by_target.items():
            rs = sorted(rs, key=lambda r: r["concurrency"])
            label = target if len(docs) == 1 else f"run {n + 1}: {target}"
            ax.plot([r["throughput_rps"] for r in rs], [r["latency"]["p99_ms"] for r in rs], marker="o", label=label)
            for r in rs:
                xy = (r["throughput_rps"], r["latency"]["p99_ms"])
                ax.annotate(f"c={r['concurrency']}", xy, fontsize=7, textcoords="offset points", xytext=(3, 3))
            plotted = True
    if plotted:
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title("Throughput vs p99 latency (closed loop, labels: concurrent requests)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = fig_dir / "throughput_vs_p99.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        parts.insert(1, f"\n![throughput vs p99]({os.path.relpath(path, out_dir)})\n")
    plt.close(fig)
    return "\n".join(parts)


experiment(
    "load",
    LoadSettings,
    help="HTTP load (wrk closed loop, or Poisson open loop): several targets side by side, percentiles, server timing",
    render=render,
)(run)
