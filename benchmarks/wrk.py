"""A load client that is not the bottleneck: `wrk` (C, epoll) driven by benchmarks/wrk_load.lua.

Why not the Python client: on a 2-core machine the httpx client (loadgen.closed_loop) saturates
near 60 req/s at c=64 by itself while wrk drives the same server at several hundred; every
figure measured with it was a client figure. Python still decides *what* is sent: the seeded
request sequence (model by popularity, AG News texts, v1 or hf API) of loadgen.Workload is
written to a file, and the Lua script cycles through it, so wrk and the Python client send the
same requests. Closed loop only: wrk keeps `connections` requests in flight (concurrency =
connections, threads = min(2, c)); it cannot pace Poisson arrivals (loadgen's open loop does).

Every run reports the client's CPU share (wrk's CPU seconds / wall / cores, from the child's
rusage) and, given the server's pid, the server's (its process tree, from /proc via psutil), so
a reader can see which side was saturated.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from models.hardware import usable_cores

LUA_SCRIPT = Path(__file__).with_name("wrk_load.lua")
MARK = "WRKJSON "
SOCKET_ERROR_NAMES = {"connect": "ConnectError", "read": "ReadError", "write": "WriteError", "timeout": "timeout"}


def wrk_binary() -> str:
    """Path of `wrk`, or a clear error saying how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk not found on PATH; install it (Debian/Ubuntu: apt-get install wrk) — see make setup")
    return path


def request_lines(seq: Sequence[tuple[str, list[str]]], api: str) -> list[str]:
    """'PATH<TAB>BODY' lines of a (model, inputs) sequence, in the service's v1 or HF API."""
    out = []
    for model, inputs in seq:
        if api == "hf":
            path, body = f"/models/{model}", {"inputs": inputs if len(inputs) > 1 else inputs[0]}
        else:
            path, body = "/v1/classify", {"model": model, "inputs": inputs}
        out.append(path + "\t" + orjson.dumps(body).decode())  # orjson escapes newlines: one request per line
    return out


def process_tree_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of `pid` and its descendants (engine / front-end processes)."""
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(
    url: str,
    seq: Sequence[tuple[str, list[str]]],
    *,
    api: str = "v1",
    connections: int,
    duration_s: float,
    timeout_s: float = 30.0,
    server_pid: int | None = None,
    slo_ms: float | None = None,
) -> dict[str, Any]:
    """One closed-loop wrk run of `connections` concurrent requests for ~duration_s (whole seconds).

    Returns requests/ok counts, errors by status (HTTP status or socket error), wrk's latency
    percentiles, the server's compute/queue percentiles read from the bodies, tokens, the
    measured window, the requests sent per model, and the client's / server's CPU share.
    """
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    # wrk opens connections // threads per thread: two threads only where that keeps every connection
    threads = 2 if connections % 2 == 0 else 1
    duration_whole_s = max(1, math.ceil(duration_s))  # wrk takes whole seconds only
    cores = usable_cores()
    parts = urlsplit(url)
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        bodies = Path(tmp) / "requests.tsv"
        lines = request_lines(seq, api)
        bodies.write_text("\n".join(lines) + "\n")
        cmd = [
            wrk_binary(),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration_whole_s}s",
            f"--timeout={max(1, math.ceil(timeout_s))}s",
            "--latency",
            "-s",
            str(LUA_SCRIPT),
            f"{parts.scheme}://{parts.netloc}/",
        ]
        env = {
            **os.environ,
            "WRK_BODIES": str(bodies),
            "WRK_THREADS": str(threads),
            "WRK_CONNECTIONS": str(connections),  # wrk_load.lua undoes wrk's latency correction with it
            **({"WRK_SLO_US": str(int(slo_ms * 1000))} if slo_ms is not None else {}),
        }
        server_cpu0 = process_tree_cpu_s(server_pid)
        cpu0, t0 = _children_cpu_s(), time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_whole_s + timeout_s + 30)
        wall_s = time.perf_counter() - t0
        client_cpu_s = _children_cpu_s() - cpu0
        server_cpu1 = process_tree_cpu_s(server_pid)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
    if proc.returncode != 0 and "unable to connect" in proc.stdout + proc.stderr:
        # wrk gives up before its first request when nothing listens: a run with only connect errors
        return _nothing_answered(connections, threads, wall_s, client_cpu_s, cores)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}{proc.stdout[-2000:]}"
        )
    raw = json.loads(line[len(MARK) :])
    statuses = {k: int(v) for k, v in raw["statuses"].items()}
    # wrk's "timeout" errors are responses that arrived after --timeout (response_complete: stats_record
    # refuses the latency), and every one of them also reached the script's response(), so it is in
    # `statuses` too. Such a request failed for the client, as a timed-out httpx request does: it is a
    # timeout, not a success, and one request, not two. wrk does not say its status: it is taken out of
    # the 200s (ok is then a lower bound where some late answers were errors).
    late = raw["socket_errors"]["timeout"]
    ok = max(0, statuses.get("200", 0) - late)
    errors = Counter({k: v for k, v in statuses.items() if k != "200"})
    for key, name in SOCKET_ERROR_NAMES.items():
        if raw["socket_errors"][key]:
            errors[name] += raw["socket_errors"][key]
    per_model: Counter[str] = Counter()
    for k, sent in enumerate(raw["sent_by_thread"]):  # thread k sent lines k, k+T, k+2T, ... (wrapping)
        for i in range(sent):
            per_model[seq[(k + i * threads) % len(seq)][0]] += 1
    window_s = raw["duration_s"]
    server_cpu_s = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    return {
        "client": "wrk",
        "threads": threads,
        "window_s": window_s,
        # a read or write error is a request that got no answer (the connection broke under it): counted, as
        # the httpx client counts its ReadError / WriteError samples, so requests = ok + errors
        "requests": sum(statuses.values()) + sum(raw["socket_errors"][k] for k in ("connect", "read", "write")),
        "ok": ok,
        "errors_by_status": dict(sorted(errors.items())),
        "latency_all": raw["latency"],
        "compute": raw["compute"],
        "queue": raw["queue"],
        "tokens": raw["tokens"],
        "within_slo": raw["within_slo"],
        "per_model_sent": dict(sorted(per_model.items())),
        "client_cpu_s": client_cpu_s,
        "client_cpu_share": client_cpu_s / wall_s / cores,
        "server_cpu_share": None if server_cpu_s is None else server_cpu_s / wall_s / cores,
        "cores": cores,
    }


def _nothing_answered(connections: int, threads: int, wall_s: float, client_cpu_s: float, cores: int) -> dict[str, Any]:
    empty = {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {
        "client": "wrk",
        "threads": threads,
        "window_s": wall_s,
        "requests": connections,
        "ok": 0,
        "errors_by_status": {"ConnectError": connections},
        "latency_all": empty,
        "compute": None,
        "queue": None,
        "tokens": 0,
        "within_slo": 0,
        "per_model_sent": {},
        "client_cpu_s": client_cpu_s,
        "client_cpu_share": client_cpu_s / wall_s / cores,
        "server_cpu_share": None,
        "cores": cores,
    }
