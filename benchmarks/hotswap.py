"""Hot-swap timing: replace (or unload + load) a LoRA adapter through the admin API while
background clients keep sending requests, and measure time to servable and failed requests.

Per swap: `PUT /v1/adapters/NAME` is sent at t0; the adapter is servable at t1, when the PUT
has returned and a first `POST /v1/classify` for NAME has answered 200. swap latency = t1 - t0.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from benchmarks.common import load_split, write_results
from benchmarks.loadgen import Workload, _send, summarize
from benchmarks.stats import latency_summary

PAUSE_BETWEEN_SWAPS_S = 0.2


async def hotswap(
    url: str,
    adapter: str,
    swaps: int,
    load_models: list[str],
    texts: list[str],
    concurrency: int = 4,
    mode: str = "replace",
    api_key: str | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Run `swaps` swaps of `adapter` under closed-loop load of `concurrency` clients on `load_models`.

    mode 'replace': PUT over the loaded adapter (the old version serves until the new one is
    verified). mode 'reload': DELETE then PUT; the background load then excludes `adapter`,
    since requests for an unloaded model are expected to fail with 404.
    """
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if mode == "reload":
        load_models = [m for m in load_models if m != adapter] or load_models
    wl = Workload(texts, load_models, seed=1)
    seq = wl.stream(20_000)
    samples = []
    stop = asyncio.Event()
    swap_rows: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency + 2)) as client,
        httpx.AsyncClient(timeout=timeout_s, headers=headers) as admin,
    ):
        t_start = time.perf_counter()
        counter = iter(range(10**9))

        async def worker() -> None:
            while not stop.is_set():
                model, inputs = seq[next(counter) % len(seq)]
                t = time.perf_counter()
                s = await _send(client, url, wl, model, inputs)
                s.start_s = t - t_start
                samples.append(s)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(0.5)  # load running before the first swap
        for _ in range(swaps):
            if mode == "reload":
                r = await admin.delete(f"{url}/v1/adapters/{adapter}")
                if r.status_code != 200:
                    raise RuntimeError(f"DELETE /v1/adapters/{adapter} answered {r.status_code}: {r.text[:300]}")
            t0 = time.perf_counter()
            r = await admin.put(f"{url}/v1/adapters/{adapter}")
            t_put = time.perf_counter()
            row: dict[str, Any] = {"put_status": r.status_code, "put_ms": (t_put - t0) * 1000}
            if r.status_code == 200:
                body = r.json()
                row.update(op=body.get("status"), server_load_ms=body.get("load_ms"))
                probe = await _send(client, url, wl, adapter, [texts[0]])
                row["probe_status"] = probe.status
                row["servable_ms"] = (time.perf_counter() - t0) * 1000 if probe.status == "200" else None
            else:
                row["error"] = r.text[:300]
            swap_rows.append(row)
            await asyncio.sleep(PAUSE_BETWEEN_SWAPS_S)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        window_s = time.perf_counter() - t_start
    servable = [r["servable_ms"] for r in swap_rows if r.get("servable_ms") is not None]
    background = summarize(samples, window_s, None)
    failed_swaps = sum(1 for r in swap_rows if r.get("servable_ms") is None)
    out = {
        "adapter": adapter,
        "mode": mode,
        "swaps": swaps,
        "failed_swaps": failed_swaps,
        "swap_latency": latency_summary(servable),
        "put_latency": latency_summary([r["put_ms"] for r in swap_rows]),
        "swap_rows": swap_rows,
        "background_load": background,
        "failed_requests": background["errors"],
        "failed_by_status": background["errors_by_status"],
        "ops": dict(Counter(r.get("op") for r in swap_rows)),
    }
    p50 = out["swap_latency"]["p50_ms"]
    out["target"] = {
        "p50_ms_max": 100.0,
        "failed_requests_max": 0,
        "passed": p50 is not None and p50 <= 100.0 and out["failed_requests"] == 0 and failed_swaps == 0,
    }
    return out


def run_hotswap(args: argparse.Namespace, argv: list[str]) -> int:
    """`python -m benchmarks hotswap`: both modes (replace in place, unload + load), one results JSON."""
    texts, _ = load_split(args.data)
    load_models = args.load_models or [args.adapter]
    results = []
    for mode in ("replace", "reload"):
        res = asyncio.run(
            hotswap(args.url, args.adapter, args.swaps, load_models, texts, args.concurrency, mode, args.api_key)
        )
        lat = res["swap_latency"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(
            f"[hotswap] {mode}: {args.swaps} swaps of {args.adapter}, to-servable p50 {fmt(lat['p50_ms'])} ms "
            f"max {fmt(lat['max_ms'])} ms; background {res['background_load']['requests']} requests, "
            f"{res['failed_requests']} failed {res['failed_by_status'] or ''}; target {'met' if res['target']['passed'] else 'MISSED'}",
            flush=True,
        )
        results.append(res)
    settings = {
        "url": args.url,
        "adapter": args.adapter,
        "swaps": args.swaps,
        "load_models": load_models,
        "concurrency": args.concurrency,
    }
    write_results(args.out, "hotswap", {"settings": settings, "runs": results}, argv)
    return 0 if all(r["failed_swaps"] == 0 for r in results) else 1
