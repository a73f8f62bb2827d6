"""The model-store contract shared by training, service and benchmarks.

A store is a directory of variants (see `models.store`); each variant carries a
`manifest.json` (see `models.manifest`). Load weights through `models.loading`.
"""

from models.heads import HEAD_MODULES, head_modules, head_out_features
from models.manifest import KINDS, SCHEMA_VERSION, Golden, Manifest, ManifestError, Parity
from models.store import Store, VariantInfo, VariantNotFound, VariantRefused, check_name, dir_bytes

__all__ = [
    "HEAD_MODULES",
    "KINDS",
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
]
