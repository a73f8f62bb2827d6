"""What the hardware can do, and the compute precision that follows from it.

One place for the capability probe, used by the service (`--precision auto`), training
(`precision: auto`) and every benchmark's `meta`. On CPU, bf16 pays only where the CPU computes it
natively (avx512_bf16 or AMX): measured on this project's 2-core Xeons, bf16 is ~4x fp32 on one
with avx512_bf16 and ~0.4x fp32 on one without; on a 2-core AMD EPYC family 26 with avx512_bf16 and
no AMX, a bf16 matmul ran 4.3-4.5x fp32 (1024x384 @ 384x1536, 2 threads: 1,010 vs 223 GFLOP/s), and
on a family 25 model 17 (avx512_bf16, no AMX) 2.9x (387-397 vs 133-137 GFLOP/s), so the flag alone
decides there too. Tests fake only `cpu_flags` to exercise both.
`CPU_NATIVE_BF16=0|1` overrides the probe (a CPU it misjudges; rehearsing a machine without bf16).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The flags a reader needs to compare CPU figures across machines.
CPU_FLAGS_OF_INTEREST = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx512f", "avx2")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def usable_cores(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity (taskset, a container's cpuset), capped by a cgroup v2
    CPU quota (a Kubernetes `limits.cpu`, `docker --cpus`), rounded up. os.cpu_count() counts the host's cores:
    on a 64-core node limited to 2 CPUs, `--threads auto` would have started 63 engine threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or unreadable: the affinity stands
        pass
    return max(1, cores)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


BF16_OVERRIDE_ENV = "CPU_NATIVE_BF16"


def bf16_override() -> bool | None:
    """`CPU_NATIVE_BF16=0|1` from the environment, or None when unset (then the flags decide)."""
    value = os.environ.get(BF16_OVERRIDE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "1", "false", "true", "no", "yes"):
        return value in ("1", "true", "yes")
    raise ValueError(f"{BF16_OVERRIDE_ENV}={value!r}: use 0 or 1 (or leave it unset to use the CPU's flags)")


def flags_native_bf16() -> list[str]:
    """The CPU's flags that mean native bf16 (the probe, without the override)."""
    return [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]


def cpu_has_native_bf16() -> bool:
    override = bf16_override()
    return bool(flags_native_bf16()) if override is None else override


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" | "bf16" | "fp16"
    reason: str
    requested: str  # what the user asked for ("auto" or a precision)

    def as_dict(self) -> dict[str, str]:
        return {"precision": self.precision, "reason": self.reason, "requested": self.requested}


def resolve_precision(requested: str, device: str) -> PrecisionChoice:
    """Turn `auto` (or an explicit precision) into the precision to compute in on `device`, with why."""
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} requested explicitly", requested)
    if device.startswith("cuda"):
        import torch

        # including_emulation=False: the default also answers True on T4 / V100 (a bf16 tensor can be made
        # there), where bf16 is emulated and far slower than fp16
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16", f"auto: {torch.cuda.get_device_name(0)} supports bf16", requested)
        return PrecisionChoice("fp16", f"auto: {torch.cuda.get_device_name(0)} lacks bf16; fp16", requested)
    override = bf16_override()
    if override is not None:
        precision = "bf16" if override else "fp32"
        return PrecisionChoice(precision, f"auto: {BF16_OVERRIDE_ENV}={int(override)} set; {precision}", requested)
    native = flags_native_bf16()
    if native:
        return PrecisionChoice("bf16", f"auto: CPU has native bf16 ({', '.join(native)})", requested)
    return PrecisionChoice("fp32", "auto: CPU lacks avx512_bf16/amx_bf16, where bf16 is slower than fp32", requested)


# Shapes a per-model precision probe times (rows x tokens): a lone short request, and a lane's batch
# of AG News-like texts (service/batcher.py forms ~8-16 rows a lane under load on 2 cores).
PROBE_SHAPES = ((1, 48), (12, 64))


def model_key(model: Any) -> str:
    """What a per-model precision decision is cached by: the architecture (one measurement serves
    every variant, and every replacement, of the same shape)."""
    c = getattr(model, "config", None)
    if c is None:
        return f"{type(model).__name__}:{sum(p.numel() for p in model.parameters())}"
    dims = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    return f"{c.model_type}:" + "x".join(str(getattr(c, d, "?")) for d in dims)


def probe_ms(forward: Callable[[Any, Any, Any], Any], options: tuple[Any, ...], pad_id: int, rounds: int = 2) -> dict:
    """Milliseconds of `forward(option, input_ids, attention_mask)` at PROBE_SHAPES (summed) for each option.
    Rounds alternate the order (drift on a shared machine hits every option alike); the best run of each
    counts, the first being its warm-up."""
    import torch

    best = {o: [math.inf] * len(PROBE_SHAPES) for o in options}
    for k, (rows, width) in enumerate(PROBE_SHAPES):
        ids = torch.full((rows, width), pad_id, dtype=torch.long)
        mask = torch.ones_like(ids)
        for r in range(rounds + 1):
            for option in options if r % 2 == 0 else options[::-1]:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    forward(option, ids, mask)
                best[option][k] = min(best[option][k], time.perf_counter() - t0)
    return {o: sum(b) * 1e3 for o, b in best.items()}


def faster_precision(forward: Callable[[str, Any, Any], Any], pad_id: int, rounds: int = 2) -> dict[str, Any]:
    """Time `forward(precision, input_ids, attention_mask)` on CPU in "fp32" and "bf16" at PROBE_SHAPES;
    the faster precision wins.

    Why per model: native bf16 (AMX / avx512_bf16) pays for a model's large matmuls, but each bf16
    oneDNN call has a fixed cost that a small model's tiny matmuls do not earn back. Measured on this
    project's 2-core Xeon with AMX, one thread, in-process: MiniLM (width 384) bf16 ~2x fp32 at every
    batch; the 2-layer width-32 model fp32 2.2x bf16 for one row (1.0 vs 2.3 ms) and 1.07x at 12 rows.
    Rounds alternate the order (drift on a shared machine hits both); the best of each counts, the
    first run of each being its warm-up.
    """
    times = probe_ms(forward, ("fp32", "bf16"), pad_id, rounds)
    fp32_ms, bf16_ms = times["fp32"], times["bf16"]
    shapes = " + ".join(f"{r}x{w}" for r, w in PROBE_SHAPES)
    return {
        "precision": "bf16" if bf16_ms < fp32_ms else "fp32",
        "fp32_ms": round(fp32_ms, 3),
        "bf16_ms": round(bf16_ms, 3),
        "reason": f"measured at load: forwards of {shapes} tokens took {bf16_ms:.1f} ms in bf16, {fp32_ms:.1f} ms in fp32",
    }


# A bf16 forward on CPU pads its batch's width (tokens) to a multiple of this; see width_multiple.
CPU_BF16_WIDTH_MULTIPLE = 16


def width_multiple(device_type: str, precision: str) -> int:
    """The multiple a batch's width is padded to before a forward computing in `precision` on `device_type`.

    bf16 on CPU runs oneDNN's JIT kernels (AMX / avx512_bf16 brgemm), made and cached per matmul shape:
    every new (rows x width) costs kernel generation (a few ms per matmul, oneDNN's
    `ONEDNN_VERBOSE=profile_create`), and widths off a multiple of 16 (AMX tiles hold 16 rows) ran slower
    even once their kernels were cached. Exact widths give a served stream thousands of shapes (more
    than oneDNN's 1,024-entry cache holds); multiples of 16 give 8 up to 128 tokens. Measured on this project's 2-core Xeon with AMX (MiniLM bf16 weights,
    one process per setting, 600 batches of 6-12 random AG News test texts): exact widths 134-172 rows/s,
    multiples of 16 171-247; one 9-row batch already cached, 93 tokens 69-85 ms vs 96 tokens 51-65 ms;
    training batches of 16 (bf16 autocast) 272 vs 249 ms a step, means of 6 runs each.
    fp32 on CPU (MKL, no per-shape kernels) and ONNX Runtime int8 showed no gain: exact widths there.
    CUDA pads to its graph buckets instead (service/graphs.py).
    """
    return CPU_BF16_WIDTH_MULTIPLE if device_type == "cpu" and precision == "bf16" else 1


def machine() -> dict[str, object]:
    """The machine as a reader comparing figures needs it: CPU model and flags, cores, GPU."""
    from models.provenance import hardware

    info = dict(hardware())
    flags = cpu_flags()
    info["cpu_flags"] = {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST}
    info["native_bf16"] = cpu_has_native_bf16()
    if bf16_override() is not None:
        info["native_bf16_from"] = f"{BF16_OVERRIDE_ENV} (the CPU's flags say {'yes' if flags_native_bf16() else 'no'})"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu_memory_bytes"] = int(props.total_memory)
            info["gpu_count"] = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - meta must never fail a run
        pass
    return info


def machine_label(info: dict[str, object]) -> str:
    """Short label a report puts beside a figure: 'Intel Xeon …, 2 cores, bf16 yes' or the GPU."""
    if info.get("gpu"):
        return f"{info['gpu']} (+ {info.get('cpu', '?')})"
    bf16 = "yes" if info.get("native_bf16") else "no"
    if info.get("native_bf16_from"):
        bf16 += f", forced by {BF16_OVERRIDE_ENV}"
    cpu = f"{info.get('cpu', '?')}" + (f" ({info['cpu_id']})" if info.get("cpu_id") else "")
    return f"{cpu}, {info.get('cpu_count', '?')} cores, bf16 {bf16}"
