"""Hot-swap timing: replace (or unload + load) a LoRA adapter through the admin API while
background clients keep sending requests, and measure time to servable and failed requests.

Per swap: `PUT /v1/adapters/NAME` is sent at t0; the adapter is servable at t1, when the PUT
has returned and a first `POST /v1/classify` for NAME has answered 200. swap latency = t1 - t0.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field

from benchmarks.common import load_split
from benchmarks.experiment import Settings, experiment
from benchmarks.loadgen import Workload, _send, summarize
from benchmarks.paths import agnews_data
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
    target_p50_ms: float = 50.0,
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
        "p50_ms_max": target_p50_ms,
        "failed_requests_max": 0,
        "passed": p50 is not None and p50 <= target_p50_ms and out["failed_requests"] == 0 and failed_swaps == 0,
    }
    return out


class HotswapSettings(Settings):
    url: str = Field(description="service URL, e.g. http://127.0.0.1:8000")
    adapter: str = Field(description="adapter to replace / unload + reload repeatedly")
    swaps: int = Field(10, gt=0, description="swaps per mode")
    load_models: list[str] | None = Field(
        None, description="models the background load requests (default: the adapter)"
    )
    concurrency: int = Field(4, gt=0, description="background load clients")
    data: str = Field(default_factory=agnews_data, description="AG News dir/file (texts of the background load)")
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get("SERVICE_API_KEY"), description="admin key (env SERVICE_API_KEY)"
    )
    target_p50_ms: float = Field(50.0, gt=0, description="target: PUT-to-servable p50 under load")


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    from benchmarks.report import hotswap_section

    return hotswap_section(docs, fig_dir, out_dir)[0]


@experiment(
    "hotswap", HotswapSettings, help="time from PUT /v1/adapters/NAME to servable, under background load", render=render
)
def run(s: HotswapSettings) -> dict[str, Any]:
    """Both modes (replace in place, unload + load); a swap that never became servable fails the run."""
    texts, _ = load_split(s.data)
    load_models = s.load_models or [s.adapter]
    results = []
    for mode in ("replace", "reload"):
        res = asyncio.run(
            hotswap(
                s.url,
                s.adapter,
                s.swaps,
                load_models,
                texts,
                s.concurrency,
                mode,
                s.api_key,
                target_p50_ms=s.target_p50_ms,
            )
        )
        lat = res["swap_latency"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(
            f"[hotswap] {mode}: {s.swaps} swaps of {s.adapter}, to-servable p50 {fmt(lat['p50_ms'])} ms "
            f"max {fmt(lat['max_ms'])} ms; background {res['background_load']['requests']} requests, "
            f"{res['failed_requests']} failed {res['failed_by_status'] or ''}; target {'met' if res['target']['passed'] else 'MISSED'}",
            flush=True,
        )
        results.append(res)
    failed = {
        f"{r['mode']}": f"{r['failed_swaps']} of {r['swaps']} swaps never became servable"
        for r in results
        if r["failed_swaps"]
    }
    return {"runs": results, "load_models": load_models, **({"failed": failed} if failed else {})}
