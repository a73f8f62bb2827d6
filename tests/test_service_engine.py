"""The engine process apart from HTTP: crash -> 503 + Retry-After -> restart; several front-ends
over one engine with hot-swaps under load; --precision auto from the hardware probe."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import Server, assert_no_torn_answers, free_port, golden_probs, running, write_lora
from tiny import GOLDEN_TEXTS, LABELS, make_store

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def _metric(url: str, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_engine_killed_gives_503_then_recovers(tmp_path):
    store = make_store(tmp_path / "store", arch="bert", n_adapters=2, full=False)
    with running(store.root) as srv, ThreadPoolExecutor(1) as pool:
        before = srv.probs("lora-1", GOLDEN_TEXTS)
        pid = srv.app.state.supervisor.pid
        # a request in flight when the engine dies: stop the engine, send, then kill it
        os.kill(pid, signal.SIGSTOP)
        in_flight = pool.submit(srv.classify, "lora-1", "caught in the crash")
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        r = in_flight.result(timeout=10)
        assert time.monotonic() - t0 < 5  # failed at once, not at the request timeout
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["type"] == "unavailable" and "engine process" in r.json()["error"]["message"]
        # while the supervisor restarts it: 503 for inference and readiness, never a hang or a 500
        codes = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            r = srv.classify("lora-1", GOLDEN_TEXTS)
            codes.add(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            time.sleep(0.05)
        assert 503 in codes and r.status_code == 200
        np.testing.assert_allclose(srv.probs("lora-1", GOLDEN_TEXTS), before, atol=TOL)
        assert srv.client.get("/readyz").status_code == 200
        assert srv.app.state.supervisor.pid != pid and srv.app.state.supervisor.restarts == 1
        assert _metric(srv.url, "service_engine_disconnects_total") == 1
        assert _metric(srv.url, "service_engine_up") == 1


def _engine_children(pid: int) -> list[int]:
    """Ids of the engine processes among `pid`'s children; psutil copes with threads and processes that exit meanwhile."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "service.engine" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:  # exited between listing and reading: nothing to kill
            continue
    return found


def test_engine_that_keeps_crashing_makes_the_service_exit_nonzero(tmp_path):
    """Kill every engine the supervisor starts: after MAX_CRASHES it gives up and the service exits 1."""
    from service.supervisor import MAX_CRASHES

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    proc = _serve(store.root, free_port(), frontends=1)
    killed: set[int] = set()
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in _engine_children(proc.pid):
                if pid not in killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.05)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert rc == 1 and len(killed) == MAX_CRASHES, log[-3000:]
    assert "giving up" in log


def test_an_engine_that_dies_at_every_startup_is_given_up_however_slow_its_startup(tmp_path, monkeypatch):
    """Engines that die before they are ready, each later than CRASH_WINDOW_S / MAX_CRASHES after it started
    (a real model's startup can take that long): the 60 s window never held MAX_CRASHES of them, so the
    supervisor restarted the engine forever. Here the window is shortened instead of the startups lengthened."""
    from service import supervisor as sup
    from service.config import ServiceConfig

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    monkeypatch.setattr(sup, "CRASH_WINDOW_S", 2.0)  # crashes ~1 s + back-off apart: never 5 within 2 s
    gave_up = threading.Event()
    s = sup.EngineSupervisor(
        ServiceConfig(store=store.root, threads=1, precision="fp32"), on_give_up=gave_up.set
    ).start()
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not gave_up.is_set() and time.monotonic() < deadline:
            proc = s.proc
            if proc.pid not in killed:
                time.sleep(1.0)  # dies while it starts (imports, loads), before it is ready
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                killed.add(proc.pid)
            time.sleep(0.05)
        assert gave_up.is_set() and s.failed, f"still restarting after {len(killed)} engines died at startup"
        assert len(killed) == sup.MAX_CRASHES
    finally:
        s.stop(drain_timeout_s=5)


def test_an_engine_that_was_ready_starts_the_count_of_startup_crashes_again(tmp_path, monkeypatch):
    """A crash of an engine that had become ready is not a crash at startup: the supervisor restarts it."""
    from service import supervisor as sup
    from service.config import ServiceConfig

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    monkeypatch.setattr(sup, "MAX_CRASHES", 2)
    monkeypatch.setattr(sup, "CRASH_WINDOW_S", 0.01)
    gave_up = threading.Event()
    s = sup.EngineSupervisor(ServiceConfig(store=store.root, threads=1, precision="fp32"), on_give_up=gave_up.set)
    try:
        with running(store.root, engine_address=s.start().address) as srv:
            for _ in range(2):  # two crashes in a row, each after the engine was ready: restarted both times
                pid = s.pid
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 60
                while (s.pid == pid or srv.client.get("/readyz").status_code != 200) and time.monotonic() < deadline:
                    assert not gave_up.is_set(), "gave up on an engine that had been ready"
                    time.sleep(0.05)
                assert s.pid != pid and srv.client.get("/readyz").status_code == 200
    finally:
        s.stop(drain_timeout_s=5)


def _serve(store: Path, port: int, frontends: int, session: bool = False, **env: str) -> subprocess.Popen:
    """`python -m service` (fp32, 1 thread); `session`: in a process group of its own, as a shell job."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--store",
            str(store),
            "--port",
            str(port),
            "--frontends",
            str(frontends),
            "--precision",
            "fp32",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "SERVICE_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=session,
    )


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("service not ready")


def test_an_engine_whose_service_died_while_it_started_exits(tmp_path):
    """`python -m service` killed (OOM, kill -9) while its engine still imports: the engine, in a session of its
    own, took init for its parent and never noticed the loss; it loaded its models and ran on, orphaned."""
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    proc = _serve(store.root, free_port(), frontends=1, SERVICE_REQUEST_TIMEOUT_S="2")
    engine = None
    try:
        deadline = time.monotonic() + 60
        while engine is None and time.monotonic() < deadline:
            engine = next(iter(_engine_children(proc.pid)), None)
            time.sleep(0.02)
        assert engine is not None, "no engine started"
        proc.kill()
        proc.wait()
        engine = psutil.Process(engine)
        with contextlib.suppress(psutil.TimeoutExpired):
            engine.wait(timeout=60)
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, "the engine outlived its service"
    finally:
        if proc.poll() is None:
            proc.kill()
        if engine is not None and engine.is_running():
            engine.kill()


def test_engine_up_recovers_after_a_frontend_died_while_the_engine_was_down(tmp_path):
    """--frontends 2: service_engine_up is the minimum over front-ends. A worker that died while the engine was
    down left its 0 in the multi-process files (uvicorn restarts it under a new pid), so the metric said
    'engine down' for good while the service served again."""
    store = make_store(tmp_path / "store", n_adapters=1, full=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(store.root, port, frontends=2)
    try:
        _wait_ready(url, proc)
        workers = [k for k in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(k.cmdline())]
        assert len(workers) == 2 and _metric(url, "service_engine_up") == 1
        os.kill(_engine_children(proc.pid)[0], signal.SIGKILL)  # the engine crashes ...
        time.sleep(0.2)
        workers[-1].kill()  # ... and a front-end worker dies meanwhile (OOM, segfault)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError):
                if httpx.get(f"{url}/readyz").status_code == 200 and _metric(url, "service_engine_up") == 1:
                    break
            time.sleep(0.2)
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert _metric(url, "service_engine_up") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_frontend_workers_exit_when_the_service_is_killed(tmp_path):
    """--frontends 2 and `python -m service` SIGKILLed (OOM killer): its engine exits (it polls its parent), and
    so must uvicorn's worker processes, which held the port answering 503 for good (a restart: address in use)."""
    store = make_store(tmp_path / "store", n_adapters=1, full=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(store.root, port, frontends=2)
    workers: list[psutil.Process] = []
    try:
        _wait_ready(url, proc)
        workers = [k for k in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(k.cmdline())]
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"front-end workers {[p.pid for p in alive]} outlived the service"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()


def test_ctrl_c_lets_a_request_in_flight_finish_on_the_one_engine(tmp_path):
    """Ctrl-C in a terminal signals the service's whole process group. The engine runs in a session of its
    own, so it is stopped by the service after uvicorn's in-flight requests, not ahead of them: a request
    whose body is still arriving gets its answer, and no engine is restarted as if it had crashed."""
    import json
    import socket

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    port = free_port()
    proc = _serve(store.root, port, frontends=1, session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        body = json.dumps({"model": "lora-0", "inputs": "in flight at Ctrl-C"}).encode()
        head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            c.sendall(head.encode() + body[:10])
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            time.sleep(1.5)  # was: the engine drained and exited meanwhile; the request got 503
            c.sendall(body[10:])
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
                if answer.endswith(b"}"):
                    break
        assert answer.startswith(b"HTTP/1.1 200"), answer[-300:]
        assert proc.wait(timeout=60) in (0, -signal.SIGINT)
        log = proc.stdout.read()
        assert "exited with status" not in log and "Traceback" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _startup_failure(srv) -> str:
    """/readyz's message once the engine's startup has failed (503, 'startup failed')."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if "startup failed" in (ready := srv.client.get("/readyz")).text:
                break
        time.sleep(0.1)
    assert ready.status_code == 503 and "startup failed" in ready.text, ready.text
    return ready.json()["error"]["message"]


@pytest.mark.parametrize("wrong", ["store path", "base prefix"])
def test_a_store_or_base_that_is_not_there_fails_startup_saying_so(tmp_path, wrong):
    """A mistyped --store or --base served nothing and said ready (the log: 'no LoRA variants'); every
    adapter was then refused with 'start the server with --base set to its base'."""
    from service_helpers import Server

    store = make_store(tmp_path / "store", n_adapters=1, full=False)
    fingerprint = store.manifest("lora-0").base_fingerprint
    srv = Server(tmp_path / "stroe") if wrong == "store path" else Server(store.root, base="deadbeef")
    srv.thread.start()
    try:
        message = _startup_failure(srv)
    finally:
        srv.stop()
    if wrong == "store path":
        assert "is not a directory; give --store the store training wrote" in message
    else:
        assert f"--base deadbeef matches no LoRA variant's base; the store's LoRA bases: {fingerprint[:12]}" in message


def test_device_cuda_without_cuda_exits_at_once_saying_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "service", "--store", str(tmp_path), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--device cuda, but torch" in r.stderr and "use --device cpu" in r.stderr
    assert time.monotonic() - t0 < 60 and "Traceback" not in r.stderr  # was: 5 engine crashes, then exit 1


def test_admin_calls_after_a_failed_engine_startup_answer_503_at_once(tmp_path):
    """The engine's startup failed (here its LoRA base snapshot is missing): /readyz says why, and a
    PUT or DELETE /v1/adapters gets 503 naming it at once (was: queued for the batcher thread that had
    exited, and answered by the front-end's 600 s admin timeout)."""
    import shutil

    from service_helpers import Server

    store = make_store(tmp_path / "store", n_adapters=1, full=False)
    shutil.rmtree(store.base_path(store.manifest("lora-0").base_fingerprint))
    srv = Server(store.root)
    srv.thread.start()
    try:
        _startup_failure(srv)
        for call in (srv.admin.put, srv.admin.delete):
            r = call("/v1/adapters/lora-0", timeout=15)
            assert r.status_code == 503 and "startup failed" in r.json()["error"]["message"], r.text
    finally:
        srv.stop()


@pytest.mark.parametrize("labels", [list("abcde"), list("wxyz")], ids=["more labels", "renamed labels"])
def test_a_frontend_that_cached_a_replaced_variant_names_the_new_versions_labels(tmp_path, labels):
    """Front-end B cached `full`; a replacement through front-end A brings other label names (or more of
    them). B's next answer carries the new version's names, which come with the logits from the engine
    (was: B's cached names: a 500 (IndexError) for more labels, wrong names for renamed ones)."""
    from service_helpers import Server
    from tiny import MAX_LENGTH, tiny_classifier, tokenizer

    from models.writing import write_variant

    store = make_store(tmp_path / "store", n_adapters=1, full=True)
    with running(store.root) as a:
        b = Server(store.root, engine_address=a.app.state.supervisor.address).start()
        try:
            assert b.classify("full", "x").status_code == 200  # b caches the variant's state
            m = store.manifest("full")
            write_variant(
                store,
                name="full",
                kind="full",
                model=tiny_classifier("bert", seed=11, num_labels=len(labels)),
                tokenizer=tokenizer(),
                labels=labels,
                max_length=MAX_LENGTH,
                base_model=m.base_model,
                base_fingerprint=m.base_fingerprint,
                init="random",
                golden_texts=GOLDEN_TEXTS,
                overwrite=True,
            )
            assert a.admin.put("/v1/adapters/full").json()["status"] == "replaced"
            for path, body in (("/v1/classify", {"model": "full", "inputs": "x"}), ("/models/full", {"inputs": "x"})):
                r = b.client.post(path, json=body)
                assert r.status_code == 200, r.text
                preds = r.json()["predictions"][0] if path == "/v1/classify" else r.json()[0]
                assert {p["label"] for p in preds} == set(labels), r.json()
        finally:
            b.stop()


def test_the_engine_client_forgets_cancelled_calls_and_recovers_from_a_failed_refresh(tmp_path):
    """service.client.EngineClient against a real engine: a call cancelled before its reply (the engine may
    drop its job at the deadline and never answer) leaves nothing pending; with no state version cached (a
    background refresh failed) the next reply refreshes the cache (was: never again, until a cache miss)."""
    import asyncio

    from service.client import EngineClient
    from service.metrics import FrontendMetrics

    store = make_store(tmp_path / "store", arch="bert", n_adapters=2, full=False)

    async def scenario(srv) -> None:
        client = EngineClient(srv.app.state.supervisor.address, FrontendMetrics())
        await client.start()
        try:
            while not client.state.get("ready"):
                await asyncio.sleep(0.05)
            entry = await client.entry("lora-0")
            call = asyncio.create_task(client.infer("lora-0", entry, GOLDEN_TEXTS * 4, timeout_s=30))
            await asyncio.sleep(0)  # sent
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            assert client._pending == {}  # was: the cancelled call's future, kept until a reply that may never come
            client._version = None  # as after a refresh that failed (e.g. a tokenizer replaced meanwhile)
            stale = client.state
            assert srv.admin.delete("/v1/adapters/lora-1").status_code == 200
            await client.infer("lora-0", entry, ["x"], timeout_s=30)  # any reply
            for _ in range(100):
                if client.state is not stale:
                    break
                await asyncio.sleep(0.05)
            assert "lora-1" not in client.state["entries"] and client._version is not None
        finally:
            await client.close()

    with running(store.root) as srv:
        asyncio.run(scenario(srv))


def test_a_second_frontend_reports_an_unloaded_model_not_ready(tmp_path):
    """Front-end B caches the engine's state; KServe's ready and metadata calls must ask the engine, not
    that cache: a DELETE through front-end A left B answering 200 (and old metadata)."""
    store = make_store(tmp_path / "store", arch="bert", n_adapters=2, full=False)
    with running(store.root) as a:
        b = Server(store.root, engine_address=a.app.state.supervisor.address).start()
        try:
            assert b.client.get("/v2/models/lora-1/ready").status_code == 200
            assert a.admin.delete("/v1/adapters/lora-1").status_code == 200
            assert a.client.get("/v2/models/lora-1/ready").status_code == 404  # A knows (refreshed on the reply)
            r = b.client.get("/v2/models/lora-1/ready")
            m = b.client.get("/v2/models/lora-1")
            assert r.status_code == 404 and m.status_code == 404
        finally:
            b.stop()


def test_a_variant_unloaded_during_a_refresh_fails_no_other_variant(tmp_path):
    """Front-end C misses 'lora-1' and refreshes: the state names 'lora-9' (a tokenizer key C lacks); another
    front-end unloads lora-9 before C's tokenizer request lands (forced here). That 404 is not the refresh's
    failure: the request for lora-1, which is loaded, was answered 404 (and /readyz, /v1/models too)."""
    import asyncio

    from service.client import EngineClient
    from service.errors import ServiceError
    from service.metrics import FrontendMetrics

    store = make_store(tmp_path / "store", arch="bert", n_adapters=2, full=False)
    write_lora(store, "lora-9", seed=109, max_length=16)  # another truncation length: another tokenizer key

    async def scenario(srv) -> str:
        client = EngineClient(srv.app.state.supervisor.address, FrontendMetrics())
        await client.start()
        try:
            while not client.state.get("ready"):
                await asyncio.sleep(0.05)
            assert "lora-1" not in client.state["entries"]
            for name in ("lora-9", "lora-1"):  # through the other front-end: C's cache does not learn of them
                assert srv.admin.put(f"/v1/adapters/{name}").status_code == 200
            fetch = client._fetch_tokenizer

            async def fetch_after_unload(key, timeout_s):
                srv.admin.delete("/v1/adapters/lora-9")  # lands between C's state reply and its tokenizer request
                return await fetch(key, timeout_s)

            client._fetch_tokenizer = fetch_after_unload
            try:
                await client.entry("lora-1")
                return "ok"
            except ServiceError as e:
                return f"{e.status} {e.message}"
        finally:
            await client.close()

    with running(store.root, variants="lora-0") as srv:
        got = asyncio.run(scenario(srv))
    assert got == "ok"


def test_python_m_service_with_engine_address_serves_from_that_engine(tmp_path):
    """`python -m service --engine-address unix://...` is front-ends only, for an engine running there
    (was: it started and supervised an engine of its own anyway, loading every model a second time)."""
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    with running(store.root) as srv:
        port = free_port()
        address = srv.app.state.supervisor.address
        proc = _serve(store.root, port, frontends=1, SERVICE_ENGINE_ADDRESS=address)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "lora-0", "inputs": GOLDEN_TEXTS})
            probs = [[{p["label"]: p["score"] for p in row}[lab] for lab in LABELS] for row in r.json()["predictions"]]
            np.testing.assert_allclose(probs, golden_probs(store, "lora-0"), atol=TOL)
            assert _engine_children(proc.pid) == []  # no engine of its own
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) in (0, -signal.SIGTERM), proc.stdout.read()[-2000:]


def test_a_second_engine_on_a_running_engines_socket_is_refused_and_leaves_it_serving(tmp_path):
    """`python -m service.engine --address` of a socket an engine listens on: it unlinked the running engine's
    socket file and bound its own (the first engine ran on, unreachable), and removed the file when it stopped."""
    import socket

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    with running(store.root) as srv:
        address = srv.app.state.supervisor.address
        path = Path(address.removeprefix("unix://"))
        inode = path.stat().st_ino
        cmd = [sys.executable, "-m", "service.engine", "--address", address, "--config", srv.cfg.model_dump_json()]
        second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it took the socket over and serves
            second.terminate()
            out, _ = second.communicate(timeout=60)
            pytest.fail(f"a second engine ran on {address}: {out[-1000:]}")
        finally:
            if second.poll() is None:
                second.kill()
        assert second.returncode == 2 and f"another engine is listening on {address}" in out, out[-2000:]
        assert "Traceback" not in out, out[-2000:]
        assert path.stat().st_ino == inode  # still the first engine's socket, and it answers
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
        np.testing.assert_allclose(srv.probs("lora-0", GOLDEN_TEXTS), golden_probs(store, "lora-0"), atol=TOL)


def test_the_admin_key_is_not_on_the_engines_command_line(tmp_path):
    """The engine got the whole config as a --config argument, --api-key included: any local user read it with ps."""
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    with running(store.root, api_key="s3cret-admin-key") as srv:
        cmdline = " ".join(psutil.Process(srv.app.state.supervisor.pid).cmdline())
        assert "service.engine" in cmdline and "s3cret-admin-key" not in cmdline
        assert srv.admin.put("/v1/adapters/lora-0").status_code == 200  # admin auth still works
        assert srv.client.put("/v1/adapters/lora-0").status_code == 401


def test_twenty_hot_swaps_across_two_frontends_fail_no_request(tmp_path):
    store = make_store(tmp_path / "store", arch="bert", n_adapters=3, full=False)
    version_a = golden_probs(store, "lora-0")
    write_lora(store, "lora-0-b", seed=999)  # version B's answers, to recognise them
    version_b = golden_probs(store, "lora-0-b")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(store.root, port, frontends=2)
    try:
        _wait_ready(url, proc)
        stop = threading.Event()
        results: list[tuple[str, int, object]] = []

        def client(name: str) -> None:
            while not stop.is_set():
                # a new connection per request: the kernel spreads them over both front-ends
                r = httpx.post(f"{url}/v1/classify", json={"model": name, "inputs": GOLDEN_TEXTS}, timeout=30)
                if r.status_code != 200:
                    results.append((name, r.status_code, r.text))
                    continue
                scores = [{x["label"]: x["score"] for x in p} for p in r.json()["predictions"]]
                results.append((name, 200, [[s[k] for k in LABELS] for s in scores]))

        threads = [threading.Thread(target=client, args=(n,)) for n in ("lora-0", "lora-1", "lora-2") for _ in range(2)]
        for t in threads:
            t.start()
        ops, swap_ms = [], []
        with httpx.Client(base_url=url, timeout=60) as admin:
            for i in range(20):
                if i % 2 == 0:  # replace lora-0 with version B, then back to A
                    write_lora(store, "lora-0", seed=999 if (i // 2) % 2 == 0 else 100)
                    r = admin.put("/v1/adapters/lora-0")
                    swap_ms.append(r.json().get("load_ms"))
                else:
                    r = admin.put("/v1/adapters/lora-1")  # the same files again
                ops.append((r.status_code, r.json().get("status")))
                # every front-end now serves what the engine holds: a fresh connection sees it
                time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert all(op == (200, "replaced") for op in ops), ops
        failed = [r for r in results if r[1] != 200]
        assert not failed, failed[:3]
        assert len(results) >= 60
        assert_no_torn_answers(store, results, version_a, version_b, tol=TOL)
        print(f"PUT-to-servable p50 {np.median(swap_ms):.1f} ms over {len(swap_ms)} swaps under load")
        # both front-ends count requests into one /metrics (multiprocess mode)
        served = _metric(url, "service_requests_total", variant="lora-2", endpoint="classify", status="200")
        assert served == sum(1 for r in results if r[0] == "lora-2")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stdout.read()[-3000:]


def test_auto_precision_follows_the_cpu_probe(tmp_path, monkeypatch):
    import models.hardware
    from service.config import ServiceConfig
    from service.engine import Engine

    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    monkeypatch.setattr(models.hardware, "cpu_flags", lambda: frozenset())  # a CPU without native bf16
    engine = Engine(ServiceConfig(store=store.root), f"unix://{tmp_path}/unused.sock")
    assert engine.cfg.precision == "auto"
    assert engine.runtime.precision == "fp32" and engine.runtime.weight_dtype == "fp32"
    state = engine.state()["precision"]
    assert state["precision"] == "fp32" and state["requested"] == "auto" and "avx512_bf16" in state["reason"]
    info = [
        s
        for fam in text_string_to_metric_families(engine.metrics.render().decode())
        for s in fam.samples
        if s.name == "service_precision_info"
    ]
    assert info and info[0].labels["precision"] == "fp32" and info[0].labels["requested"] == "auto"

    monkeypatch.setattr(models.hardware, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx2"}))
    assert Engine(ServiceConfig(store=store.root), "unix://unused").runtime.precision == "bf16"
    monkeypatch.setenv("CPU_NATIVE_BF16", "0")  # rehearsing a CPU without bf16 on one that has it
    choice = Engine(ServiceConfig(store=store.root), "unix://unused").runtime.precision_choice
    assert choice.precision == "fp32" and "CPU_NATIVE_BF16=0" in choice.reason
    assert models.hardware.machine()["native_bf16"] is False


@pytest.mark.parametrize("bf16_mode", ["weights", "autocast"])
def test_auto_precision_per_model_on_a_cpu_with_native_bf16(tmp_path, monkeypatch, bf16_mode):
    """auto on a bf16 CPU: each architecture is timed once in fp32 and bf16 at load and computes in the
    faster one (weights cast, or autocast), shown per variant; both outcomes serve within tolerance."""
    import torch

    import models.hardware
    import service.runtime
    from benchmarks import synthetic
    from models import Store
    from service.config import ServiceConfig
    from service.engine import Engine

    store = Store(synthetic.build_store(tmp_path / "store", "tiny", n_adapters=1, onnx_int8=True))
    monkeypatch.setattr(models.hardware, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    measured = models.hardware.faster_precision
    calls = []

    def probe(forward, pad_id, winner=None):
        calls.append(winner)
        m = measured(forward, pad_id, rounds=1)  # the real timing runs (both precisions' forwards)
        assert m["fp32_ms"] > 0 and m["bf16_ms"] > 0
        if winner is None:  # the real decision: whichever was faster
            assert m["precision"] == ("bf16" if m["bf16_ms"] < m["fp32_ms"] else "fp32")
        return {**m, "precision": winner or m["precision"]}

    rows = [[101, 2000 + i, 2010, 102] for i in range(3)]
    for winner in (None, "bf16", "fp32"):
        monkeypatch.setattr(service.runtime, "faster_precision", lambda f, p, w=winner: probe(f, p, w))
        engine = Engine(ServiceConfig(store=store.root, threads=1, bf16_mode=bf16_mode), f"unix://{tmp_path}/u.sock")
        rt = engine.runtime
        rt.load_base()
        for name in ("full", "lora-0", "onnx-int8"):
            rt.load(name)  # each golden-checked at the tolerance of the precision it computes in
        state = engine.state()
        (key, m), *others = state["precision"]["per_model"].items()
        assert not others, "base and full share one architecture: measured once"
        chosen = m["precision"]
        assert "per model" in state["precision"]["reason"] and m["reason"].startswith("measured at load")
        entries = state["entries"]
        assert entries["full"]["precision"] == entries["lora-0"]["precision"] == chosen
        assert entries["onnx-int8"]["precision"] == "onnxruntime (int8 graph)"
        weights = torch.bfloat16 if chosen == "bf16" and bf16_mode == "weights" else torch.float32
        assert next(rt.entries["full"].model.parameters()).dtype == weights
        assert next(rt.base.parameters()).dtype == weights
        for name in ("full", "lora-0"):  # the runtime's own cost measurements (1x8, 4x64) run first
            rt.forward([rt.entries[name]] * 2, rows[:2])
        widths = []  # what each forward was handed: bf16 on CPU pads to a multiple of 16 tokens
        hooks = [
            m.register_forward_pre_hook(lambda _, a, kw, w=widths: w.append(kw["input_ids"].shape[1]), with_kwargs=True)
            for m in (rt.entries["full"].model, rt.base)
        ]
        full = rt.forward([rt.entries["full"]], rows)
        assert full.dtype == torch.float32 and torch.isfinite(full).all()
        lora = rt.forward([rt.entries["lora-0"]] * len(rows), rows)
        assert lora.shape == full.shape and torch.isfinite(lora).all()
        assert widths and set(widths) == {16 if chosen == "bf16" else len(rows[0])}
        for h in hooks:
            h.remove()
    assert calls == [None, "bf16", "fp32"]  # once per engine: the base's architecture serves "full" too

    monkeypatch.setattr(service.runtime, "faster_precision", lambda *a: pytest.fail("explicit bf16 measured"))
    engine = Engine(ServiceConfig(store=store.root, precision="bf16"), f"unix://{tmp_path}/u.sock")
    engine.runtime.load_base()
    assert engine.runtime.precision_state()["per_model"] is None
    assert next(engine.runtime.base.parameters()).dtype == torch.bfloat16


def test_frontend_tokenisation_equals_the_hf_tokenizer():
    """The front-end tokenises with the engine's tokenizer, rebuilt from its JSON: same ids, same truncation."""
    from tiny import MAX_LENGTH, tokenizer
    from tokenizers import Tokenizer

    hf = tokenizer()
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.enable_truncation(MAX_LENGTH)
    tok.no_padding()
    texts = [*GOLDEN_TEXTS, "word " * 500, "", "naïve café — 東京"]
    assert [e.ids for e in tok.encode_batch(texts)] == hf(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]


def test_frontends_auto_from_device_and_cores():
    from service.config import ServiceConfig, auto_frontends

    assert ServiceConfig(store="x").frontends == 1  # CPU: the model shares the cores with the front-end
    assert (auto_frontends("cuda", 16), auto_frontends("cuda", 2), auto_frontends("cuda", 64)) == (4, 1, 4)
    assert ServiceConfig(store="x", frontends="3").frontends == 3


def _nice(pid: int, tid: int | None = None) -> int:
    stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5): nice


def test_frontend_nice_lowers_the_front_ends_priority_not_the_engines(tmp_path):
    store = make_store(tmp_path / "store", arch="bert", n_adapters=1, full=False)
    port = free_port()
    proc = _serve(store.root, port, frontends=1, SERVICE_FRONTEND_NICE="7")
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        (engine,) = _engine_children(proc.pid)
        assert _nice(proc.pid) == 7 and _nice(engine) == 0
        assert (
            httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "lora-0", "inputs": ["x"]}).status_code
            == 200
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_batch_is_answered_in_one_write_per_front_end(tmp_path):
    """Requests in one write; their batch's answers come back together, each exactly once, equal to the
    variant's golden logits (the framing of both directions: service/transport.py)."""
    import socket

    from service.config import ServiceConfig
    from service.engine import Engine
    from service.protocol import pack, unpack
    from service.transport import FrameReader, frame

    store = make_store(tmp_path / "store", n_adapters=0)
    address = f"unix://{tmp_path}/engine.sock"
    engine = Engine(ServiceConfig(store=store.root, precision="fp32", max_wait_ms=50), address)
    serving = threading.Thread(target=engine.serve, daemon=True)
    serving.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    reader = FrameReader()

    def receive() -> list[dict]:
        """The messages of one read (a read returns what one write of the engine sent, or more)."""
        data = sock.recv(1 << 20)
        assert data, "the engine closed the connection"
        return [unpack(m) for m in reader.feed(data)]

    try:
        for _ in range(200):  # the engine's socket appears once it listens
            try:
                sock.connect(address.removeprefix("unix://"))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.05)
        while True:  # the engine loads its variants in the background; infer waits for "ready"
            sock.sendall(frame(pack({"id": -1, "op": "state"})))
            got: list[dict] = []
            while not got:  # a read may end inside the message
                got = receive()
            state = got[0]
            if state.get("ready"):
                break
            time.sleep(0.05)
        tok = state["entries"]["full"]["tok"]
        rows = [engine.runtime.entries["full"].encode([t])[0] for t in GOLDEN_TEXTS]
        n = 3 * len(GOLDEN_TEXTS)
        sock.sendall(
            b"".join(
                frame(
                    pack(
                        {
                            "id": i,
                            "op": "infer",
                            "variant": "full",
                            "rows": [rows[i % 4]],
                            "texts": [GOLDEN_TEXTS[i % 4]],
                            "tok": tok,
                            "deadline_s": time.time() + 30,
                        }
                    )
                )
                for i in range(n)
            )
        )  # fmt: skip
        answers, reads = {}, 0
        while len(answers) < n:
            reads += 1
            for msg in receive():
                assert msg["id"] not in answers and "error" not in msg, msg
                answers[msg["id"]] = np.frombuffer(msg["logits"], dtype=np.float32)
        assert reads < n  # answers of a batch share a write
        golden = store.manifest("full").golden.logits
        for i, logits in answers.items():
            np.testing.assert_allclose(logits, golden[i % 4], atol=1e-3)
    finally:
        engine.request_stop()
        serving.join(30)
        sock.close()
