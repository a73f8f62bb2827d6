"""Hot-swap timing: replace (or unload + load) a LoRA adapter through the admin API while
background clients keep sending requests, and measure time to servable and failed requests.

Per swap: `PUT /v1/adapters/NAME` is sent at t0 and answered at t1. The server answers after the
new version has taken the name (verified, golden-checked, in the bank): every request that
arrives after t1 is served by it, so swap latency = t1 - t0 (the target's "PUT to servable").
A probe `POST /v1/classify` for NAME is then sent; PUT -> its answer ("first answer") is reported
beside it, together with the background requests' own latency: under a saturating load the probe
waits its turn like any request, which is request latency, not swap cost.

The background load runs on `wrk` (benchmarks/wrk.py) when it is installed: the client shares the
server's cores, and wrk's share in the MiniLM runs on the 2-core Xeon was 0.6 % (the Python client's
was not recorded). Without wrk the asyncio httpx client runs it (recorded as `background_load.client`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field

from benchmarks.common import load_split
from benchmarks.experiment import Settings, experiment
from benchmarks.loadgen import Sample, Workload, _send, summarize
from benchmarks.paths import agnews_data
from benchmarks.stats import latency_summary
from benchmarks.wrk import run_wrk

PAUSE_BETWEEN_SWAPS_S = 0.2
LEAD_S = 0.5  # background load running before the first swap
WRK_S_PER_SWAP = 1.0  # wrk runs for a fixed time: enough for every swap at this pace (checked after)


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
    client: str = "auto",
) -> dict[str, Any]:
    """Run `swaps` swaps of `adapter` under closed-loop load of `concurrency` clients on `load_models`.

    mode 'replace': PUT over the loaded adapter (the old version serves until the new one is
    verified). mode 'reload': DELETE then PUT; the background load then excludes `adapter`,
    since requests for an unloaded model are expected to fail with 404.
    client: 'wrk', 'python', or 'auto' (wrk when installed).
    """
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if mode == "reload":
        load_models = [m for m in load_models if m != adapter] or load_models
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk") is not None)
    seq = Workload(texts, load_models, seed=1).stream(20_000)
    wl = Workload(texts, [adapter])  # the v1 API, for probes (and the Python client)
    stop = asyncio.Event()
    samples: list[Sample] = []
    swap_rows: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency + 2)) as http,
        httpx.AsyncClient(timeout=timeout_s, headers=headers) as admin,
    ):
        t_start = time.perf_counter()
        if use_wrk:
            duration_s = LEAD_S + swaps * WRK_S_PER_SWAP + 1
            background = asyncio.create_task(
                asyncio.to_thread(
                    run_wrk, url, seq, connections=concurrency, duration_s=duration_s, timeout_s=timeout_s
                )
            )
        else:
            counter = iter(range(10**9))

            async def worker() -> None:
                while not stop.is_set():
                    model, inputs = seq[next(counter) % len(seq)]
                    t = time.perf_counter()
                    sample = await _send(http, url, wl, model, inputs)
                    sample.start_s = t - t_start
                    samples.append(sample)

            background = asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.sleep(LEAD_S)
        for _ in range(swaps):
            if mode == "reload":
                r = await admin.delete(f"{url}/v1/adapters/{adapter}")
                if r.status_code != 200:
                    raise RuntimeError(f"DELETE /v1/adapters/{adapter} answered {r.status_code}: {r.text[:300]}")
            t0 = time.perf_counter()
            r = await admin.put(f"{url}/v1/adapters/{adapter}")
            t_put = time.perf_counter()
            row: dict[str, Any] = {"put_status": r.status_code, "put_ms": (t_put - t0) * 1000, "at_s": t0 - t_start}
            if r.status_code == 200:
                body = r.json()
                row.update(op=body.get("status"), server_load_ms=body.get("load_ms"))
                probe = await _send(http, url, wl, adapter, [texts[0]])
                row["probe_status"] = probe.status
                row["first_answer_ms"] = (time.perf_counter() - t0) * 1000 if probe.status == "200" else None
            else:
                row["error"] = r.text[:300]
            swap_rows.append(row)
            await asyncio.sleep(PAUSE_BETWEEN_SWAPS_S)
        swaps_end_s = time.perf_counter() - t_start
        if use_wrk:
            bg = await background
            bg["latency"] = bg.pop("latency_all")
            bg["errors"] = sum(bg["errors_by_status"].values())
            bg["per_model_requests"] = bg.pop("per_model_sent")
            under_load = bg["window_s"] >= swaps_end_s  # wrk's window covered every swap
        else:
            await asyncio.sleep(0.3)
            stop.set()
            await background
            bg = {"client": "python (httpx)", **summarize(samples, time.perf_counter() - t_start, None)}
            under_load = True
    ok_rows = [r for r in swap_rows if r.get("first_answer_ms") is not None]
    failed_swaps = len(swap_rows) - len(ok_rows)
    out = {
        "adapter": adapter,
        "mode": mode,
        "swaps": swaps,
        "failed_swaps": failed_swaps,
        "swap_latency": latency_summary([r["put_ms"] for r in ok_rows]),
        "first_answer_latency": latency_summary([r["first_answer_ms"] for r in ok_rows]),
        "swap_rows": swap_rows,
        "background_load": bg,
        "every_swap_under_load": under_load,
        "failed_requests": bg["errors"],
        "failed_by_status": bg["errors_by_status"],
        "ops": dict(Counter(r.get("op") for r in swap_rows)),
    }
    p50 = out["swap_latency"]["p50_ms"]
    out["target"] = {
        "p50_ms_max": target_p50_ms,
        "failed_requests_max": 0,
        "passed": p50 is not None
        and p50 <= target_p50_ms
        and out["failed_requests"] == 0
        and failed_swaps == 0
        and under_load,
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
    client: str = Field(
        "auto", pattern="^(auto|wrk|python)$", description="background load client (auto: wrk if installed)"
    )


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
                client=s.client,
            )
        )
        lat, first, bg = res["swap_latency"], res["first_answer_latency"], res["background_load"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(
            f"[hotswap] {mode}: {s.swaps} swaps of {s.adapter}, to-servable p50 {fmt(lat['p50_ms'])} ms "
            f"max {fmt(lat['max_ms'])} ms (first answer p50 {fmt(first['p50_ms'])} ms); background "
            f"({bg['client']}) {bg['requests']} requests, p50 {fmt(bg['latency']['p50_ms'])} ms, "
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
