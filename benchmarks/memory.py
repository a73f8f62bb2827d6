"""Memory probes: each variant loaded alone in a fresh process, and the service as the number
of resident LoRA adapters grows, against what the same number of full models would take.

Every measurement runs in its own subprocess so RSS deltas are not polluted by whatever an
earlier load left in the allocator. `python -m benchmarks.memory probe|sweep ...` are those
subprocess entry points; users run `python -m benchmarks memory`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from benchmarks.common import copy_adapter, free_port, running_server
from benchmarks.experiment import Settings, experiment

PROBE_TIMEOUT_S = 600


# ---- subprocess side -----------------------------------------------------------------------
def _no_grad(fn: Any) -> Any:
    """Run `fn` without autograd, restoring the caller's grad mode (these also run in-process)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def _rss() -> int:
    from models.provenance import current_rss_bytes

    return current_rss_bytes()


def _cuda_allocated(device: str) -> int | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated())
    return None


def _tensor_bytes(model: Any, only: str | None = None) -> int:
    """Bytes of parameters and buffers (optionally only those whose name contains `only`)."""
    seen: set[int] = set()
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if (only is None or only in name) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _read_every_weight(model: Any) -> None:
    """Read every parameter and buffer once. safetensors weights are memory-mapped and resident only once
    touched, and a forward touches only the embedding rows of its texts' tokens (MiniLM's full variant: 62 of
    its 87 MiB after the golden texts), while a LoRA base is copied into the process and counted whole."""
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type == "cpu" and t.numel():
            seen.add(id(t))
            t.sum()


def _adapter_tensor_bytes(model: Any, adapter: str) -> int:
    """Bytes one peft adapter adds: its LoRA matrices and its copy of the classification head."""
    total = 0
    for name, p in model.named_parameters():
        if f".{adapter}." in name and ("lora_" in name or "modules_to_save" in name):
            total += p.numel() * p.element_size()
    return total


def _preimport(architecture: str, kind: str) -> None:
    """Import the code a load pulls in lazily, so RSS deltas count weights rather than modules."""
    import importlib

    import transformers  # noqa: F401

    mod = architecture.replace("-", "_")
    importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    importlib.import_module("transformers.models.auto.modeling_auto")
    if kind == "lora":
        import peft  # noqa: F401
    if kind.startswith("onnx"):
        import onnxruntime  # noqa: F401


@_no_grad
def probe_variant(store_root: str, name: str, device: str, precision: str) -> dict[str, Any]:
    """Load one variant in this (fresh) process; RSS and CUDA deltas around the load and a forward."""
    import gc

    from models import Store, dir_bytes
    from models.loading import load_base
    from models.variant import load_variant

    store = Store(store_root)
    m = store.verify(name)
    _preimport(m.architecture, m.kind)
    gc.collect()
    rss0, cuda0 = _rss(), _cuda_allocated(device)
    out: dict[str, Any] = {
        "variant": name,
        "kind": m.kind,
        "device": device,
        "precision": precision,
        "disk_bytes": dir_bytes(store.path(name)),
    }
    if m.kind == "lora":
        # the base first, on its own, so the adapter's share can be told apart
        base, tok, fp = load_base(store, m, dtype=precision, device=device)
        out["base_param_bytes"] = _tensor_bytes(base)
        out["rss_base_delta_bytes"] = _rss() - rss0
        v = load_variant(
            store, name, dtype=precision, device=device, onto=base, tokenizer=tok, expected_base_fingerprint=fp,
            adapter_name="probe", manifest=m,
        )  # fmt: skip
        out["adapter_param_bytes"] = _adapter_tensor_bytes(v.model, "probe")
        out["param_bytes"] = _tensor_bytes(v.model)
    else:
        v = load_variant(store, name, dtype=precision, device=device, manifest=m)
        if v.session is None:
            out["param_bytes"] = _tensor_bytes(v.model)
        else:  # ONNX initializers live in the model file: its size is the weight bytes
            out["param_bytes"] = sum(
                p.stat().st_size for p in store.path(name).iterdir() if p.suffix in (".onnx", ".onnx_data", ".data")
            )
    run = lambda: v.logits(m.golden.texts)  # noqa: E731
    out["rss_load_delta_bytes"] = _rss() - rss0
    run()
    out["rss_after_forward_delta_bytes"] = _rss() - rss0
    if getattr(v, "session", None) is None:  # a torch model (ONNX Runtime holds its weights in its own memory)
        _read_every_weight(v.model)
        out["rss_weights_read_delta_bytes"] = _rss() - rss0
    if cuda0 is not None:
        out["cuda_allocated_bytes"] = _cuda_allocated(device) - cuda0
    return out


@_no_grad
def sweep_in_process(
    store_root: str, names: list[str], counts: list[int], device: str, precision: str
) -> dict[str, Any]:
    """Load the base, attach adapters one by one; RSS (and CUDA) at each count in `counts`."""
    import gc

    from models import Store
    from models.loading import load_base
    from models.variant import load_variant

    store = Store(store_root)
    m0 = store.verify(names[0])
    _preimport(m0.architecture, m0.kind)
    gc.collect()
    rss0 = _rss()
    model, tok, fp = load_base(store, m0, dtype=precision, device=device)
    points = [{"adapters": 0, "rss_bytes": _rss(), "cuda_allocated_bytes": _cuda_allocated(device)}]
    for k, name in enumerate(names[: max(counts)], start=1):
        model = load_variant(
            store, name, dtype=precision, device=device, onto=model, tokenizer=tok, expected_base_fingerprint=fp,
            adapter_name=f"a{k}",
        ).model  # fmt: skip
        if k in counts:
            gc.collect()
            points.append({"adapters": k, "rss_bytes": _rss(), "cuda_allocated_bytes": _cuda_allocated(device)})
    return {"rss_before_base_bytes": rss0, "points": points}


# ---- driver side ---------------------------------------------------------------------------
def _subprocess_json(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe {' '.join(args)} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def _proc_rss_bytes(pid: int) -> int:
    """RSS of the service's whole process tree: `python -m service` runs its engine (which holds
    the models) and its front-ends as child processes, so the parent alone misses the models."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def service_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("service.__main__") is not None


def sweep_service(store_root: str, names: list[str], counts: list[int], device: str, precision: str) -> dict[str, Any]:
    """One real service process: start it with one adapter, then add adapters through
    `PUT /v1/adapters/NAME` up to each K; read its RSS once every loaded adapter has served a request.

    One process for all K, because RSS differs by tens of MiB between otherwise identical
    processes (allocator and import layout) — more than K small adapters weigh.
    """
    import httpx

    points = []
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--store", store_root, "--port", str(port), "--variants", names[0],
           "--max-adapters", str(max(counts)), "--device", device, "--precision", precision, "--log-level", "warning"]  # fmt: skip
    with running_server(cmd, f"http://127.0.0.1:{port}/readyz") as proc, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:  # fmt: skip
        loaded = 1
        c.post("/v1/classify", json={"model": names[0], "inputs": "memory probe"}).raise_for_status()
        for k in sorted(counts):
            t0 = time.perf_counter()
            for name in names[loaded:k]:
                r = c.put(f"/v1/adapters/{name}")
                if r.status_code != 200:
                    raise RuntimeError(f"PUT /v1/adapters/{name} answered {r.status_code}: {r.text[:300]}")
                c.post("/v1/classify", json={"model": name, "inputs": "memory probe"}).raise_for_status()
            added, loaded = max(0, k - loaded), max(loaded, k)
            add_s = time.perf_counter() - t0
            metrics = c.get("/metrics").text
            points.append({
                "adapters": k,
                "rss_bytes": _proc_rss_bytes(proc.pid),
                "resident_adapters_reported": _metric(metrics, "service_loaded_adapters"),
                "cuda_allocated_bytes": _metric(metrics, "service_cuda_memory_allocated_bytes"),
                "added_adapters": added,
                "add_s_per_adapter": add_s / added if added else None,  # PUT + first request, sequential
            })  # fmt: skip
            print(f"[memory] service with {k} adapters: RSS {points[-1]['rss_bytes'] / 2**20:.1f} MiB", flush=True)
    return {"points": points}


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def adapter_check(points: list[dict[str, Any]], adapter_bytes: int) -> dict[str, Any]:
    """Target: memory(K) <= base + 1.2 x K x adapter bytes, judged at the largest K measured.

    Memory is the GPU's allocated bytes where every point has them (adapters on a CUDA device live there: the
    host RSS would pass whatever they cost), else the process RSS; `measured` names which.

    The base is extrapolated from the smallest K >= 1 (base = RSS(K_min) - K_min x adapter
    bytes). K = 0 (bare base, no peft wrapper) is excluded: peft's one-off wrapping cost belongs
    to the adapter runtime, not to any one adapter. RSS grows in allocator-sized steps, so
    small K are noisy; the verdict uses the largest K, and the marginal cost per adapter is the
    least-squares slope over all K >= 1. Every row is still listed.
    """
    import numpy as np

    pts = sorted((p for p in points if p["adapters"] > 0), key=lambda p: p["adapters"])
    key = "cuda_allocated_bytes" if all(p.get("cuda_allocated_bytes") is not None for p in pts) else "rss_bytes"
    pts = [{**p, "measured_bytes": p[key]} for p in pts]
    # the base as the smallest of RSS(K) - K x adapter bytes over every K: one noisy high reading (seen: RSS at
    # K=1 47 MiB above K=8) must not raise the base, and with it the limit at every K
    base = min(p["measured_bytes"] - p["adapters"] * adapter_bytes for p in pts)
    rows = []
    for p in pts:
        k = p["adapters"]
        limit = base + 1.2 * k * adapter_bytes
        rows.append(
            {
                "adapters": k,
                "measured_bytes": p["measured_bytes"],
                "limit_bytes": limit,
                "passed": p["measured_bytes"] <= limit,
            }
        )
    fit = pts[1:] if len(pts) > 2 else pts  # the smallest K is the noisiest (allocator steps): slope over the rest
    ks = np.array([p["adapters"] for p in fit], dtype=float)
    mem = np.array([p["measured_bytes"] for p in fit], dtype=float)
    marginal = float(np.polyfit(ks, mem, 1)[0]) if len(fit) > 1 and ks[-1] > ks[0] else None
    return {
        "measured": key,
        "base_estimate_bytes": base,
        "adapter_bytes": adapter_bytes,
        "marginal_bytes_per_adapter": marginal,
        "marginal_over_adapter_bytes": marginal / adapter_bytes if marginal is not None and adapter_bytes else None,
        "rows": rows,
        "judged_at_adapters": rows[-1]["adapters"],
        "passed": rows[-1]["passed"],
    }


class MemorySettings(Settings):
    store: str = Field(description="model store directory")
    counts: list[int] = Field([1, 8, 32, 128], description="resident adapter counts of the sweep (empty: no sweep)")
    adapter: str | None = Field(
        None, description="LoRA variant to copy for the adapter-count sweep (default: first lora)"
    )
    variants: list[str] | None = Field(None, description="variants to probe (default: all)")
    via: Literal["auto", "service", "in-process"] = Field(
        "auto", description="adapter sweep through the real service process or models.load_variant in a subprocess"
    )
    device: str = Field("cpu", description="torch device of the probes")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="torch precision of the probes")


@experiment("memory", MemorySettings, help="resident memory per variant and vs number of loaded adapters")
def run(args: MemorySettings) -> dict[str, Any]:
    """Per-variant probes, then the adapter-count sweep; a variant whose probe fails goes to `failed` with why."""
    from models import Store

    store = Store(args.store)
    if not store.root.is_dir():
        raise FileNotFoundError(f"--store {store.root} is not a directory")
    infos = [i for i in store.list() if i.manifest is not None]
    names = args.variants or [i.name for i in infos]
    variants = []
    failed: dict[str, str] = {}
    probe = ["--store", str(store.root), "--device", args.device, "--precision", args.precision]
    for name in names:
        try:
            res = _subprocess_json(["probe", "--variant", name, *probe])
        except RuntimeError as e:  # refused or broken: reported with why, no figure
            failed[name] = str(e)
            print(f"[memory] {name}: FAILED ({e})", flush=True)
            continue
        variants.append(res)
        print(
            f"[memory] {name:>32} ({res['kind']}): params {res['param_bytes'] / 2**20:.1f} MiB, "
            f"RSS delta {res['rss_load_delta_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )

    loras = [i.name for i in infos if i.manifest.kind == "lora"]
    sweep: dict[str, Any] | None = None
    if loras and args.counts:
        source = args.adapter or loras[0]
        source_probe = next((v for v in variants if v["variant"] == source), None) or _subprocess_json(
            ["probe", "--variant", source, *probe]
        )
        via = args.via if args.via != "auto" else ("service" if service_available() else "in-process")
        scratch = Path(tempfile.mkdtemp(prefix="mem-sweep-"))
        try:
            # a scratch store: the shared base linked in, K copies of one adapter (only manifest.name differs)
            (scratch / "_bases").symlink_to((store.root / "_bases").resolve(), target_is_directory=True)
            shutil.copytree(store.path(source), scratch / source)
            copies = [f"{source}-copy{i:03d}" for i in range(max(args.counts))]
            for c in copies:
                copy_adapter(scratch, source, c)
            shutil.rmtree(scratch / source)
            if via == "service":
                sweep = sweep_service(str(scratch), copies, args.counts, args.device, args.precision)
            else:
                sweep = _subprocess_json(
                    [
                        "sweep",
                        "--store",
                        str(scratch),
                        "--names",
                        ",".join(copies),
                        "--counts",
                        ",".join(map(str, args.counts)),
                        "--device",
                        args.device,
                        "--precision",
                        args.precision,
                    ]
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        full = next((v for v in variants if v["kind"] == "full"), None)
        full_bytes = full["param_bytes"] if full else source_probe["param_bytes"] - source_probe["adapter_param_bytes"]
        sweep.update(
            via=via,
            source_adapter=source,
            adapter_param_bytes=source_probe["adapter_param_bytes"],
            full_model_param_bytes=full_bytes,
            full_model_bytes_source=full["variant"] if full else "base + head",
            full_models_bytes_computed={str(k): k * full_bytes for k in args.counts},
            note="full_models_bytes_computed = count x one full model's parameter bytes (computed, not measured)",
            check=adapter_check(sweep["points"], source_probe["adapter_param_bytes"]),
        )
        if via == "in-process":
            sweep["note"] += "; adapters attached through models.loading in one subprocess (not the service process)"
        chk = sweep["check"]
        print(
            f"[memory] sweep via {via}: marginal {chk['marginal_bytes_per_adapter'] or 0:.0f} B/adapter vs "
            f"{chk['adapter_bytes']} B of adapter tensors; target (<= base + 1.2x adapters) "
            f"{'met' if chk['passed'] else 'MISSED'}",
            flush=True,
        )
    return {"variants": variants, "adapter_sweep": sweep, "failed": failed}


def _main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description="subprocess probes (internal)")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--store", required=True)
    pr.add_argument("--variant", required=True)
    sw = sub.add_parser("sweep")
    sw.add_argument("--store", required=True)
    sw.add_argument("--names", required=True)
    sw.add_argument("--counts", required=True)
    for q in (pr, sw):
        q.add_argument("--device", default="cpu")
        q.add_argument("--precision", default="fp32")
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cmd == "probe":
        res = probe_variant(a.store, a.variant, a.device, a.precision)
    else:
        res = sweep_in_process(
            a.store, a.names.split(","), [int(x) for x in a.counts.split(",")], a.device, a.precision
        )
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    _main()
