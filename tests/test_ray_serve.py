"""The service on Ray Serve (service/ray_app.py): a local Ray instance, 2 engine replicas, a tiny store.

One Ray instance and one application for the whole module (Ray start-up is the slow part), compared
with the single-process service on the same store: same answers, same 4xx contract; an adapter's
repeated requests stick to the replicas that hold it; a killed replica does not lose requests.
Skipped when Ray is not installed (`pip install '.[ray]'`; `make setup` and CI install it).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from service_helpers import free_port, running, write_merged, write_onnx
from test_service_limits import BAD, error_of
from tiny import GOLDEN_TEXTS, LABELS, make_store

try:
    import ray
    from ray import serve
except ImportError:  # the optional extra is not installed
    ray = serve = None
needs_ray = pytest.mark.skipif(
    ray is None, reason="Ray is an optional extra: pip install '.[ray]' (make setup installs it)"
)

ADAPTERS = ["lora-0", "lora-1", "lora-2", "lora-3"]
OTHERS = ["full", "lora-0-merged", "full-onnx"]
LIMITS = dict(api_key="k3y", max_inputs=8, max_input_chars=200, max_body_bytes=20_000)
TOL = 1e-5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = make_store(tmp_path_factory.mktemp("ray") / "store", arch="bert", n_adapters=4)
    write_merged(s, "lora-0-merged", source="lora-0", seed=100)
    write_onnx(s, "full-onnx", source="full")
    return s


@pytest.fixture(scope="module")
def plain(store):
    """The single-process service on the same store: the reference answers and error contract."""
    with running(store.root, **LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def cluster(store):
    """Ray with 2 CPUs, 2 engine replicas (0.5 CPU each, 1 torch thread) and one front-end."""
    from service.ray_app import build_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "store": str(store.root),
                "engine_replicas": 2,
                "engine_cpus": 0.5,
                "max_adapters_per_replica": 8,
                "preload": "full",
                "service": {"precision": "fp32", "threads": 1, "max_wait_ms": 20, **LIMITS},
            }
        )
        serve.run(app, name="agnews", route_prefix="/", blocking=False)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Authorization": "Bearer k3y"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError("the Ray Serve application did not become ready in 180 s")
        yield client
        client.close()
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _probs(resp: httpx.Response) -> list[list[float]]:
    assert resp.status_code == 200, resp.text
    return [
        [next(x["score"] for x in pred if x["label"] == lab) for lab in LABELS] for pred in resp.json()["predictions"]
    ]


def _classify(client: httpx.Client, model: str, inputs) -> httpx.Response:
    return client.post("/v1/classify", json={"model": model, "inputs": inputs})


@needs_ray
def test_a_preloaded_variant_is_a_hit_from_the_first_request(cluster):
    """`preload` variants are in every replica's engine from the start: no request for them loads anything,
    so each is reported as a hit (first run of the module: no request has reached a replica yet)."""
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: _classify(cluster, "full", GOLDEN_TEXTS[0]), range(8)))
    assert all(r.status_code == 200 for r in replies)
    assert [(r.headers["x-adapter-hit"], r.headers["x-replica-loads"]) for r in replies] == [("1", "0")] * 8


@needs_ray
def test_answers_equal_the_single_process_service(cluster, plain):
    """4 adapters (concurrently, so replicas mix them in batches) and the full/merged/ONNX variants."""
    names = ADAPTERS + OTHERS
    jobs = [(n, t) for n in names for t in GOLDEN_TEXTS]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: _probs(_classify(cluster, j[0], [j[1]]))[0], jobs))
    for (n, t), p in zip(jobs, got, strict=True):
        np.testing.assert_allclose(p, plain.probs(n, [t])[0], atol=TOL, err_msg=f"{n}: {t!r}")
    # whole-request batches, the HF and KServe routes too
    for n in ADAPTERS:
        np.testing.assert_allclose(_probs(_classify(cluster, n, GOLDEN_TEXTS)), plain.probs(n, GOLDEN_TEXTS), atol=TOL)
        body = {"inputs": GOLDEN_TEXTS[:2], "parameters": {"top_k": 2}}
        a, b = cluster.post(f"/models/{n}", json=body), plain.client.post(f"/models/{n}", json=body)
        assert a.status_code == b.status_code == 200
        assert [[x["label"] for x in row] for row in a.json()] == [[x["label"] for x in row] for row in b.json()]
        np.testing.assert_allclose(
            [[x["score"] for x in row] for row in a.json()], [[x["score"] for x in row] for row in b.json()], atol=TOL
        )
        v2 = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": GOLDEN_TEXTS[:2]}]}
        a, b = cluster.post(f"/v2/models/{n}/infer", json=v2), plain.client.post(f"/v2/models/{n}/infer", json=v2)
        assert a.status_code == b.status_code == 200
        assert a.json()["outputs"][0] == b.json()["outputs"][0]  # labels
        np.testing.assert_allclose(a.json()["outputs"][1]["data"], b.json()["outputs"][1]["data"], atol=TOL)


@needs_ray
def test_an_adapters_requests_stick_to_replicas_that_hold_it(cluster):
    """Each adapter is loaded at most once per replica, and once Ray's routing table knows who holds
    it (pushed by the replica after its load), every request goes to a replica that already has it."""
    seen: list[tuple[str, str, bool]] = []

    def round_(repeats: int) -> None:
        for _ in range(repeats):
            for n in ADAPTERS:
                r = _classify(cluster, n, GOLDEN_TEXTS[0])
                assert r.status_code == 200, r.text
                seen.append((n, r.headers["x-engine-replica"], r.headers["x-adapter-hit"] == "1"))

    round_(5)
    loads = Counter((n, rep) for n, rep, hit in seen if not hit)  # a miss = a load on that replica
    assert max(loads.values(), default=0) <= 1, f"an adapter was loaded twice on one replica: {loads}"
    time.sleep(2)  # replicas push their model ids to the controller, which updates the routers
    seen.clear()
    round_(5)
    assert all(hit for _, _, hit in seen), f"misses after warm-up: {[s for s in seen if not s[2]]}"
    replicas = {rep for _, rep, _ in seen}
    for n in ADAPTERS:  # with no misses, every request went to a replica that held it before
        holders = {rep for m, rep, _ in seen if m == n}
        assert holders <= replicas and len(holders) <= 2


@needs_ray
def test_metrics_count_every_engine_replica_and_say_the_engine_is_up(cluster):
    """/metrics on Ray: `service_engine_up` is 1 while replicas serve (was 0: nothing set it on Ray), and the engine
    series come from every replica, each labelled `replica`, so a counter only grows from scrape to scrape (was: the
    one replica a routed call reached, unlabelled: its counts jumped between replicas', read as counter resets)."""
    from prometheus_client.parser import text_string_to_metric_families

    for n in ADAPTERS:
        assert _classify(cluster, n, GOLDEN_TEXTS[0]).status_code == 200
    batches: list[dict[str, float]] = []
    for _ in range(6):
        r = cluster.get("/metrics")
        assert r.status_code == 200, r.text
        families = list(text_string_to_metric_families(r.text))
        names = [f.name for f in families]
        assert len(names) == len(set(names)), "a metric family appears twice"
        by_name = {f.name: f for f in families}
        assert [s.value for s in by_name["service_engine_up"].samples] == [1.0]
        per_replica: Counter[str] = Counter()
        for s in by_name["service_batches"].samples:
            if s.name == "service_batches_total":
                per_replica[s.labels["replica"]] += s.value
        batches.append(dict(per_replica))
    assert all(len(b) == 2 for b in batches), f"both engine replicas' series in every scrape: {batches}"
    for before, after in itertools.pairwise(batches):
        assert all(after[rep] >= before[rep] for rep in before), f"a counter went down between scrapes: {batches}"


@needs_ray
def test_models_list_merges_every_engine_replica(cluster):
    """/v1/models on Ray: a variant is loaded where any replica holds it, its request count is the replicas' sum, the
    same answer on every call (was: the state of the one replica a routed call reached, so consecutive calls listed
    different loaded sets, and counts were one replica's). Each replica's own state is read through its handle."""
    replicas: set[str] = set()
    with ThreadPoolExecutor(8) as pool:  # both replicas serve `full` (preloaded on each), and each adapter somewhere
        for _ in range(10):
            jobs = ["full"] * 8 + ADAPTERS
            for r in pool.map(lambda n: _classify(cluster, n, GOLDEN_TEXTS[0]), jobs):
                assert r.status_code == 200, r.text
                replicas.add(r.headers["x-engine-replica"])
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, "both engine replicas should have served requests"
    states = serve.get_deployment_handle("Engine", "agnews").broadcast("state").results(timeout_s=30)
    assert {s["replica"] for s in states} == replicas
    loaded = sorted({n for s in states for n in s["entries"]})
    counts = {n: sum(s["entries"][n]["request_count"] for s in states if n in s["entries"]) for n in loaded}
    for _ in range(6):
        data = cluster.get("/v1/models").json()["data"]
        assert sorted(m["name"] for m in data if m["loaded"]) == loaded
        assert {m["name"]: m["request_count"] for m in data if m["loaded"]} == counts


BAD_ON_RAY = {  # admin rows: on Ray, load/unload is refused with 405 (a valid name) — see service/ray_app.py
    ("PUT", "/v1/adapters/missing"): (405, "not_supported"),
    ("DELETE", "/v1/adapters/missing"): (405, "not_supported"),
}


@needs_ray
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "etype", "words"),
    BAD,
    ids=[f"{b[0]} {b[1]} {b[3]}-{i}" for i, b in enumerate(BAD)],
)
def test_bad_input_gets_the_same_4xx_as_the_plain_service(cluster, plain, method, path, body, status, etype, words):
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = cluster.request(method, path, **({} if body is None else kwargs))
    expected = BAD_ON_RAY.get((method, path))
    if expected is None:
        ref = plain.admin.request(method, path, **({} if body is None else kwargs))
        expected = (ref.status_code, error_of(path, ref.json())[0])
    type_, message = error_of(path, r.json())
    assert (r.status_code, type_) == expected, r.text
    if r.status_code == 405 and "adapters" in path:
        assert "Ray Serve" in message and "first request" in message


@needs_ray
@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET", "POST", "PATCH"])
def test_every_405_on_an_adapter_allows_no_method(cluster, method):
    """On Ray no method is served on /v1/adapters/NAME, so every 405 there has an empty `Allow` (RFC 9110: the
    resource allows no methods) and says how variants load here (was `Allow: GET` on PUT/DELETE, and GET is itself
    a 405 here; the other methods named PUT, itself a 405 here)."""
    r = cluster.request(method, "/v1/adapters/lora-0")
    assert r.status_code == 405 and r.headers.get("allow") == "", (r.headers, r.text)
    assert r.json()["error"]["type"] == "not_supported" and "first request" in r.json()["error"]["message"], r.text


@needs_ray
def test_more_adapters_than_the_cap_are_evicted_and_reloaded_without_failures(cluster, store, plain):
    """A second application with one replica holding one variant: concurrent requests for 3 adapters make
    Ray evict and reload them; requests queued for an evicted adapter still answer, and answer right."""
    from service.ray_app import build_app

    app = build_app(
        {
            "store": str(store.root),
            "engine_replicas": 1,
            "engine_cpus": 0.5,
            "max_adapters_per_replica": 1,
            "service": {"precision": "fp32", "threads": 1, "max_wait_ms": 20},
        }
    )
    serve.run(app, name="cap1", route_prefix="/cap1")  # returns once the app is running
    try:
        jobs = [(ADAPTERS[i % 3], GOLDEN_TEXTS[i % len(GOLDEN_TEXTS)]) for i in range(18)]
        with ThreadPoolExecutor(6) as pool:
            resps = list(
                pool.map(lambda j: cluster.post("/cap1/v1/classify", json={"model": j[0], "inputs": j[1]}), jobs)
            )
        for (n, t), r in zip(jobs, resps, strict=True):
            np.testing.assert_allclose(_probs(r)[0], plain.probs(n, [t])[0], atol=TOL)
        loads = max(int(r.headers["x-replica-loads"]) for r in resps)
        assert loads > 3, f"3 adapters through a cap of 1 should reload some ({loads} loads)"
        deadline = time.monotonic() + 10
        while True:  # evicted adapters unload once their queued requests are answered
            loaded = [m["name"] for m in cluster.get("/cap1/v1/models").json()["data"] if m["loaded"]]
            if len(loaded) <= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(loaded) == 1, f"the replica should hold only what Ray holds (cap 1): {loaded}"
    finally:
        serve.delete("cap1")


@needs_ray
def test_overload_is_429_queue_full_and_a_timeout_names_the_configured_one(cluster, store, monkeypatch):
    """One engine replica taking 1 s a request, max_ongoing_requests=1, max_queued_requests=1: of 5 concurrent
    requests one runs, one waits, the rest get 429 queue_full with Retry-After at once, as the single-machine
    service answers a full queue (was: no queue limit, every request waited in the front-end). A request the
    replica holds past request_timeout_s gets 504 at that timeout, naming it (was: at the timeout + 5 s, naming that)."""
    import service.ray_app as ra

    real = ra.engine_deployment

    def slow_engine(args):
        deployment = real(args)

        class Engine(deployment.func_or_class):
            async def infer(self, texts, timeout_s):
                import asyncio

                await asyncio.sleep(30.0 if texts == ["slow"] else 1.0)
                return await super().infer(texts, timeout_s)

        return deployment.options(func_or_class=Engine)

    monkeypatch.setattr(ra, "engine_deployment", slow_engine)
    app = ra.build_app(
        {
            "store": str(store.root),
            "engine_replicas": 1,
            "engine_cpus": 0.5,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "preload": "full",
            "service": {"precision": "fp32", "threads": 1, "request_timeout_s": 3},
        }
    )
    serve.run(app, name="busy", route_prefix="/busy")
    try:
        body = {"model": "full", "inputs": GOLDEN_TEXTS[0]}
        with ThreadPoolExecutor(5) as pool:
            resps = list(pool.map(lambda _: cluster.post("/busy/v1/classify", json=body), range(5)))
        statuses = sorted(r.status_code for r in resps)
        assert set(statuses) <= {200, 429} and 200 in statuses and statuses.count(429) >= 3, [r.text for r in resps]
        for r in resps:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "queue_full" and r.headers["retry-after"] == "1", r.text
                assert "retry after" in r.json()["error"]["message"]
        t0 = time.monotonic()
        r = cluster.post("/busy/v1/classify", json={"model": "full", "inputs": "slow"})
        waited_s = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert "within 3s" in r.json()["error"]["message"] and waited_s < 5, (waited_s, r.text)
    finally:
        serve.delete("busy")


@needs_ray
def test_one_replica_killed_requests_still_answered(cluster):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "agnews#Engine#" in a["name"]]
    assert len(names) == 2, names
    victim_id = names[0].rsplit("#", 1)[1]  # SERVE_REPLICA::<app>#Engine#<replica id> (our x-engine-replica)
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    answered = []
    for _ in range(3):
        for n in ADAPTERS:
            r = _classify(cluster, n, GOLDEN_TEXTS[1])
            answered.append((r.status_code, r.headers.get("x-engine-replica")))
    assert [status for status, _ in answered] == [200] * len(answered), answered
    assert victim_id not in {rep for _, rep in answered}


@needs_ray
def test_the_shipped_serve_config_validates():
    """configs/ray/ray-serve.yaml: Ray's own schema, our application args, and both deployments named."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from service.ray_app import RayAppArgs

    path = Path(__file__).resolve().parents[1] / "configs" / "ray" / "ray-serve.yaml"
    assert path.read_text().startswith("# serve run configs/ray/ray-serve.yaml"), "opens with its command"
    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = data["applications"]
    assert app["import_path"] == "service.ray_app:build_app"
    cfg = RayAppArgs.model_validate(app["args"]).service_config()
    assert cfg.max_adapters == app["args"]["max_adapters_per_replica"] and cfg.precision == "auto"
    deployments = {d.name: d for d in schema.applications[0].deployments}
    assert set(deployments) == {"Engine", "Frontend"}
    scaling = deployments["Engine"].autoscaling_config
    assert scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]
    assert cfg.threads == deployments["Engine"].ray_actor_options.num_cpus
    with pytest.raises(ValueError, match="max_adapters_per_replica"):
        RayAppArgs.model_validate({**app["args"], "service": {"max_adapters": 3}}).service_config()


def test_the_single_machine_service_never_imports_ray():
    """Ray is an optional extra: the service, its engine and every experiment module import without it."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, service, service.app, service.engine, service.__main__, benchmarks.experiment;"
        "benchmarks.experiment.load_all(); assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True, timeout=120)


# ---- cancellation on an engine replica, without a cluster: the replica's own code over the real batcher and
# runtime; only Ray's replica-context lookups are stood in for (what `serve.get_*` answer inside a replica)


@needs_ray
def test_a_cancelled_replica_request_is_not_computed(tmp_path):
    """Ray cancels the replica's request (the front-end's response.cancel() after its timeout, or a client
    gone) while its job waits in the batcher: its rows are skipped (were computed until the deadline)."""
    import asyncio

    from service.config import ServiceConfig
    from service.ray_app import LocalEngine

    store = make_store(tmp_path / "store", n_adapters=1)
    engine = LocalEngine(ServiceConfig(store=store.root, variants="full", precision="fp32", threads=1)).start()
    try:
        forwarded: list[str] = []
        forward = engine.runtime.forward

        def slow_forward(entries, rows):
            time.sleep(0.8)
            forwarded.extend(e.name for e in entries)
            return forward(entries, rows)

        engine.runtime.forward = slow_forward

        async def scenario() -> None:
            first = asyncio.ensure_future(engine.infer("full", ["first"], 30.0))
            await asyncio.sleep(0.2)  # its batch is running
            second = asyncio.ensure_future(engine.infer("full", ["second", "third"], 30.0))
            await asyncio.sleep(0.1)
            second.cancel()
            await first
            await asyncio.sleep(2.0)

        asyncio.run(scenario())
        assert len(forwarded) == 1, f"the cancelled request's rows ran anyway ({len(forwarded) - 1})"
    finally:
        engine.stop()


@needs_ray
def test_a_load_cancelled_half_way_is_unloaded_once_it_lands(tmp_path, monkeypatch):
    """A replica request cancelled while its variant loads: the load completes once (not counted as refused),
    and since Ray's cache never took it, it is unloaded (was: held by the engine beyond its cap, unknown to
    Ray, never unloaded; the batcher logged an InvalidStateError)."""
    import asyncio
    import types

    import service.ray_app as ra
    from service.config import ServiceConfig

    class Replica(ra.EngineReplica):  # what engine_deployment builds, less Ray's multiplexing LRU
        async def get_model(self, name):
            return await self._load(name)

    store = make_store(tmp_path / "store", n_adapters=1)
    cfg = ServiceConfig(store=store.root, variants="", precision="fp32", threads=1, max_adapters=1)
    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="r1"))
    monkeypatch.setattr(ra.serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(ra.serve, "get_multiplexed_model_id", lambda: "full")
    replica = Replica(cfg.model_dump_json())
    try:
        runtime = replica.engine.runtime
        prepare = runtime.prepare
        runtime.prepare = lambda name: (time.sleep(1.0), prepare(name))[1]  # a slow load (a large variant)

        async def scenario() -> None:
            request = asyncio.ensure_future(replica.infer(["hello"], 30.0))
            await asyncio.sleep(0.3)
            request.cancel()
            await asyncio.sleep(3.0)  # the load lands, then the unload

        asyncio.run(scenario())
        swaps = replica.engine.metrics.swaps
        assert swaps.labels("load", "refused")._value.get() == 0 and replica.loads["full"] == 1
        assert "full" not in runtime.entries and "full" not in replica.held
    finally:
        replica.engine.stop()


@needs_ray
def test_a_cancelled_multiplexed_load_is_advertised_only_where_it_is_held(tmp_path, monkeypatch):
    """The Engine class with Ray's real @serve.multiplexed wrapper: a request cancelled while its variant loads.
    What the replica pushes to Ray's routers (the wrapper's loaded + loading ids) must be what it holds; was:
    Ray's wrapper forgets a load only on an Exception, CancelledError is not one, so the replica advertised the
    variant for good while neither Ray's cache nor (once the landed load was undone) its engine held it."""
    import asyncio
    import types

    import ray.serve.multiplex as multiplex

    import service.ray_app as ra

    store = make_store(tmp_path / "store", n_adapters=1)
    args = ra.RayAppArgs(store=store.root, max_adapters_per_replica=2, service={"precision": "fp32", "threads": 1})
    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="r1"), app_name="a", deployment="Engine")
    monkeypatch.setattr(ra.serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(multiplex, "_get_internal_replica_context", lambda: context)
    monkeypatch.setattr(ra.serve, "get_multiplexed_model_id", lambda: "lora-0")
    replica = ra.engine_deployment(args).func_or_class(args.service_config().model_dump_json())
    try:
        runtime = replica.engine.runtime
        prepare = runtime.prepare
        runtime.prepare = lambda name: (time.sleep(1.0), prepare(name))[1]  # a slow load (a large variant)

        async def scenario() -> tuple[list[str], list[str], bool]:
            request = asyncio.ensure_future(replica.infer(["hello"], 30.0))
            await asyncio.sleep(0.3)
            request.cancel()
            await asyncio.sleep(3.0)  # the load lands (and, on the old code, is unloaded again)
            wrapper = getattr(replica, "__serve_multiplex_wrapper")
            advertised = sorted(wrapper._get_loading_and_loaded_model_ids())  # what Ray pushes to the routers
            in_engine = sorted(runtime.entries)
            again = await replica.infer(["hello"], 30.0)
            await wrapper.shutdown()  # Ray's own unload of what it holds, while this loop still runs
            return advertised, in_engine, again["replica"]["hit"]

        advertised, in_engine, hit = asyncio.run(scenario())
        assert advertised == in_engine == ["lora-0"], f"advertised {advertised}, engine holds {in_engine}"
        assert hit and replica.loads["lora-0"] == 1, "the next request is routed here as a hit: it must be one"
    finally:
        replica.engine.stop()


@needs_ray
def test_multiplexed_loads_and_evictions_are_counted_as_such(tmp_path, monkeypatch):
    """The Engine class with Ray's real @serve.multiplexed wrapper, cap 1: two variants requested in turn make Ray
    load both and evict the first. Loads a request waited for are timed as reason="cold" and evictions counted in
    service_adapter_evictions_total; nothing is an admin operation (PUT/DELETE answer 405 on Ray). Was: both loads
    and the eviction's unload counted as admin operations, the loads timed as reason="admin", no eviction counted."""
    import asyncio
    import types

    import ray.serve.multiplex as multiplex

    import service.ray_app as ra

    store = make_store(tmp_path / "store", n_adapters=2)
    args = ra.RayAppArgs(store=store.root, max_adapters_per_replica=1, service={"precision": "fp32", "threads": 1})
    context = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="r1"), app_name="a", deployment="Engine")
    model_id = {"id": "lora-0"}
    monkeypatch.setattr(ra.serve, "get_replica_context", lambda: context)
    monkeypatch.setattr(multiplex, "_get_internal_replica_context", lambda: context)
    monkeypatch.setattr(ra.serve, "get_multiplexed_model_id", lambda: model_id["id"])
    replica = ra.engine_deployment(args).func_or_class(args.service_config().model_dump_json())
    try:

        async def scenario() -> tuple[list[str], float]:
            for name in ("lora-0", "lora-1"):
                model_id["id"] = name
                assert "error" not in await replica.infer(["hello"], 30.0)
            for _ in range(100):  # Ray evicted lora-0: the replica unloads it
                if "lora-0" not in replica.engine.runtime.entries:
                    break
                await asyncio.sleep(0.05)
            in_engine = sorted(replica.engine.runtime.entries)
            evictions = value("service_adapter_evictions_total")
            await getattr(replica, "__serve_multiplex_wrapper").shutdown()
            return in_engine, evictions

        metrics = replica.engine.metrics
        value = metrics.registry.get_sample_value
        in_engine, evictions = asyncio.run(scenario())
        assert in_engine == ["lora-1"] and evictions == 1
        assert value("service_adapter_load_seconds_count", {"kind": "lora", "reason": "cold"}) == 2
        assert value("service_adapter_load_seconds_count", {"kind": "lora", "reason": "admin"}) is None
        admin = [ln for ln in metrics.render().decode().splitlines() if ln.startswith("service_admin_operations_total")]
        assert admin == [], admin
    finally:
        replica.engine.stop()
