"""The model-store contract shared by training, service and benchmarks.

A store is a directory of variants (see `models.store`); each variant carries a
`manifest.json` (see `models.manifest`). Load a variant of any kind with
`models.load_variant(store, name, dtype=..., device=...)` (see `models.variant`); golden checks
and their tolerances are in `models.golden`, the atomic directory writer in `models.atomic`.
"""

from typing import Any

from models.heads import HEAD_MODULES, head_modules, head_out_features
from models.manifest import KINDS, SCHEMA_VERSION, Golden, Manifest, ManifestError, Parity
from models.store import Store, VariantInfo, VariantNotFound, VariantRefused, check_name, dir_bytes

__all__ = [
    "HEAD_MODULES",
    "KINDS",
    "LoadedVariant",
    "SCHEMA_VERSION",
    "Golden",
    "Manifest",
    "ManifestError",
    "Parity",
    "Store",
    "VariantInfo",
    "VariantNotFound",
    "VariantRefused",
    "check_name",
    "dir_bytes",
    "head_modules",
    "head_out_features",
    "load_variant",
]


def __getattr__(name: str) -> Any:
    # Lazy: models.variant imports torch and transformers; `import models` (manifests, store
    # listing, the report) stays light until a variant is actually loaded.
    if name in ("load_variant", "LoadedVariant"):
        from models import variant

        return getattr(variant, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
