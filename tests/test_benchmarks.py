"""Unit tests of the benchmark suite: statistics on fixed inputs, metrics, workload, report rendering."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.accuracy import accuracy_metrics as classification_metrics
from benchmarks.accuracy import agreement_matrix
from benchmarks.experiment import result_doc, write_doc
from benchmarks.loadgen import Sample, Workload, parse_targets, ratios, summarize
from benchmarks.report import write_report
from benchmarks.stats import adapter_weights, bootstrap_ci, latency_summary, mcnemar, poisson_arrivals


def write_results(path: Path, kind: str, payload: dict, argv: list[str]) -> None:
    """A result document in the contract's shape (settings apart from the payload)."""
    payload = dict(payload)
    write_doc(result_doc(kind, payload.pop("settings", {}), payload, command=argv), path)


def test_latency_percentiles_on_known_values():
    s = latency_summary([float(x) for x in range(100, 0, -1)])  # 1..100 ms, unsorted
    # linear interpolation at (n-1)q: p50 between 50 and 51, p90 = 90 + 0.1, p99 = 99 + 0.01
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == 100.0 and s["mean_ms"] == pytest.approx(50.5)
    assert latency_summary([])["p99_ms"] is None


def test_bootstrap_interval_matches_normal_approximation():
    assert bootstrap_ci([1] * 50) == (1.0, 1.0)
    correct = [1] * 900 + [0] * 100
    lo, hi = bootstrap_ci(correct, n_boot=20000, seed=1)
    half = 1.96 * math.sqrt(0.9 * 0.1 / 1000)  # 0.0186
    assert lo == pytest.approx(0.9 - half, abs=0.003)
    assert hi == pytest.approx(0.9 + half, abs=0.003)
    assert bootstrap_ci(correct, seed=1) == bootstrap_ci(correct, seed=1)  # seeded: reproducible


def test_mcnemar_against_hand_computed_values():
    # 10 items only A gets right (b), 2 only B (c), 30 both right, 8 both wrong
    a = [1] * 10 + [0] * 2 + [1] * 30 + [0] * 8
    b = [0] * 10 + [1] * 2 + [1] * 30 + [0] * 8
    t = mcnemar(a, b)
    assert (t["b"], t["c"]) == (10, 2)
    # exact: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert t["p_exact"] == pytest.approx(158 / 4096)
    # chi-square with continuity correction: (|10 - 2| - 1)^2 / 12; 1 dof: sf(x) = erfc(sqrt(x / 2))
    assert t["chi2_cc"] == pytest.approx(49 / 12)
    assert t["p_chi2_cc"] == pytest.approx(math.erfc(math.sqrt(49 / 12 / 2)))
    assert mcnemar([1, 0], [1, 0])["p_exact"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar([1], [1, 0])


def test_poisson_arrivals_statistics():
    rate, duration = 200.0, 50.0
    t = poisson_arrivals(rate, duration, np.random.default_rng(0))
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < duration
    assert abs(len(t) - rate * duration) < 4 * math.sqrt(rate * duration)  # count ~ Poisson(10,000)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)  # exponential gaps: mean 1/rate ...
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # ... and coefficient of variation 1
    counts = np.histogram(t, bins=int(duration))[0]  # per-second counts: variance = mean
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.45)


def test_adapter_distributions():
    assert adapter_weights(4, "uniform").tolist() == [0.25] * 4
    assert adapter_weights(3, "zipf:1").tolist() == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    with pytest.raises(ValueError, match="zipf:S"):
        adapter_weights(3, "pareto")


def test_workload_sends_the_same_texts_to_every_target():
    texts = [f"text {i}" for i in range(100)]
    one = Workload(texts, ["a"], seed=3).stream(200)
    many = Workload(texts, [f"m{i}" for i in range(32)], seed=3).stream(200)
    assert [x[1] for x in one] == [x[1] for x in many]
    counts = np.bincount(
        [int(m[1:]) for m, _ in Workload(texts, [f"m{i}" for i in range(4)], "zipf:1", seed=0).stream(4000)]
    )
    assert counts[0] > counts[1] > counts[2] > counts[3]  # popularity follows the Zipf ranks


def test_parse_targets():
    assert parse_targets("http://h:1/") == [("target", "http://h:1", None)]
    assert parse_targets("svc=http://h:1,base=http://h:2#a+b") == [
        ("svc", "http://h:1", None),
        ("base", "http://h:2", ["a", "b"]),
    ]
    with pytest.raises(ValueError, match="http://"):
        parse_targets("svc=h:1")


def test_summarize_counts_errors_goodput_and_timing():
    samples = [
        Sample(0, 10.0, "200", "a", 5, 1.0, 4.0),
        Sample(0, 30.0, "200", "a", 5, 2.0, 6.0),
        Sample(0, 5.0, "404", "b"),
        Sample(0, 5.0, "404", "b"),
        Sample(0, 30_000.0, "timeout", "a"),
    ]
    s = summarize(samples, window_s=2.0, slo_ms=20.0)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 2, 3)
    assert s["errors_by_status"] == {"404": 2, "timeout": 1}
    assert s["throughput_rps"] == 1.0 and s["tokens_per_s"] == 5.0
    assert s["goodput_rps"] == 0.5 and s["slo_attainment"] == pytest.approx(0.2)
    assert s["latency"]["max_ms"] == 30.0  # failed requests do not enter the latency percentiles
    assert s["server_timing"]["queue"]["p50_ms"] == 1.5 and s["server_timing"]["compute"]["max_ms"] == 6.0


def test_open_loop_drops_are_failed_requests_for_the_slo_and_shown_in_the_table(monkeypatch, tmp_path):
    """Arrivals the open-loop client dropped (too many outstanding) were left out of slo_attainment (4 of 4
    sent within the SLO read 1.0 where the schedule wanted 10) and out of the load table."""
    import benchmarks.loadgen as lg

    async def fake_open_loop(*args, **kwargs):
        return [Sample(0.1 * i, 10.0, "200", "a") for i in range(4)], 1.0, 6

    monkeypatch.setattr(lg, "open_loop", fake_open_loop)
    r = lg.run_level("http://127.0.0.1:9", Workload(["t"], ["a"]), rate_per_s=10.0, duration_s=1.0, slo_ms=50.0)
    assert (r["requests"], r["ok"], r["dropped_client_side"]) == (4, 4, 6)
    assert r["slo_attainment"] == pytest.approx(0.4) and r["goodput_rps"] == 4.0
    assert summarize([Sample(0, 10.0, "200", "a")], 1.0, 50.0)["slo_attainment"] == 1.0  # closed loop: no drops
    r.update(target="service", url="http://127.0.0.1:9", models=["a"])
    write_results(tmp_path / "r" / "open.json", "load", {"settings": {"rate": 10.0}, "runs": [r]}, ["python"])
    text = write_report([tmp_path / "r"], tmp_path / "REPORT.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| service | a | 10.0/s")]
    assert "| 0; 6 dropped by the client |" in row, row


def test_classification_metrics_on_fixed_predictions():
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    y_true = [0, 0, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 1, 1, 1, 2, 3, 3, 3]
    m = classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == 0.75 and m["n"] == 8
    assert m["per_class"]["World"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["Sports"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["Sports"][
        "f1"
    ] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["macro_recall"] == 0.75 and m["confusion_matrix"][0] == [1, 1, 0, 0]
    lo, hi = m["accuracy_ci95"]
    assert lo <= 0.75 <= hi
    ag = agreement_matrix({"a": [0, 1, 2, 3], "b": [0, 1, 2, 0]})
    assert ag["matrix"] == [[1.0, 0.75], [0.75, 1.0]]


def _load_run(target: str, c: int, rps: float, p50: float, p99: float, models: list[str]) -> dict:
    p50, p99 = float(p50), float(p99)
    lat = {"p50_ms": p50, "p90_ms": p99 * 0.9, "p99_ms": p99, "max_ms": p99 * 1.1, "mean_ms": p50}
    return {
        "target": target,
        "url": "http://127.0.0.1:1",
        "models": models,
        "mode": "closed",
        "concurrency": c,
        "requests": 100,
        "ok": 100,
        "errors": 0,
        "errors_by_status": {},
        "window_s": 10.0,
        "throughput_rps": rps,
        "tokens_per_s": rps * 50,
        "latency": lat,
        "per_model_requests": {},
        "server_timing": None,
    }


def test_report_renders_tables_figures_and_targets(tmp_path: Path):
    res = tmp_path / "results"
    argv = ["python", "-m", "benchmarks", "load", "--fake"]
    runs = [
        _load_run("service", 1, 20.0, 40, 60, ["m"]),
        _load_run("service", 32, 123.4, 200, 300, ["m"]),
        _load_run("baseline", 1, 15.0, 60, 80, ["m"]),
        _load_run("baseline", 32, 15.5, 2000, 2500, ["m"]),
    ]
    write_results(res / "load.json", "load", {"settings": {"duration": 10}, "runs": runs, "ratios": ratios(runs)}, argv)
    mix = [
        _load_run("adapter-1", 32, 100.0, 200, 300, ["a"]),
        _load_run("adapters-32", 32, 90.0, 200, 300, ["a"] * 32),
        _load_run("merged", 32, 110.0, 180, 280, ["m"]),
    ]
    write_results(res / "mix.json", "load", {"settings": {}, "runs": mix, "ratios": ratios(mix)}, argv)
    variants = {
        n: {
            **classification_metrics([0, 1, 2, 3] * 5, [0, 1, 2, 3] * 4 + p, ["W", "S", "B", "T"]),
            "kind": k,
            "source": None,
        }
        for n, k, p in (("full", "full", [0, 1, 2, 3]), ("lora", "lora", [0, 1, 2, 0]))
    }
    write_results(
        res / "acc.json",
        "accuracy",
        {
            "settings": {"n": 20, "limit": None, "via": "test"},
            "variants": variants,
            "skipped": {"rand": "init=random"},
            "mcnemar": [
                {**mcnemar([1] * 20, [1] * 19 + [0]), "variant_a": "full", "variant_b": "lora", "accuracy_diff": 0.05}
            ],
            "agreement": agreement_matrix({"full": [0, 1], "lora": [0, 0]}),
        },
        argv,
    )
    points = [{"adapters": k, "rss_bytes": 500 * 2**20 + k * 1200} for k in (1, 8, 32)]
    sweep = {
        "via": "service",
        "source_adapter": "lora",
        "points": points,
        "adapter_param_bytes": 1000,
        "full_models_bytes_computed": {str(k): k * 2**20 for k in (1, 8, 32)},
        "note": "computed",
        "check": {
            "base_estimate_bytes": 500 * 2**20 + 200,
            "adapter_bytes": 1000,
            "marginal_bytes_per_adapter": 1200.0,
            "marginal_over_adapter_bytes": 1.2,
            "rows": [
                {
                    "adapters": p["adapters"],
                    "rss_bytes": p["rss_bytes"],
                    "limit_bytes": 500 * 2**20 + 200 + 1200 * p["adapters"],
                    "passed": True,
                }
                for p in points
            ],
            "passed": True,
        },
    }
    write_results(
        res / "mem.json",
        "memory",
        {
            "settings": {"device": "cpu", "precision": "fp32"},
            "adapter_sweep": sweep,
            "variants": [
                {
                    "variant": "full",
                    "kind": "full",
                    "param_bytes": 2**20,
                    "rss_load_delta_bytes": 3 * 2**20,
                    "rss_after_forward_delta_bytes": 4 * 2**20,
                    "disk_bytes": 2**20,
                }
            ],
        },
        argv,
    )
    hs = {
        "adapter": "lora",
        "mode": "replace",
        "swaps": 3,
        "failed_swaps": 0,
        "failed_requests": 0,
        "failed_by_status": {},
        "swap_latency": latency_summary([20.0, 30.0, 40.0]),
        "first_answer_latency": latency_summary([25.0, 35.0, 45.0]),
        "swap_rows": [{"put_status": 200, "put_ms": x} for x in (20.0, 30.0, 40.0)],
        "background_load": {
            "client": "wrk",
            "requests": 50,
            "latency": latency_summary([5.0]),
            "client_cpu_share": 0.05,
        },
        "target": {"passed": True, "p50_ms_max": 50.0},
    }
    write_results(res / "hs.json", "hotswap", {"settings": {}, "runs": [hs]}, argv)
    steps = [{"step": "train", "wall_s": 100.0}, {"step": "report", "wall_s": 1.5}]
    write_results(res / "demo.json", "demo", {"quick": True, "steps": steps, "total_s": 240.0}, ["QUICK=1", "python"])
    (res / "not-a-result.json").write_text(json.dumps({"hello": 1}))

    out = write_report([res], tmp_path / "rep" / "REPORT.md")
    text = out.read_text()
    figs = sorted(p.name for p in (out.parent / "figures").iterdir())
    assert figs == ["accuracy.png", "hotswap.png", "memory_vs_adapters.png", "throughput_vs_p99.png"]
    for f in figs:
        assert (out.parent / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{f}" in text
    assert "| service | m | c=32 | 123.4 |" in text
    assert "7.96×; service p99 300.0 ms vs baseline p50 2000.0 ms | met" in text  # 123.4 / 15.5
    assert "0.90× one adapter, 0.82× merged | missed" in text
    assert "hot-swap (replace) under load (" in text  # every target row names its machine
    assert "| p50 ≤ 50 ms, 0 failed | p50 30.0 ms" in text
    assert "python -m benchmarks load --fake" in text and "Source: `../results/load.json`" in text
    assert "`rand` (init=random)" in text
    assert "QUICK=1 form: 4.0 min" in text and "| train | 100.0 |" in text
    assert text.count("Source:") == 6
    assert "## Files not rendered" in text and "not-a-result.json" in text


def test_recipe_compare_takes_the_medians_of_the_training_runs_and_keeps_each():
    from benchmarks.recipe_compare import _medians

    runs = [
        {"train_time_s": 9.0, "samples_per_s": 50.0, "steady_samples_per_s": 60.0, "precision": "bf16"},
        {"train_time_s": 7.0, "samples_per_s": 70.0, "steady_samples_per_s": None},  # too short for a steady window
        {"train_time_s": 8.0, "samples_per_s": 60.0, "steady_samples_per_s": 80.0},
    ]
    m = _medians(runs)
    assert (m["train_time_s"], m["samples_per_s"], m["steady_samples_per_s"]) == (8.0, 60.0, 70.0)
    assert [r["samples_per_s"] for r in m["runs"]] == [50.0, 70.0, 60.0]
    assert set(m["runs"][0]) == {"train_time_s", "samples_per_s", "steady_samples_per_s"}
    assert _medians([{"samples_per_s": 1.0}])["steady_samples_per_s"] is None


def test_the_demo_paces_its_open_loop_at_half_the_measured_adapter_mix_throughput(tmp_path):
    """Demo.open_loop_rate reads the closed-loop adapters-N throughput from the result document just
    written (its runs are under payload; it read a top-level "runs", found none and ran at 1 req/s)."""
    import json

    from benchmarks.demo import Demo

    d = Demo(tmp_path / "run", quick=True, report=tmp_path / "REPORT.md")
    doc = {
        "kind": "load",
        "payload": {
            "runs": [
                {"target": "adapters-32", "throughput_rps": 216.0},
                {"target": "adapter-1", "throughput_rps": 300.0},
            ]
        },
    }
    (d.results / "load-adapter-mix.json").write_text(json.dumps(doc))
    assert d.open_loop_rate() == 108.0


def test_mfu_datasheet_peak_tells_the_pcie_and_nvl_cards_from_the_sxm_boards():
    """An H100 PCIe peaks at 756 bf16 TFLOP/s, an H100 / H200 NVL at 835; matched by the substring "H100" /
    "H200" they were divided by the SXM board's 989, and their MFU read 0.76x / 0.84x of what it was."""
    from benchmarks.train_speed import datasheet_tflops

    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert datasheet_tflops("NVIDIA H200", "bf16") == 989.4
    assert datasheet_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert datasheet_tflops("NVIDIA H100 PCIe", "fp32") == 51.2
    assert datasheet_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert datasheet_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert datasheet_tflops("NVIDIA L4", "bf16") is None and datasheet_tflops(None, "bf16") is None
