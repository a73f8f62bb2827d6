"""The experiment contract: result documents, exit codes, flags from settings, the report's renderers.

Fixtures under tests/fixtures/results/ are real result documents from earlier runs (converted to
the contract's shape), one per result kind; a kind without a fixture fails `test_every_kind_has_a_renderer_and_fixture`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from benchmarks import experiment as ex
from benchmarks.report import collect, renderers, write_report

FIXTURES = Path(__file__).parent / "fixtures" / "results"
REPO = Path(__file__).resolve().parents[1]


class _Toy(ex.Settings):
    n: int = Field(3, gt=0, description="how many")
    names: list[str] = Field(["a"], description="names")
    fast: bool = Field(False, description="go fast")


def _toy_experiment(fail: bool = False, partial: bool = False) -> ex.Experiment:
    def fn(s: _Toy) -> dict:
        if fail:
            raise RuntimeError("the server answered 404 for every request")
        return {
            "n": s.n,
            "names": s.names,
            **({"failed": {"onnx-int8": "refused: golden mismatch"}} if partial else {}),
        }

    return ex.Experiment("toy", _Toy, fn, "toy")


def test_runner_writes_the_contract_and_exit_codes(tmp_path: Path) -> None:
    code, doc = ex.run_experiment(_toy_experiment(), _Toy(n=5), out=tmp_path / "ok.json", command=["x"])
    assert code == 0
    on_disk = json.loads((tmp_path / "ok.json").read_text())
    assert set(on_disk) == set(ex.RESULT_KEYS)
    assert on_disk["status"] == "ok" and on_disk["error"] is None
    assert on_disk["settings"] == {"n": 5, "names": ["a"], "fast": False}
    assert on_disk["payload"] == {"n": 5, "names": ["a"]}
    hw = on_disk["meta"]["hardware"]
    assert {"cpu", "cpu_count", "cpu_flags", "native_bf16"} <= set(hw)
    assert set(hw["cpu_flags"]) >= {"avx512_bf16", "amx_bf16", "avx512_vnni"}
    assert "torch" in on_disk["meta"]["versions"] and "sha" in on_disk["meta"]["git"]

    code, doc = ex.run_experiment(_toy_experiment(fail=True), _Toy(), out=tmp_path / "failed.json", command=["x"])
    assert code == 1 and doc["status"] == "failed" and "404" in doc["error"] and doc["payload"] is None
    assert json.loads((tmp_path / "failed.json").read_text())["status"] == "failed"  # written also on failure

    code, doc = ex.run_experiment(_toy_experiment(partial=True), _Toy(), out=None, command=["x"])
    assert code == 1 and doc["status"] == "partial" and "onnx-int8: refused" in doc["error"]


def test_flags_are_generated_from_settings_and_every_problem_is_listed() -> None:
    import argparse

    p = argparse.ArgumentParser()
    ex.add_flags(p, _Toy)
    s = ex.settings_from_args(_Toy, p.parse_args(["--n", "7", "--names", "x, y", "--fast"]))
    assert (s.n, s.names, s.fast) == (7, ["x", "y"], True)
    assert ex.settings_from_args(_Toy, p.parse_args([])) == _Toy()
    with pytest.raises(ex.ValidationError) as e:
        ex.settings_from_args(_Toy, p.parse_args(["--n", "-1", "--names", ""]))
    msg = ex.format_validation_error("toy", e.value)
    assert "--n" in msg and "greater than 0" in msg
    help_text = p.format_help()
    assert "how many (default: 3)" in help_text


def test_cli_bad_settings_exit_2_listing_all_problems(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "lora-mix",
            "--batch",
            "0",
            "--repeats",
            "x",
            "--out",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "2 problem(s)" in r.stderr and "--batch" in r.stderr and "--repeats" in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_every_kind_has_a_renderer_and_fixture() -> None:
    kinds = set(ex.load_all()) | {"demo"}
    fixture_kinds = {json.loads(f.read_text())["kind"] for f in FIXTURES.glob("*.json")}
    assert kinds <= set(renderers()), f"kinds without a renderer: {kinds - set(renderers())}"
    assert kinds <= fixture_kinds, f"kinds without a fixture result: {kinds - fixture_kinds}"


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_each_renderer_renders_its_fixture(fixture: str, tmp_path: Path) -> None:
    docs, skipped = collect([FIXTURES / fixture])
    assert not skipped and len(docs) == 1
    f, doc = docs[0]
    text = renderers()[doc["kind"]](docs, tmp_path, tmp_path)
    assert text.startswith("## ")
    assert "Source: `" in text and doc["meta"]["hardware"]["cpu"] in text  # cites file, command and machine
    assert "|---" in text  # at least one table


def test_report_lists_unrenderable_and_failed_files_and_marks_machines(tmp_path: Path) -> None:
    res = tmp_path / "results"
    shutil.copytree(FIXTURES, res)
    (res / "not-a-result.json").write_text(json.dumps({"runs": []}))
    (res / "broken.json").write_text("{")
    other = json.loads((FIXTURES / "memory.json").read_text())
    other["kind"] = "no-such-kind"
    (res / "unknown-kind.json").write_text(json.dumps(other))
    failed = json.loads((FIXTURES / "hotswap.json").read_text())
    failed.update(status="failed", error="RuntimeError: DELETE /v1/adapters/x answered 401", payload=None)
    failed["meta"]["hardware"] = {**failed["meta"]["hardware"], "cpu": "Other CPU", "native_bf16": False}
    (res / "failed-hotswap.json").write_text(json.dumps(failed))

    out = write_report([res], tmp_path / "REPORT.md")
    text = out.read_text()
    for name, why in [
        ("not-a-result.json", "missing kind"),
        ("broken.json", "not readable JSON"),
        ("unknown-kind.json", "no renderer for kind 'no-such-kind'"),
    ]:
        line = next(x for x in text.splitlines() if name in x)
        assert why in line
    failed_line = next(x for x in text.splitlines() if "failed-hotswap.json" in x)
    assert "failed" in failed_line and "answered 401" in failed_line
    assert "more than one machine" in text and "Other CPU" in text
    for kind in {json.loads(f.read_text())["kind"] for f in FIXTURES.glob("*.json")}:
        assert renderers()[kind] is not None
    assert text.count("## ") >= len(list(FIXTURES.glob("*.json")))


def test_machine_label_tells_apart_cpus_of_one_generic_name() -> None:
    from models.hardware import machine, machine_label

    base = {"cpu": "AMD EPYC", "cpu_count": 2, "native_bf16": True}
    assert machine_label({**base, "cpu_id": "family 26 model 2"}) == "AMD EPYC (family 26 model 2), 2 cores, bf16 yes"
    assert machine_label(base) == "AMD EPYC, 2 cores, bf16 yes"  # results written before cpu_id existed
    cpu_id = machine()["cpu_id"]  # this machine's, from /proc/cpuinfo
    assert cpu_id is None or cpu_id.startswith("family ")


def test_speed_targets_read_each_goal_at_the_concurrency_it_is_set_at() -> None:
    """A ceiling run with an extra level (c=64) still reports the CPU goals at c=32; the GPU's
    service / in-process goal is read at c=64, its naive goal at c=32."""
    from benchmarks.report import speed_targets

    docs, _ = collect([FIXTURES / "ceiling.json"])
    doc = json.loads(json.dumps(docs[0][1]))  # a copy to edit
    p = doc["payload"]
    p["shape"] = "minilm"
    rows = [r for r in p["rows"] if r["concurrency"] == 32]
    p["rows"] += [{**r, "concurrency": 64, "service_over_in_process": 9.0, "service_over_naive": 99.0} for r in rows]
    p["mix_vs_one_adapter"].append({"scenario": "adapters-8", "level": "c=64", "ratio": 9.0})
    names = [row[0] for row in speed_targets({"ceiling": [(Path("c.json"), doc)]})]
    assert names and all("c=64" not in n for n in names), names
    assert any("service / in-process at c=32" in n for n in names) and any("naive pipeline at c=32" in n for n in names)
    p["device"] = "cuda"
    names = [row[0] for row in speed_targets({"ceiling": [(Path("c.json"), doc)]})]
    assert any("service / in-process at c=64" in n for n in names), names
    assert any("naive pipeline at c=32" in n for n in names), names


def test_load_targets_are_ratios_within_one_machine(tmp_path: Path) -> None:
    """Load results of two machines: each machine gets its own service-vs-naive row, its ratio from its own runs."""
    res = tmp_path / "results"
    res.mkdir()
    doc = json.loads((FIXTURES / "load-service-vs-baseline.json").read_text())
    (res / "a.json").write_text(json.dumps(doc))
    other = json.loads(json.dumps(doc))
    other["meta"]["hardware"] = {**other["meta"]["hardware"], "cpu": "Other CPU", "native_bf16": True}
    for r in other["payload"]["runs"]:
        if r["target"] == "service":
            r["throughput_rps"] *= 10
    (res / "b.json").write_text(json.dumps(other))
    text = write_report([res], tmp_path / "REPORT.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| service vs naive baseline")]
    at32 = {r["target"]: r["throughput_rps"] for r in doc["payload"]["runs"] if r["concurrency"] == 32}
    ratio = at32["service"] / at32["baseline"]
    assert len(rows) == 2, rows
    assert any("Xeon" in r and f"{ratio:.2f}×" in r for r in rows), rows
    assert any("Other CPU" in r and f"{ratio * 10:.2f}×" in r for r in rows), rows


def _load_run(target: str, c: int, rps: float, ok: int = 100) -> dict:
    return {
        "target": target,
        "mode": "closed",
        "concurrency": c,
        "throughput_rps": rps,
        "ok": ok,
        "requests": max(ok, 1),
        "errors_by_status": {} if ok else {"timeout": 5},
        "models": ["m"],
        "latency": {"p50_ms": 10.0 if ok else None, "p90_ms": None, "p99_ms": 20.0 if ok else None},
    }


def test_a_target_ratio_is_taken_at_one_concurrency_of_one_run():
    """A level where one of two targets got no successful request is left out of their ratio for both
    (was: each fell back to its own highest level: the mix at c=8 over one adapter at c=32 read 0.50x,
    missed, where both did 100 req/s at c=8)."""
    from benchmarks.report import targets_section

    meta = {"hardware": {"cpu": "Test CPU", "cpu_count": 2, "native_bf16": False}, "git": {"sha": "abc1234"}}
    runs = [
        _load_run("adapter-1", 8, 100.0),
        _load_run("adapter-1", 32, 200.0),
        _load_run("adapters-32", 8, 100.0),
        _load_run("adapters-32", 32, 0.0, ok=0),
        _load_run("torch-fp32", 8, 50.0),
        _load_run("torch-fp32", 32, 60.0),
        _load_run("onnx-int8", 8, 250.0),
        _load_run("onnx-int8", 32, 0.0, ok=0),
    ]
    doc = {"kind": "load", "meta": meta, "runs": runs, "settings": {}, "command": ["python"], "status": "ok"}
    out = targets_section({"load": [(None, doc)], "memory": [], "hotswap": [], "accuracy": []})
    mix = next(line for line in out.splitlines() if line.startswith("| adapters-32"))
    onnx = next(line for line in out.splitlines() if line.startswith("| ONNX"))
    assert "1.00×" in mix and "0.50×" not in mix, mix
    assert "5.00×" in onnx and "4.17×" not in onnx, onnx


def test_the_memory_check_is_not_loosened_by_one_high_reading():
    """The base under the adapters is the smallest RSS(K) - K x adapter bytes over every K, and the marginal
    cost is fitted without the noisiest, smallest K (was: the base from K=1 alone: one reading 47 MiB high
    raised the limit at every K by as much, and the slope read x0.49 where every step cost x1.18)."""
    from benchmarks.memory import adapter_check

    mib, one = 2**20, 300 * 1024
    rss = {1: 922 * mib, 8: 875 * mib, 32: 875 * mib + 24 * one * 1.18, 128: 875 * mib + 120 * one * 1.18}
    check = adapter_check([{"adapters": k, "rss_bytes": v} for k, v in rss.items()], one)
    assert check["base_estimate_bytes"] <= 875 * mib - 8 * one
    assert abs(check["marginal_over_adapter_bytes"] - 1.18) < 0.01


def test_the_mix_target_is_not_met_where_its_merged_half_failed():
    """The goal has two halves (>= 0.95x one adapter, >= 0.85x merged): a run whose merged target got no
    successful request is not 'met' on the other half alone (was: met, reading only '1.00x one adapter');
    where merged succeeded at a lower level, all three are compared there."""
    from benchmarks.report import targets_section

    meta = {"hardware": {"cpu": "Test CPU", "cpu_count": 2, "native_bf16": False}, "git": {"sha": "abc1234"}}

    def mix_row(runs: list[dict]) -> list[str]:
        doc = {"kind": "load", "meta": meta, "runs": runs, "settings": {}, "command": ["python"], "status": "partial"}
        out = targets_section({"load": [(None, doc)], "memory": [], "hotswap": [], "accuracy": []})
        line = next(line for line in out.splitlines() if line.startswith("| adapters-32"))
        return [cell.strip() for cell in line.strip("|").split("|")]

    row = mix_row(
        [_load_run("adapter-1", 32, 200.0), _load_run("adapters-32", 32, 200.0), _load_run("merged", 32, 0.0, ok=0)]
    )
    assert row[-1] != "met" and "merged" in row[2], row
    row = mix_row(
        [
            _load_run("adapter-1", 8, 100.0),
            _load_run("adapters-32", 8, 100.0),
            _load_run("merged", 8, 125.0),
            _load_run("adapter-1", 32, 200.0),
            _load_run("adapters-32", 32, 200.0),
            _load_run("merged", 32, 0.0, ok=0),
        ]
    )
    assert "c=8" in row[0] and "0.80× merged" in row[2] and row[-1] == "missed", row
    # a run without a merged target is judged on the half it measured, as before
    row = mix_row([_load_run("adapter-1", 32, 200.0), _load_run("adapters-32", 32, 200.0)])
    assert row[2] == "1.00× one adapter" and row[-1] == "met", row


def test_the_recipe_target_is_not_met_without_an_accuracy():
    """'>= 25x, accuracy not lower' on a CPU run that scored no accuracy (random init: accuracy_delta_points
    None) is not met on speed alone (was: met, 'accuracy –'); a scored run is judged on both halves."""
    from benchmarks.report import speed_targets

    meta = {"hardware": {"cpu": "Test CPU", "cpu_count": 2, "native_bf16": True}, "git": {"sha": "abc1234"}}

    def status(delta: float | None) -> str:
        payload = {"samples_per_s_ratio": 30.0, "steady_samples_per_s_ratio": 31.0, "accuracy_delta_points": delta}
        doc = {"kind": "recipe-compare", "meta": meta, "payload": payload, "settings": {"steps": 30}}
        (row,) = speed_targets({"recipe-compare": [(None, doc)]})
        return row[-1]

    assert status(None) != "met"
    assert status(1.0) == "met" and status(-1.0) == "missed"


def test_the_recipe_target_is_judged_on_one_figure_not_the_better_of_two():
    """The CPU row took max(whole run, after warm-up): a run slower after its warm-up than over the whole
    run (noise in the steady window) was judged on the better one. Now, as on the GPU: after warm-up where
    measured."""
    from benchmarks.report import speed_targets

    meta = {"hardware": {"cpu": "Test CPU", "cpu_count": 2, "native_bf16": True}, "git": {"sha": "abc1234"}}

    def status(whole: float, steady: float | None) -> str:
        payload = {"samples_per_s_ratio": whole, "steady_samples_per_s_ratio": steady, "accuracy_delta_points": 1.0}
        doc = {"kind": "recipe-compare", "meta": meta, "payload": payload, "settings": {"steps": 30}}
        (row,) = speed_targets({"recipe-compare": [(None, doc)]})
        return row[-1]

    assert status(26.0, 24.0) == "missed" and status(24.0, 26.0) == "met" and status(26.0, None) == "met"


def test_a_load_target_is_not_met_on_a_run_with_errors():
    """wrk's latency holds every answer, errors included: fast 503s brought the service's p99 under the
    baseline's p50 and the row read "met", never looking at errors_by_status (nor did the ratio rows, whose
    reference's errors raise the ratio). Now the cell counts the errors and a would-be "met" is "not measured"."""
    from benchmarks.report import targets_section

    meta = {"hardware": {"cpu": "Test CPU", "cpu_count": 2, "native_bf16": False}, "git": {"sha": "abc1234"}}

    def rows(runs: list[dict]) -> dict[str, list[str]]:
        doc = {"kind": "load", "meta": meta, "runs": runs, "settings": {}, "command": ["python"], "status": "ok"}
        out = targets_section({"load": [(None, doc)], "memory": [], "hotswap": [], "accuracy": []})
        lines = [line for line in out.splitlines()[2:] if line.startswith("| ")]
        return {line.split(" ")[1]: [c.strip() for c in line.strip("|").split("|")] for line in lines}

    svc, base = _load_run("service", 32, 700.0), _load_run("baseline", 32, 100.0)
    base["latency"] = {**base["latency"], "p50_ms": 30.0}  # service p99 20 ms < baseline p50 30 ms
    mix = [_load_run("adapter-1", 32, 200.0), _load_run("adapters-32", 32, 200.0)]
    clean = rows([svc, base, *mix])
    assert clean["service"][-1] == "met" and clean["adapters-32"][-1] == "met", clean
    svc["errors_by_status"] = {"503": 40}
    mix[0]["errors_by_status"] = {"timeout": 3, "503": 2}
    got = rows([svc, base, *mix])
    assert got["service"][-1] == "not measured" and got["service"][2].endswith("; errors: service 40 (503: 40)")
    mix_row = got["adapters-32"]
    assert mix_row[-1] == "not measured" and "errors: adapter-1 5 (timeout: 3, 503: 2)" in mix_row[2], mix_row
    svc["throughput_rps"] = 300.0  # 3x: missed whatever the errors did
    assert rows([svc, base])["service"][-1] == "missed"


def test_a_target_row_measured_on_a_dirty_tree_says_so():
    """The targets table said "at <sha>" for runs on a tree with uncommitted changes (the source lines said
    +dirty): that commit alone is not what ran."""
    from benchmarks.report import run_of, speed_targets

    def row(dirty: bool | None) -> str:
        git = {"sha": "abc1234def", **({"dirty": dirty} if dirty is not None else {})}
        meta = {"hardware": {"cpu": "Test CPU", "cpu_count": 2, "native_bf16": True}, "git": git}
        payload = {"samples_per_s_ratio": 30.0, "accuracy_delta_points": 1.0}
        doc = {"kind": "recipe-compare", "meta": meta, "payload": payload, "settings": {"steps": 30}}
        assert run_of(doc) in speed_targets({"recipe-compare": [(None, doc)]})[0][0]
        return run_of(doc)

    assert row(True).endswith(", at abc1234+dirty")
    assert row(False).endswith(", at abc1234") and row(None).endswith(", at abc1234")


def test_the_memory_table_shows_the_time_per_added_adapter_in_ms(tmp_path: Path):
    """A PUT + first request takes tens of ms: shown in seconds to one decimal, 0.059 s read '0.0' (the stored
    MiniLM sweep's every row); in ms it reads 59.4."""
    doc = json.loads((FIXTURES / "memory.json").read_text())
    doc["payload"]["adapter_sweep"]["points"][1]["add_s_per_adapter"] = 0.0594
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "memory.json").write_text(json.dumps(doc))
    text = write_report([tmp_path / "res"], tmp_path / "rep" / "REPORT.md").read_text()
    header = next(x for x in text.splitlines() if "per added adapter" in x)
    assert "ms per added adapter (PUT + first request)" in header, header
    row = next(x for x in text.splitlines() if x.startswith("| 8 |"))
    assert row.rstrip().endswith("| 59.4 |"), row


def test_the_memory_check_on_a_gpu_judges_the_gpu_memory():
    """Adapters on a CUDA device live in GPU memory: the check read the host RSS only, which stays flat
    whatever they cost there, so it passed any GPU sweep. Where every point has the GPU's figure, that is judged."""
    from benchmarks.memory import adapter_check

    mib, one = 2**20, 2**20
    points = [
        {"adapters": k, "rss_bytes": 900 * mib, "cuda_allocated_bytes": 500 * mib + 3 * k * one} for k in (1, 8, 32)
    ]
    check = adapter_check(points, one)
    assert check["measured"] == "cuda_allocated_bytes" and not check["passed"]
    assert abs(check["marginal_over_adapter_bytes"] - 3.0) < 1e-6
    host = adapter_check([{**p, "cuda_allocated_bytes": None} for p in points], one)  # a CPU sweep: RSS, as before
    assert host["measured"] == "rss_bytes" and host["passed"]
