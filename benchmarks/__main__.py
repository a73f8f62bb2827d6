"""`python -m benchmarks EXPERIMENT [flags]` runs one experiment; also `baseline-server`, `report`, `demo`.

Experiments (load, ceiling, accuracy, memory, hotswap, lora-mix, recipe-compare, step-overhead,
train-speed, ray-routing)
are registered in `benchmarks/experiment.py`; their flags come from their typed settings and each
writes one result document (`--out`), also when it fails, and exits non-zero then.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from benchmarks.experiment import REGISTRY, add_subcommands, main_experiment


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_subcommands(sub)

    bs = sub.add_parser("baseline-server", help="naive FastAPI + transformers.pipeline server (fp32, no batching)")
    bs.add_argument("--model", required=True, help="model directory, or a variant name with --store")
    bs.add_argument("--store", default=None)
    bs.add_argument("--host", default="127.0.0.1")
    bs.add_argument("--port", type=int, default=8100)
    bs.add_argument("--device", default="cpu", help="torch device of the pipeline, e.g. cuda")

    rp = sub.add_parser("report", help="reports/REPORT.md with tables and PNG plots from result documents")
    rp.add_argument("--results", required=True, nargs="+", help="results dir(s) or JSON files")
    rp.add_argument("--out", default="reports/REPORT.md")
    rp.add_argument("--readme", default=None, help="also rewrite this README's results block from the report")

    dm = sub.add_parser("demo", help="train, export, serve, benchmark and report end to end (QUICK=1 for <= 5 min)")
    dm.add_argument("--run-dir", default=None, help="default demo-run/full, or demo-run/quick with QUICK=1")
    dm.add_argument(
        "--report", default=None, help="report path (default reports/REPORT.md; with QUICK=1 RUN_DIR/REPORT.md)"
    )
    dm.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"))
    dm.add_argument("--from-step", default=None, help="resume at this step name (earlier outputs must exist)")
    return p


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = ["python", "-m", "benchmarks", *argv]
    if args.cmd in REGISTRY or args.cmd == "demo":
        # SIGTERM (a supervisor, `timeout`, pkill) unwinds like Ctrl-C: the servers an experiment started
        # are stopped by their context managers and the result is written as failed, instead of a killed
        # harness leaving its service and naive server running (seen: an orphaned baseline server).
        signal.signal(signal.SIGTERM, _interrupt)
    if args.cmd in REGISTRY:
        return main_experiment(args.cmd, args, command)
    if args.cmd == "baseline-server":
        from benchmarks.baseline_server import serve

        serve(args.model, args.port, args.host, args.store, device=args.device)
        return 0
    if args.cmd == "report":
        from benchmarks.report import write_report

        path = write_report([Path(p) for p in args.results], Path(args.out), Path(args.readme) if args.readme else None)
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
