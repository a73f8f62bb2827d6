"""`python -m benchmarks accuracy|load|memory|hotswap|baseline-server|report|demo ...`"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.common import DEFAULT_DATA


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    ld = sub.add_parser("load", help="HTTP load test: closed loop (--concurrency) or Poisson open loop (--rate)")
    ld.add_argument("--url", required=True, help="URL, or name=URL,name2=URL2 to run several targets in one run")
    ld.add_argument(
        "--models",
        type=_names,
        default=None,
        help="model names to request, comma-separated (a target's #m1+m2 overrides)",
    )
    ld.add_argument("--adapter-dist", default="uniform", help="uniform | zipf:S (model popularity)")
    mode = ld.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=_ints, help="closed loop: concurrent clients per level, e.g. 1,8,32")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    ld.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    ld.add_argument("--warmup", type=float, default=1.0, help="closed loop: unmeasured seconds before each level")
    ld.add_argument("--slo-ms", type=float, default=None, help="latency SLO for goodput")
    ld.add_argument("--data", default=DEFAULT_DATA, help="AG News dir/file (texts come from the test split)")
    ld.add_argument("--inputs-per-request", type=int, default=1)
    ld.add_argument("--api", choices=["v1", "hf"], default="v1")
    ld.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in s")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--out", default=None, help="results JSON path")

    bs = sub.add_parser("baseline-server", help="naive FastAPI + transformers.pipeline server (fp32, no batching)")
    bs.add_argument("--model", required=True, help="model directory, or a variant name with --store")
    bs.add_argument("--store", default=None)
    bs.add_argument("--host", default="127.0.0.1")
    bs.add_argument("--port", type=int, default=8100)

    mem = sub.add_parser("memory", help="resident memory per variant and vs number of loaded adapters")
    mem.add_argument("--store", required=True)
    mem.add_argument("--counts", type=_ints, default=[1, 8, 32, 128])
    mem.add_argument(
        "--adapter", default=None, help="LoRA variant to copy for the adapter-count sweep (default: first lora)"
    )
    mem.add_argument("--variants", type=_names, default=None, help="variants to probe (default: all)")
    mem.add_argument(
        "--via",
        choices=["auto", "service", "in-process"],
        default="auto",
        help="adapter sweep through the real service process or models.loading in a subprocess",
    )
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    mem.add_argument("--out", default=None)

    acc = sub.add_parser("accuracy", help="accuracy, F1, bootstrap CI, McNemar and agreement of every variant")
    acc.add_argument("--store", required=True)
    acc.add_argument("--data", default=DEFAULT_DATA, help="AG News dir/file or Hub id")
    where = acc.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="service URL (default http://127.0.0.1:8000)")
    where.add_argument("--in-process", action="store_true", help="load variants through models.loading instead of HTTP")
    acc.add_argument("--variants", type=_names, default=None)
    acc.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N test rows")
    acc.add_argument("--batch-size", type=int, default=32)
    acc.add_argument("--api-key", default=os.environ.get("SERVICE_API_KEY"))
    acc.add_argument("--out", default=None)

    hs = sub.add_parser("hotswap", help="time from PUT /v1/adapters/NAME to servable, under background load")
    hs.add_argument("--url", required=True)
    hs.add_argument("--adapter", required=True, help="adapter to unload/reload repeatedly")
    hs.add_argument("--swaps", type=int, default=10)
    hs.add_argument("--load-models", type=_names, default=None, help="models the background load requests")
    hs.add_argument("--concurrency", type=int, default=4, help="background load clients")
    hs.add_argument("--data", default=DEFAULT_DATA)
    hs.add_argument("--api-key", default=os.environ.get("SERVICE_API_KEY"))
    hs.add_argument("--out", default=None)

    rp = sub.add_parser("report", help="reports/REPORT.md with tables and PNG plots from results JSONs")
    rp.add_argument("--results", required=True, nargs="+", help="results dir(s) or JSON files")
    rp.add_argument("--out", default="reports/REPORT.md")

    dm = sub.add_parser("demo", help="train, export, serve, benchmark and report end to end (QUICK=1 for ~5 min)")
    dm.add_argument("--run-dir", default=None, help="default demo-run/full, or demo-run/quick with QUICK=1")
    dm.add_argument(
        "--report", default=None, help="report path (default reports/REPORT.md; with QUICK=1 RUN_DIR/REPORT.md)"
    )
    dm.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"))
    dm.add_argument("--from-step", default=None, help="resume at this step name (earlier outputs must exist)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv_full = [sys.executable, "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]
    if args.cmd == "load":
        from benchmarks.common import load_split, write_results
        from benchmarks.loadgen import Workload, parse_targets, ratios, run_load

        targets = parse_targets(args.url)
        if args.models is None and any(models is None for _, _, models in targets):
            raise SystemExit("load: give --models a,b or a model list per target (name=URL#m1+m2)")
        texts, _ = load_split(args.data)
        wl = Workload(
            texts, args.models or targets[0][2], args.adapter_dist, args.seed, args.api, args.inputs_per_request
        )
        runs = run_load(
            targets,
            wl,
            concurrency=args.concurrency,
            rate_per_s=args.rate,
            duration_s=args.duration,
            warmup_s=args.warmup,
            slo_ms=args.slo_ms,
            timeout_s=args.timeout,
        )
        settings = {
            k: getattr(args, k)
            for k in (
                "models",
                "adapter_dist",
                "concurrency",
                "rate",
                "duration",
                "warmup",
                "slo_ms",
                "inputs_per_request",
                "api",
                "seed",
            )
        }
        settings["data"] = str(args.data)
        rel = ratios(runs)
        for r in rel:
            print(
                f"[load] {r['target']} / {r['reference']} at c={r['concurrency']}: throughput x{r['throughput_ratio']:.2f}"
            )
        write_results(args.out, "load", {"settings": settings, "runs": runs, "ratios": rel}, argv_full)
        return 0 if all(r["ok"] > 0 for r in runs) else 1
    if args.cmd == "baseline-server":
        from benchmarks.baseline_server import serve

        serve(args.model, args.port, args.host, args.store)
        return 0
    if args.cmd == "memory":
        from benchmarks.memory import run_memory

        run_memory(args, argv_full)
        return 0
    if args.cmd == "accuracy":
        from benchmarks.accuracy import run_accuracy

        run_accuracy(args, argv_full)
        return 0
    if args.cmd == "hotswap":
        from benchmarks.hotswap import run_hotswap

        return run_hotswap(args, argv_full)
    if args.cmd == "report":
        from benchmarks.report import write_report

        path = write_report([Path(p) for p in args.results], Path(args.out))
        print(f"[report] wrote {path}")
        return 0
    if args.cmd == "demo":
        from benchmarks.demo import run_demo

        return run_demo(args)
    raise AssertionError(args.cmd)


def cli() -> int:
    """Entry point: expected failures (bad input, missing files, unreachable servers) print one line."""
    try:
        return main()
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
