"""CLI: `python -m training train|export|eval ...` (see --help of each)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config_keys_help() -> str:
    """Every config key with its default and description, from training.config (one source)."""
    from training.config import config_keys

    lines = ["config keys (YAML or --set; dotted for nested; values are YAML scalars, ${ENV:-default} expands):"]
    for key, default, doc in config_keys():
        lines.append(f"  {key} = {default!r}\n      {doc}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a variant from a YAML config",
        description="Train a variant from a YAML config; any key can be overridden with --set KEY=VALUE.",
        epilog=_config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", help="YAML config, e.g. configs/demo-minilm-lora.yaml")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        nargs="+",
        help="override a config key (dotted for nested: lora.r=16); repeatable; keys listed below",
    )
    t.add_argument("--store", default="store", help="model store directory (default ./store)")
    t.add_argument("--runs-dir", default="runs", help="results JSON, TensorBoard logs, checkpoints (default ./runs)")
    t.add_argument("--name", help="variant name (default: config name, else the file's stem)")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    e = sub.add_parser("export", help="export a variant: merged, onnx or onnx-int8")
    e.add_argument("variant")
    e.add_argument("--format", required=True, choices=["merged", "onnx", "onnx-int8"])
    e.add_argument("--store", default="store")
    e.add_argument("--name", help="new variant name (default <variant>-<format>)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing variant of that name")
    v = sub.add_parser("eval", help="accuracy of a stored variant on a test split")
    v.add_argument("variant")
    v.add_argument("--store", default="store")
    v.add_argument("--data", help="dataset (dir/file/Hub id); default: the data the variant was trained on")
    v.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="evaluate a seeded sample of N rows stratified by label (random where stratifying cannot work: "
        "N below the number of classes, a class of one row), never the first N: a file may be sorted by label",
    )
    v.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 1 failure)."""
    args = _parser().parse_args(argv)
    from models import Store, VariantNotFound, VariantRefused
    from models.manifest import ManifestError
    from training.config import ConfigError
    from training.data import DataError
    from training.export import ExportRefused

    store = Store(args.store)
    if args.command != "train":  # export / eval read a store: a missing one is not an empty one
        try:
            store.require()
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if args.command == "train":
            from training.config import load_config
            from training.loop import train

            overrides = [kv for group in args.overrides for kv in group]
            if args.name:
                overrides.append(f"name={args.name}")
            cfg = load_config(args.config, overrides)
            results = train(cfg, store=store, runs_dir=Path(args.runs_dir), resume=args.resume)
            ti = results["train_info"]
            if "variant" in ti:  # under accelerate launch only the main process writes and reports
                print(
                    json.dumps(
                        {
                            "variant": ti.get("variant"),
                            "test_accuracy": ti.get("test_accuracy"),
                            "test_macro_f1": ti.get("test_macro_f1"),
                            "train_time_s": round(ti["train_time_s"], 2),
                            "samples_per_s": round(ti["samples_per_s"], 2),
                            "results": str(Path(args.runs_dir) / f"{cfg.name}.json"),
                        }
                    )
                )
        elif args.command == "export":
            from training.export import export

            m = export(store, args.variant, args.format, name=args.name, overwrite=args.overwrite)
            print(
                json.dumps(
                    {
                        "variant": m.name,
                        "kind": m.kind,
                        "source": m.source,
                        "parity": m.parity.model_dump() if m.parity else None,
                    }
                )
            )
        else:
            from training.evaluate import evaluate_variant

            out = evaluate_variant(store, args.variant, args.data, args.limit, args.seed)
            print(json.dumps(out, indent=2))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (
        VariantNotFound,
        VariantRefused,
        ManifestError,
        ExportRefused,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
