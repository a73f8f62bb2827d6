"""Integration tests of the benchmark suite: real uvicorn servers on loopback (the naive
baseline and the real service on tiny stores), the load generator, hot-swap, accuracy over
HTTP vs in-process, and memory probes in real subprocesses."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from service_helpers import running, serve_in_thread
from tiny import GOLDEN_TEXTS, make_store, tiny_classifier

from benchmarks.accuracy import AccuracySettings
from benchmarks.baseline_server import create_app, load_pipeline
from benchmarks.common import free_port
from benchmarks.experiment import REGISTRY, run_experiment
from benchmarks.hotswap import hotswap
from benchmarks.loadgen import LoadSettings, Workload, closed_loop, open_loop, summarize
from benchmarks.memory import MemorySettings
from benchmarks.stats import poisson_arrivals
from models.manifest import Manifest

TEXTS = [*GOLDEN_TEXTS, "Oil prices rise again.", "A new phone was announced today.", "The striker scored twice."]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-store")
    make_store(root, n_adapters=3)
    return root


@pytest.fixture(scope="module")
def flagged_store(store: Path, tmp_path_factory) -> Path:
    """The tiny store with manifests flagged init=pretrained, to exercise the accuracy pipeline.

    The weights are random, so these accuracies mean nothing; the flag only lets the code path
    run (the manifest is not part of the hashed files, so variants still verify).
    """
    root = tmp_path_factory.mktemp("flagged") / "store"
    shutil.copytree(store, root)
    for d in root.iterdir():
        if (d / "manifest.json").exists():
            m = Manifest.load(d)
            m.init = "pretrained"
            m.save(d)
    return root


@pytest.fixture(scope="module")
def baseline(store: Path):
    """The naive baseline serving the tiny 'full' variant, with a server-side request counter."""
    pipe, name, tok = load_pipeline("full", str(store))
    app = create_app(pipe, name, tok, max_length=64)
    counter = {"n": 0}

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path in ("/v1/classify",) or request.url.path.startswith("/models/"):
            counter["n"] += 1
        return await call_next(request)

    with serve_in_thread(app) as url:
        yield url, counter


def test_closed_loop_counts_and_errors_match_the_server(baseline):
    url, counter = baseline
    before = counter["n"]
    wl = Workload(TEXTS, ["full", "nope"], seed=0)
    samples, window_s, outside = asyncio.run(closed_loop(url, wl, concurrency=3, duration_s=1.0, warmup_s=0.2))
    s = summarize(samples, window_s, slo_ms=10_000)
    # every request the server saw is accounted for: in the window, or in warm-up / the last round
    assert s["requests"] + outside == counter["n"] - before
    assert s["requests"] > 20 and window_s == 1.0 and outside >= 3
    assert s["errors_by_status"] == {"404": s["per_model_requests"]["nope"]}
    assert s["ok"] == s["per_model_requests"]["full"] > 0
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"])
    assert s["tokens_per_s"] > s["throughput_rps"]  # usage.tokens counted per input
    assert s["server_timing"]["compute"]["p50_ms"] > 0 and s["server_timing"]["queue"]["p50_ms"] is None
    assert 0 < s["latency"]["p50_ms"] <= s["latency"]["p99_ms"] <= s["latency"]["max_ms"]


def test_open_loop_sends_the_poisson_schedule_and_hf_api(baseline):
    url, counter = baseline
    before = counter["n"]
    wl = Workload(TEXTS, ["full"], seed=5, api="hf")
    samples, window_s, dropped = asyncio.run(open_loop(url, wl, rate_per_s=40, duration_s=1.0, seed=5))
    expected = len(poisson_arrivals(40, 1.0, np.random.default_rng(6)))
    assert len(samples) + dropped == expected == counter["n"] - before
    assert all(s.status == "200" for s in samples) and dropped == 0
    starts = sorted(s.start_s for s in samples)
    assert starts[-1] < 1.0 and window_s >= starts[-1]


def test_unreachable_target_counts_connection_errors():
    wl = Workload(TEXTS, ["full"])
    samples, window_s, _ = asyncio.run(closed_loop(f"http://127.0.0.1:{free_port()}", wl, 2, 0.3, 0.0, timeout_s=2))
    s = summarize(samples, window_s, None)
    assert s["ok"] == 0 and s["requests"] > 0 and s["errors_by_status"] == {"ConnectError": s["requests"]}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed: apt-get install wrk")
def test_service_and_baseline_side_by_side_in_one_run(store: Path, baseline, tmp_path: Path):
    """The `load` experiment through the contract: wrk closed loop on two targets, ratios, the
    server's timing, and a target whose model does not exist listed as failed (no figure)."""
    base_url, _ = baseline
    out = tmp_path / "load.json"
    with running(store) as svc:
        settings = LoadSettings(
            url=f"service={svc.url},baseline={base_url},missing={base_url}#nope",
            models=["full"],
            concurrency=[1, 4],
            duration=1,
            warmup=0,
            slo_ms=5000,
        )
        code, doc = run_experiment(REGISTRY["load"], settings, out=out, command=["load"])
        metrics = svc.client.get("/metrics").text
    assert code == 1 and doc["status"] == "partial"  # the missing model makes the run partial
    assert json.loads(out.read_text())["status"] == "partial"
    runs, failed = doc["payload"]["runs"], doc["payload"]["failed"]
    assert [(r["target"], r["concurrency"]) for r in runs] == [
        (t, c) for t in ("service", "baseline", "missing") for c in (1, 4)
    ]
    assert set(failed) == {"missing@c=1", "missing@c=4"}
    assert all("answered 404" in why and "this baseline serves only 'full'" in why for why in failed.values())
    good = runs[:4]
    assert all(r["client"] == "wrk" and r["errors"] == 0 and r["ok"] > 0 for r in good)
    assert all(0 < r["client_cpu_share"] <= 1 for r in good)
    assert all(r["goodput_rps"] == pytest.approx(r["throughput_rps"]) for r in good)  # all within 5 s
    svc_run = runs[1]
    assert svc_run["server_timing"]["queue"]["p50_ms"] is not None  # the service reports queue vs compute
    assert runs[3]["server_timing"]["queue"]["p50_ms"] is None  # the baseline has no queue
    assert svc_run["tokens_per_s"] > svc_run["throughput_rps"]  # usage.tokens, read by the Lua script
    assert [(x["target"], x["concurrency"]) for x in doc["payload"]["ratios"]] == [("baseline", 1), ("baseline", 4)]
    assert doc["payload"]["ratios"][1]["throughput_ratio"] == pytest.approx(
        runs[3]["throughput_rps"] / svc_run["throughput_rps"]
    )
    served = sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in metrics.splitlines()
        if line.startswith('service_requests_total{endpoint="classify",status="200",variant="full"}')
    )
    assert served >= runs[0]["ok"] + runs[1]["ok"]
    # the report renders the run with figures for the good levels and the reason for the failed ones
    from benchmarks.loadgen import render
    from benchmarks.report import collect

    docs, skipped = collect([out])
    md = render(docs, tmp_path, tmp_path)
    assert not skipped and "| service | full | c=4 |" in md and "| missing | c=1 | " in md
    assert "| missing | nope |" not in md  # no figure for a level where nothing succeeded
    assert (tmp_path / "throughput_vs_p99.png").stat().st_size > 1000


def test_open_loop_experiment_reports_client_cpu(baseline):
    url, counter = baseline
    before = counter["n"]
    s = LoadSettings(url=url, models=["full"], rate=30, duration=1, seed=3)
    code, doc = run_experiment(REGISTRY["load"], s, command=["load"])
    (r,) = doc["payload"]["runs"]
    assert code == 0 and r["mode"] == "open" and r["client"] == "httpx"
    expected = len(poisson_arrivals(30, 1.0, np.random.default_rng(4)))
    assert r["requests"] + r["dropped_client_side"] == expected == counter["n"] - before
    assert 0 < r["client_cpu_share"] <= 1


def test_load_settings_errors_say_what_to_do():
    with pytest.raises(ValueError, match="exactly one of --concurrency"):
        LoadSettings(url="http://x", models=["a"])
    with pytest.raises(ValueError, match="zipf:S"):
        LoadSettings(url="http://x", models=["a"], concurrency=[1], adapter_dist="pareto")
    with pytest.raises(ValueError, match="model list per target"):
        LoadSettings(url="a=http://x,b=http://y#m", concurrency=[1])


def test_hotswap_under_load_replace_and_reload(store: Path):
    with running(store) as svc:
        rep = asyncio.run(hotswap(svc.url, "lora-1", 3, ["lora-0", "lora-1"], TEXTS, concurrency=2, mode="replace"))
        rel = asyncio.run(hotswap(svc.url, "lora-1", 2, ["lora-0", "lora-1"], TEXTS, concurrency=2, mode="reload"))
    assert rep["ops"] == {"replaced": 3} and rel["ops"] == {"loaded": 2}
    for r in (rep, rel):
        assert r["failed_swaps"] == 0 and r["failed_requests"] == 0, r["failed_by_status"]
        assert r["background_load"]["requests"] > 5
        assert all(row["first_answer_ms"] >= row["put_ms"] > 0 for row in r["swap_rows"])
        assert r["every_swap_under_load"] and r["swap_latency"]["p50_ms"] > 0
    assert set(rel["background_load"]["per_model_requests"]) == {"lora-0"}  # reload keeps load off the unloaded adapter
    assert set(rep["background_load"]["per_model_requests"]) == {"lora-0", "lora-1"}


def _acc(store: Path, out: Path, **kw) -> dict:
    """Run the accuracy experiment through the runner (the result file is written too); return its payload."""
    settings = AccuracySettings(store=str(store), limit=48, batch_size=16, api_key=None, **kw)
    code, doc = run_experiment(REGISTRY["accuracy"], settings, out=out, command=["cmd"])
    assert code == 0 and doc["status"] == "ok", doc["error"]
    return doc["payload"]


def test_accuracy_over_http_equals_in_process(flagged_store: Path, store: Path, tmp_path: Path):
    with running(flagged_store) as svc:
        http = _acc(flagged_store, tmp_path / "http.json", url=svc.url)
    local = _acc(flagged_store, tmp_path / "local.json", in_process=True)
    names = ["full", "lora-0", "lora-1", "lora-2"]
    assert list(http["variants"]) == names == list(local["variants"])
    for n in names:
        assert http["variants"][n]["n"] == 48
        assert http["variants"][n]["confusion_matrix"] == local["variants"][n]["confusion_matrix"]
        lo, hi = http["variants"][n]["accuracy_ci95"]
        assert lo <= http["variants"][n]["accuracy"] <= hi
    assert [(t["variant_a"], t["variant_b"]) for t in http["mcnemar"]] == [("full", f"lora-{i}") for i in range(3)]
    ag = np.array(http["agreement"]["matrix"])
    assert np.allclose(np.diag(ag), 1.0) and np.allclose(ag, ag.T)
    # random-init variants are never evaluated
    skipped = _acc(store, tmp_path / "rand.json", in_process=True)
    assert skipped["variants"] == {} and set(skipped["skipped"]) == set(names)
    assert all("init=random" in r for r in skipped["skipped"].values())


def test_memory_probes_and_adapter_sweep(store: Path, tmp_path: Path):
    settings = MemorySettings(
        store=str(store),
        counts=[1, 4, 12],
        adapter="lora-0",
        variants=["full", "lora-0"],
        via="service",
        device="cpu",
        precision="fp32",
    )
    code, result = run_experiment(REGISTRY["memory"], settings, out=tmp_path / "mem.json", command=["cmd"])
    assert code == 0 and result["status"] == "ok", result["error"]
    doc = result["payload"]
    full, lora = doc["variants"]
    model = tiny_classifier("bert")
    full_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert full["param_bytes"] == full_bytes
    # r=4 on query+value in 2 layers (A 4x32 + B 32x4 each) plus the head copy (32x4 + 4), fp32
    assert lora["adapter_param_bytes"] == (2 * 2 * (4 * 32 + 32 * 4) + 32 * 4 + 4) * 4
    assert lora["base_param_bytes"] + lora["adapter_param_bytes"] == lora["param_bytes"]
    assert 0 < full["rss_load_delta_bytes"] < 200 * 2**20
    sw = doc["adapter_sweep"]
    assert sw["via"] == "service" and [p["adapters"] for p in sw["points"]] == [1, 4, 12]
    assert [p["resident_adapters_reported"] for p in sw["points"]] == [1, 4, 12]
    rss = [p["rss_bytes"] for p in sw["points"]]
    # monotone up to allocator noise: the tiny adapters weigh ~KB, and RSS moved by up to -3.0 MiB
    # between points on a 2-core AMD EPYC (819.6 after 822.6 MiB); a reloaded base would be far more
    assert all(b >= a - 8 * 2**20 for a, b in zip(rss, rss[1:], strict=False)), rss
    assert 100 * 2**20 < rss[0] < 4 * 2**30
    assert sw["full_models_bytes_computed"] == {str(k): k * full_bytes for k in (1, 4, 12)}
    assert json.loads((tmp_path / "mem.json").read_text())["kind"] == "memory"


def test_memory_probe_counts_the_memory_mapped_weights_a_forward_left_untouched(store: Path):
    """A full variant's safetensors are memory-mapped and a forward faults in only its tokens' embedding rows:
    MiniLM's full variant held 62 of its 87 MiB after the golden texts, so its '+forward' RSS left 25 MiB of
    weights out that a LoRA variant's copied base counts whole. The probe reads every weight once more."""
    from benchmarks.memory import _subprocess_json

    full = _subprocess_json(["probe", "--store", str(store), "--variant", "full"])
    lora = _subprocess_json(["probe", "--store", str(store), "--variant", "lora-0"])
    embedding_bytes = 30522 * 32 * 4  # the tiny model's word embeddings, fp32
    gained = full["rss_weights_read_delta_bytes"] - full["rss_after_forward_delta_bytes"]
    assert gained > 0.2 * embedding_bytes, (gained, full)
    # the LoRA base was copied into the process: nothing left to fault in
    assert lora["rss_weights_read_delta_bytes"] - lora["rss_after_forward_delta_bytes"] < gained, lora
