"""Exports: merged (LoRA folded into the base), ONNX fp32 (optimum) and dynamic int8 (onnxruntime).

Every export is checked on its source's golden set before it is registered: fp32 exports
must agree on every argmax and stay within a max |Δlogit| tolerance, or they are refused
(nothing is written). int8 records its agreement in `manifest.parity` without a tolerance, and
its own golden logits scored one text per batch (see models.golden) so loads can reproduce them.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from models import Manifest, Parity, Store
from models.atomic import temp_dir
from models.golden import EXPORT_TOLERANCE, export_parity, make_golden
from models.loading import ONNX_FILE, load_tokenizer, onnx_session
from models.provenance import git_info, package_versions
from models.variant import LoadedVariant, load_variant
from models.writing import write_variant

FORMATS = ("merged", "onnx", "onnx-int8")
# Parity tolerances per format live in models.golden (EXPORT_TOLERANCE) with the load-time ones.
TOLERANCE = EXPORT_TOLERANCE
# What each format can be made from.
SOURCES = {"merged": ("lora",), "onnx": ("full", "merged"), "onnx-int8": ("full", "merged", "onnx")}


class ExportRefused(Exception):
    """An export that failed its parity check or cannot be made from this source; nothing was registered."""


def default_name(source: str, source_kind: str, fmt: str) -> str:
    if fmt == "onnx-int8" and source_kind == "onnx" and source.endswith("-onnx"):
        return f"{source}-int8"
    return f"{source}-{fmt}"


def check_parity(source: Manifest, logits: Any, fmt: str, tolerance: float | None) -> Parity:
    """Compare an export's golden logits with the source's; raise ExportRefused when out of tolerance."""
    max_abs, agreement, tol, passed = export_parity(source, logits, fmt, tolerance)
    if not passed:
        raise ExportRefused(
            f"{fmt} export of '{source.name}' failed parity on {len(source.golden.texts)} golden texts: "
            f"max |Δlogit| {max_abs:.3g} (tolerance {'none' if tol is None else f'{tol:g}'}), "
            f"argmax agreement {agreement:.1%}; "
            "not registered — check the source variant and the exporter versions"
        )
    return Parity(
        source=source.name, max_abs_logit_diff=max_abs, argmax_agreement=agreement, tolerance=tol, passed=passed
    )


def export(
    store: Store,
    source: str,
    fmt: str,
    *,
    name: str | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Make `fmt` from variant `source`, check parity, register it atomically; return its manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {list(FORMATS)}")
    src = store.verify(source)
    if src.kind not in SOURCES[fmt]:
        raise ExportRefused(
            f"cannot make {fmt} from '{source}' (kind {src.kind}); "
            f"{fmt} is made from a {' or '.join(SOURCES[fmt])} variant"
        )
    name = name or default_name(source, src.kind, fmt)
    if name in store.names() and not overwrite:
        raise FileExistsError(f"variant '{name}' already exists; pass --name NEW, or --overwrite to replace it")
    if fmt == "merged":
        return _merged(store, src, name, tolerance, overwrite)
    return _onnx(store, src, name, fmt, tolerance, overwrite)


def _provenance(src: Manifest, tool: str) -> dict[str, Any]:
    return {
        "exported_from": src.name,
        "tool": tool,
        "git": git_info(),
        "versions": package_versions(),
        "source_provenance": src.provenance,
    }


def _merged(store: Store, src: Manifest, name: str, tol: float | None, overwrite: bool) -> Manifest:
    lora = load_variant(store, src.name, manifest=src)
    model = lora.model.merge_and_unload()
    tokenizer = lora.tokenizer
    merged = LoadedVariant(
        name, src.model_copy(update={"kind": "merged"}), store.path(src.name), tokenizer, model=model
    )
    parity = check_parity(src, merged.logits(src.golden.texts), "merged", tol)
    return write_variant(
        store,
        name=name,
        kind="merged",
        model=model,
        tokenizer=tokenizer,
        labels=src.labels,
        max_length=src.max_length,
        base_model=src.base_model,
        base_fingerprint=src.base_fingerprint,
        init=src.init,
        golden_texts=src.golden.texts,
        metrics={},
        source=src.name,
        parity=parity,
        provenance=_provenance(src, "peft merge_and_unload"),
        overwrite=overwrite,
    )


def _onnx(store: Store, src: Manifest, name: str, fmt: str, tol: float | None, overwrite: bool) -> Manifest:
    from optimum.exporters.onnx import main_export

    src_path = store.path(src.name)
    # the fp32 export to quantise, or the copy of an ONNX source: a temporary directory of the store like the
    # variant's own, locked while this runs, so a killed export's is removed by a later writer (models.atomic)
    with temp_dir(store.root / name, tag="export") as scratch, store.writing(name, overwrite=overwrite) as tmp:
        fp32_dir = tmp if fmt == "onnx" else scratch
        if src.kind == "onnx":
            # A copy, never the source itself: quantize_dynamic writes `model-inferred.onnx` beside its
            # input (onnxruntime's shape inference) — in the source variant, which verify then refuses
            # for that unlisted file while it exists, and for good if the export dies before removing it.
            shutil.copytree(src_path, scratch, dirs_exist_ok=True)
            fp32_dir = scratch
        else:
            with warnings.catch_warnings():  # torch.jit tracer warnings about constant masks are expected
                warnings.simplefilter("ignore")
                main_export(str(src_path), output=str(fp32_dir), task="text-classification", do_validation=False)
        if fmt == "onnx-int8":
            # onnxruntime's dynamic quantisation: int8 weights, activations quantised at run time.
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(Path(fp32_dir) / ONNX_FILE), str(tmp / ONNX_FILE), weight_type=QuantType.QInt8)
            for p in Path(fp32_dir).iterdir():
                if p.is_file() and p.suffix in (".json", ".txt") and p.name != "manifest.json":
                    shutil.copy2(p, tmp / p.name)
        # The export as it will be loaded: int8 golden texts are scored one per batch (models.golden).
        draft = src.model_copy(update={"name": name, "kind": fmt, "source": src.name})
        onnx = LoadedVariant(name, draft, tmp, load_tokenizer(tmp), session=onnx_session(tmp))
        golden = make_golden(onnx, src.golden.texts)
        parity = check_parity(src, torch.tensor(golden.logits), fmt, tol)
        manifest = Manifest(
            name=name,
            kind=fmt,
            architecture=src.architecture,
            base_model=src.base_model,
            base_fingerprint=src.base_fingerprint,
            init=src.init,
            labels=src.labels,
            max_length=src.max_length,
            golden=golden,
            source=src.name,
            parity=parity,
            provenance=_provenance(
                src, "optimum main_export" + (" + onnxruntime quantize_dynamic" if fmt == "onnx-int8" else "")
            ),
        )
        store.commit(tmp, manifest)
    return store.manifest(name)
