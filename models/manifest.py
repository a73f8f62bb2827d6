"""manifest.json: the single source of truth about one variant in the store.

Label names (order = class index), max length, base fingerprint and golden-set logits live
here and nowhere else; training writes it, the service and benchmarks only read it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Shared base snapshots live in STORE/_bases; no variant may take that name (see models.store).
BASES_DIR = "_bases"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Kind = Literal["full", "lora", "merged", "onnx", "onnx-int8"]
KINDS: tuple[str, ...] = ("full", "lora", "merged", "onnx", "onnx-int8")
Init = Literal["pretrained", "random"]


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or invalid; the message says what to fix."""


def check_name(name: str) -> None:
    """Variant names become directory names and URL path segments: keep them plain.

    Lives here (not in models.store) so that the manifest can validate its own name without
    importing the store, which imports this module: no import circle.
    """
    if not _NAME_RE.match(name or "") or name.startswith(BASES_DIR):
        raise ValueError(
            f"invalid variant name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


class Golden(BaseModel):
    """Fixed texts (from the test split) and the logits the variant produced for them.

    Every export and every adapter load is checked against these numbers.
    """

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1)
    logits: list[list[float]]
    # Precision the reference logits were computed in; always fp32 at creation.
    dtype: str = "float32"
    # True when each text was scored in a batch of its own (dynamic int8 quantisation derives
    # activation scales from the whole batch, so its logits depend on the batch's other texts).
    # Manifests written before this field existed scored the set in batches of 32 (see models.golden).
    one_per_batch: bool = False

    @model_validator(mode="after")
    def _shape(self) -> Golden:
        if len(self.logits) != len(self.texts):
            raise ValueError(f"golden: {len(self.texts)} texts but {len(self.logits)} logit rows")
        widths = {len(row) for row in self.logits}
        if len(widths) > 1:
            raise ValueError(f"golden: logit rows have different widths {sorted(widths)}")
        return self


class Parity(BaseModel):
    """How an export compares with its source on the golden set."""

    model_config = ConfigDict(extra="forbid")

    source: str
    max_abs_logit_diff: float
    argmax_agreement: float
    tolerance: float | None = None  # None for int8: agreement is reported, not enforced
    passed: bool


class Manifest(BaseModel):
    """Everything the store knows about one variant.

    `files` maps every file in the variant directory (except this manifest) to its sha256;
    a variant whose files do not hash to these values is refused.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    kind: Kind
    architecture: str = Field(description="transformers model_type of the encoder, e.g. bert, roberta")
    base_model: str = Field(description="Hub id or path the base encoder came from")
    base_fingerprint: str = Field(description="sha256 over the base encoder weights (see models.fingerprint)")
    init: Init = "pretrained"
    labels: list[str] = Field(min_length=2)
    max_length: int = Field(gt=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    golden: Golden
    source: str | None = Field(default=None, description="variant this one was exported from")
    parity: Parity | None = None
    provenance: dict[str, Any] = Field(default_factory=dict, description="config, git sha, package versions")
    created_at: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_name(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        width = len(self.golden.logits[0]) if self.golden.logits else len(self.labels)
        if width != len(self.labels):
            raise ValueError(f"golden logits have {width} columns but there are {len(self.labels)} labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label names must be unique: {self.labels}")
        if self.kind in ("merged", "onnx", "onnx-int8") and not self.source:
            raise ValueError(f"a {self.kind} variant must name its source variant")
        return self

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path} is missing: this directory is not a store variant")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); re-export the variant") from e
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ManifestError(
                f"{path} has schema_version {data.get('schema_version')}, this code reads "
                f"{SCHEMA_VERSION}; re-export the variant with this version"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors())
            raise ManifestError(f"{path} is invalid: {problems}") from e
