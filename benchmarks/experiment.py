"""The experiment contract: every benchmark is typed settings + `run(settings) -> payload`.

    class LoadSettings(Settings):
        url: str = Field(description="...")          # becomes --url, with this help
    @experiment("load", LoadSettings, help="...", render=render_load)
    def run(s: LoadSettings) -> dict: ...           # the payload; raise on failure

One runner (`run_experiment`) writes every result as
    {kind, command, settings, meta, status, error, payload}
with `meta` naming the machine (CPU model and the flags that matter, cores, GPU, versions, git sha),
and exits non-zero when the run failed. `report` renders each kind with the renderer registered
here and lists every file it cannot render. CLI flags are generated from the settings' fields, so
`--help` is the field descriptions and a bad value is a pydantic error listing every problem.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

# Modules that register experiments (imported lazily: each pulls torch or an HTTP client).
EXPERIMENT_MODULES = (
    "benchmarks.loadgen",
    "benchmarks.ceiling",
    "benchmarks.accuracy",
    "benchmarks.memory",
    "benchmarks.hotswap",
    "benchmarks.lora_mix",
    "benchmarks.recipe_compare",
    "benchmarks.step_overhead",
    "benchmarks.train_speed",
    "benchmarks.ray_routing",
)
RESULT_KEYS = ("kind", "command", "settings", "meta", "status", "error", "payload")


class Settings(BaseModel):
    """Base of every experiment's settings: unknown fields are an error, values are checked."""

    model_config = ConfigDict(extra="forbid")


Renderer = Callable[[list[tuple[Path, dict[str, Any]]], Path, Path], str]


@dataclass(frozen=True)
class Experiment:
    kind: str
    settings: type[Settings]
    fn: Callable[[Any], dict[str, Any]]
    help: str
    render: Renderer | None = None


REGISTRY: dict[str, Experiment] = {}


def experiment(kind: str, settings: type[Settings], *, help: str, render: Renderer | None = None):
    """Register `fn(settings) -> payload` as the experiment `kind` (a CLI subcommand of that name)."""

    def register(fn: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
        REGISTRY[kind] = Experiment(kind, settings, fn, help, render)
        return fn

    return register


def load_all() -> dict[str, Experiment]:
    """Import every experiment module (a module that is missing is skipped, never silently for CLI use)."""
    for mod in EXPERIMENT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real import error inside the module
                raise
    return REGISTRY


# ---- results ---------------------------------------------------------------------------------
def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def meta() -> dict[str, Any]:
    """Machine (CPU model + flags, cores, GPU), package versions and git state of this run."""
    from models.hardware import machine
    from models.provenance import git_info, package_versions

    return {"hardware": machine(), "versions": package_versions(), "git": git_info(), "time_utc": utc_now()}


def result_doc(
    kind: str,
    settings: dict[str, Any],
    payload: dict[str, Any] | None,
    *,
    command: Sequence[str] | None = None,
    status: str = "ok",
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "command": list(command if command is not None else [Path(sys.executable).name, *sys.argv]),
        "settings": settings,
        "meta": meta(),
        "status": status,
        "error": error,
        "payload": payload,
    }


def write_doc(doc: dict[str, Any], out: str | os.PathLike | None) -> None:
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str))
        print(f"[{doc['kind']}] wrote {path} (status {doc['status']})", flush=True)


def run_experiment(
    exp: Experiment, settings: Settings, *, out: str | os.PathLike | None = None, command: Sequence[str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Run `exp`, write its result (also on failure) and return (exit code, result document).

    A payload may carry `"failed": {name: reason}` for parts that were refused or failed (a
    variant the service refused, a load target with no successful request): the run is then
    `partial` and exits 1, and the report says which parts and why instead of a figure.
    """
    status, error, payload = "ok", None, None
    try:
        payload = exp.fn(settings)
        if payload.get("failed"):
            status = "partial"
            error = "; ".join(f"{k}: {v}" for k, v in payload["failed"].items())
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - recorded in the result, then re-signalled by the exit code
        traceback.print_exc()
        status, error = "failed", f"{type(e).__name__}: {e}"
    doc = result_doc(exp.kind, settings.model_dump(mode="json"), payload, command=command, status=status, error=error)
    write_doc(doc, out)
    if error:
        print(f"[{exp.kind}] {status}: {error}", file=sys.stderr, flush=True)
    return (0 if status == "ok" else 1), doc


# ---- CLI flags from settings -----------------------------------------------------------------
def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_list(tp: Any) -> bool:
    return typing.get_origin(_unwrap_optional(tp)) in (list, tuple)


def add_flags(parser: argparse.ArgumentParser, settings: type[Settings]) -> None:
    """One `--field-name` flag per settings field; values are parsed by pydantic, not argparse."""
    for name, field in settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        tp = _unwrap_optional(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        help_ = (field.description or "") + ("" if field.is_required() else f" (default: {default})")
        if tp is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
            meta_ = "A,B,…" if _is_list(field.annotation) else None
            parser.add_argument(flag, dest=name, default=None, choices=choices, metavar=meta_, help=help_)


def settings_from_args(settings: type[Settings], args: argparse.Namespace) -> Settings:
    """Build the settings from parsed flags (only the ones given; defaults stay the model's)."""
    values: dict[str, Any] = {}
    for name, field in settings.model_fields.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if _is_list(field.annotation) and isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        values[name] = v
    return settings.model_validate(values)


def format_validation_error(kind: str, e: ValidationError) -> str:
    lines = [f"{kind}: {len(e.errors())} problem(s) with the settings:"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        lines.append(f"  --{loc.replace('_', '-')}: {err['msg']}")
    return "\n".join(lines)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    for exp in load_all().values():
        p = sub.add_parser(exp.kind, help=exp.help, description=exp.help)
        add_flags(p, exp.settings)
        p.add_argument("--out", default=None, help="results JSON path (the result is written also on failure)")


def main_experiment(kind: str, args: argparse.Namespace, command: Sequence[str]) -> int:
    exp = REGISTRY[kind]
    try:
        settings = settings_from_args(exp.settings, args)
    except ValidationError as e:
        print(format_validation_error(kind, e), file=sys.stderr)
        return 2
    code, _ = run_experiment(exp, settings, out=args.out, command=command)
    return code
