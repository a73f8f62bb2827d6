"""Training configuration: one pydantic model, YAML loading, `--set` overrides, whole-config validation.

Defaults live here, one `description` per field (nanoGPT style; `python -m training train --help`
prints them). Unknown keys are an error with a "did you mean", and `load_config` reports every
problem at once, each saying what to do (torchtune style): pydantic's field errors and the
cross-field checks are collected into one `ConfigError`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from models.store import check_name
from training.methods import METHODS

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]

# Published architectures for `init: random` (RoBERTa cannot be downloaded here); `arch`
# overrides any entry. The tiny presets make test models in-process.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "roberta-large": dict(
        model_type="roberta",
        num_hidden_layers=24,
        hidden_size=1024,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
    ),
    "roberta-base": dict(
        model_type="roberta",
        num_hidden_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=50265,
        max_position_embeddings=514,
    ),
    "tiny-roberta": dict(
        model_type="roberta",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=30522,
        max_position_embeddings=130,
    ),
    "tiny-bert": dict(
        model_type="bert",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=30522,
        max_position_embeddings=128,
    ),
}

# The error type of the cross-field checks: one pydantic error carrying every such problem.
_CHECKS = "config_checks"


class ConfigError(ValueError):
    """A config with one or more problems; `problems` lists them all."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  - " + "\n  - ".join(self.problems))


class _Strict(BaseModel):
    # extra=forbid: a misspelt key is an error, never silently ignored. Numbers are accepted for
    # strings so that `--set name=2024` names a variant "2024".
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class LoraArgs(_Strict):
    r: int = Field(8, ge=1, description="rank of the low-rank update")
    alpha: int = Field(16, ge=1, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="module names adapted (attention projections), e.g. [query, value]",
    )


class TrainConfig(_Strict):
    """One training run. Build it with `load_config` (YAML + `--set`) or directly with keywords."""

    # --- what to train -------------------------------------------------------------------
    name: str = Field("", description="store variant name; defaults to the config file's stem")
    method: str = Field("full", description=f"fine-tuning method, one of training.methods.METHODS: {sorted(METHODS)}")
    base_model: str = Field("roberta-large", description="Hub id or local path of the pretrained encoder")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: build `arch_preset` with random weights (speed work and tests)"
    )
    arch_preset: str | None = Field(
        None,
        description=f"architecture for init=random (an error with init=pretrained), one of {sorted(ARCH_PRESETS)}; "
        "default: base_model",
    )
    arch: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the preset for init=random, e.g. num_hidden_layers: 2"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer path/id; defaults to base_model (needed for init=random)"
    )
    # --- data ----------------------------------------------------------------------------
    data: str = Field(
        "fancyzhx/ag_news", description="Hub dataset id, or a local directory / .parquet / .csv / .jsonl / .json file"
    )
    text_column: str = Field("text", description="column holding the input text")
    label_column: str = Field("label", description="column holding the class index (0..n-1) or label name")
    labels: list[str] = Field(
        default_factory=lambda: list(AG_NEWS_LABELS), min_length=2, description="label names, order = class index"
    )
    max_length: int = Field(
        256, ge=8, le=4096, description="tokens per text after truncation (AG News: mean ~56, tail ~200)"
    )
    val_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="stratified validation split carved from train (never the test split)"
    )
    train_subset: int | None = Field(None, ge=1, description="cap on training rows (stratified sample); null = all")
    test_subset: int | None = Field(
        None, ge=1, description="cap on test rows evaluated at the end (stratified); null = all"
    )
    eval_test: bool = Field(True, description="evaluate the test split once at the end with the best checkpoint")
    golden_per_class: int = Field(8, ge=1, description="golden-set texts per class (fixed indices of the test split)")
    # --- optimisation --------------------------------------------------------------------
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    eval_batch_size: int = Field(64, ge=1, description="sequences per evaluation batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: float = Field(
        1.0, allow_inf_nan=False, description="passes over the training data (ignored when max_steps is set)"
    )
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    lr: float | None = Field(None, gt=0, lt=1, description="peak learning rate; null = the method's default_lr")
    weight_decay: float = Field(
        0.01, ge=0, lt=1, description="AdamW decoupled weight decay (not on biases / LayerNorm)"
    )
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="fraction of steps with linear warmup, then linear decay to 0"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="autocast precision; auto = models.hardware.resolve_precision (bf16 on CUDA or on a CPU "
        "with native bf16, else fp32); fp16 needs CUDA",
    )
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the train step; auto = only where it pays (decided by the loop)"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode when compiling; reduce-overhead replays forward and backward from "
        "CUDA graphs (CUDA only: no kernel launches from Python)",
    )
    length_grouping: bool = Field(True, description="batch texts of similar length together (pads far less)")
    seed: int = Field(42, description="seeds init, split, shuffling and dropout")
    # --- evaluation, logging, checkpoints ------------------------------------------------
    log_every: int = Field(
        10, ge=1, description="read loss/metrics back to the host every N optimizer steps (not every step)"
    )
    eval_every: int = Field(
        0, ge=0, description="validation every N optimizer steps (0 = only at the end); best by macro-F1"
    )
    val_subset: int | None = Field(None, ge=1, description="cap on validation rows (stratified); null = all")
    checkpoint_every: int = Field(0, ge=0, description="resumable checkpoint every N optimizer steps (0 = none)")
    save_variant: bool = Field(
        True,
        description="write the trained variant into the store; false = measure only (speed runs), results JSON still written",
    )
    lora: LoraArgs = Field(default_factory=LoraArgs, description="used when method = lora")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.base_model

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what results and manifests record)."""
        return self.model_dump()

    @model_validator(mode="before")
    @classmethod
    def _preset_from_base_model(cls, data: Any) -> Any:
        # `base_model: roberta-large` + `init: random` means that preset.
        preset_unset = isinstance(data, dict) and data.get("init") == "random" and data.get("arch_preset") is None
        if preset_unset and isinstance(data.get("base_model"), str) and data["base_model"] in ARCH_PRESETS:
            data = {**data, "arch_preset": data["base_model"]}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:  # the registry is the one list of methods
            raise ValueError(f"{v!r} is not one of {sorted(METHODS)}")
        return v

    @field_validator("arch_preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in ARCH_PRESETS:
            raise ValueError(f"{v!r} is not one of {sorted(ARCH_PRESETS)}")
        return v

    @field_validator("name")
    @classmethod
    def _store_name(cls, v: str) -> str:
        if v:
            check_name(v)  # raises ValueError saying what a store name may contain
        return v

    @field_validator("base_model", "tokenizer", "data")
    @classmethod
    def _expand_home(cls, v: str | None) -> str | None:
        return os.path.expanduser(v) if v and v.startswith("~") else v

    @model_validator(mode="after")
    def _cross_field_checks(self) -> TrainConfig:
        """Checks that span fields or the environment; all of them, raised as one error."""
        p = []
        if self.init == "random" and not self.arch_preset and "model_type" not in self.arch:
            p.append(
                f"init: random needs arch_preset (one of {sorted(ARCH_PRESETS)}) or arch.model_type "
                "(or base_model naming a preset)"
            )
        if self.arch_preset and self.init != "random":
            # it built nothing, yet the results config and the manifest's provenance recorded it
            p.append(
                f"arch_preset: {self.arch_preset!r} applies only with init: random (a pretrained model is "
                "base_model's architecture); remove it (--set arch_preset=null) or set init: random"
            )
        if self.arch and self.init != "random":
            p.append("arch: overrides apply only with init: random (a pretrained model keeps its architecture)")
        elif self.arch:
            p += _arch_problems(self.arch, self.arch_preset)
        if len(set(self.labels)) != len(self.labels):
            p.append(f"labels: names must be unique, got {self.labels}")
        if self.max_steps is None and self.epochs <= 0:
            p.append(f"epochs: must be > 0 (or set max_steps), got {self.epochs}")
        if self.precision == "fp16":  # explicit only: `auto` never resolves to fp16 on a CPU
            import torch

            if not torch.cuda.is_available():
                p.append("precision: fp16 autocast needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
        # Local paths must exist; anything else is treated as a Hub id (checked when loading).
        if _looks_local(self.data) and not Path(self.data).exists():
            p.append(f"data: {self.data} does not exist; give a Hub id (fancyzhx/ag_news) or an existing dir/file")
        for key in ("base_model", "tokenizer"):
            v = getattr(self, key)
            if key == "base_model" and self.init == "random":
                continue
            if v and _looks_local(v) and not Path(v).exists():
                p.append(f"{key}: {v} does not exist; give a local path or a Hub id")
        if self.init == "random" and not self.tokenizer:
            p.append("tokenizer: init: random needs a tokenizer path (e.g. ../shared/models/all-MiniLM-L6-v2)")
        if p:
            raise PydanticCustomError(_CHECKS, "{summary}", {"problems": p, "summary": "; ".join(p)})
        return self


# Set from `labels` (build_model passes them beside `arch`): in `arch` they would clash with those.
_ARCH_FROM_LABELS = ("num_labels", "id2label", "label2id")


def _arch_problems(arch: dict[str, Any], preset: str | None) -> list[str]:
    """Unknown keys of `arch` for its model type: transformers' configs take any keyword silently, so a
    misspelt `num_hiden_layers` would build the preset's architecture unchanged."""
    model_type = arch.get("model_type") or ARCH_PRESETS.get(preset or "", {}).get("model_type")
    if not isinstance(model_type, str):
        return []  # no model type: reported by the init: random check
    from transformers import CONFIG_MAPPING  # only when arch overrides are given (importing it takes ~1 s)

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else "; e.g. bert, roberta"
        return [f"arch.model_type: {model_type!r} is not a transformers model type{hint}"]
    defaults = CONFIG_MAPPING[model_type]()
    known = [*defaults.to_dict(), *defaults.attribute_map]
    problems = []
    for key in arch:
        if key in _ARCH_FROM_LABELS:
            problems.append(f"arch.{key}: set by labels ({', '.join(_ARCH_FROM_LABELS)} come from it); remove it")
        elif key != "model_type" and not hasattr(defaults, key):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"{type(defaults).__name__} has no such setting"
            problems.append(f"unknown key 'arch.{key}' for model_type {model_type} ({hint})")
    return problems


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".parquet", ".csv", ".jsonl", ".json")) or Path(s).exists()


def config_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, description) of every config key, nested models flattened (for --help/docs)."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from config_keys(ann, f"{prefix}{name}.")
        else:
            yield prefix + name, info.get_default(call_default_factory=True), info.description or ""


# ---- loading ---------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in strings (recursively), so `make demo` can point
    configs at its data and base model through AGNEWS_DATA / BASE_MODEL."""
    if isinstance(value, str):
        return _ENV_RE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def parse_overrides(items: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """`key=value` pairs (dotted keys for nested fields) -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {'.'.join(parents[: i + 1])} was set to a value, not a mapping")
                break
        else:
            node[leaf] = value
    return out, problems


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` onto `base`, nested mappings merged key by key (so `--set lora.r=16` keeps lora.alpha)."""
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


# ---- pydantic errors -> problems that say what to do ------------------------------------------
# Hand-written on purpose: pydantic's own lines ("Input should be greater than or equal to 1
# [type=greater_than_equal, input_value=0, input_type=int]") name neither the dotted key a user
# types with --set nor a close match for a misspelt key, and report a union field once per member.

_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true/false",
    "bool_type": "true/false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}

# Spellings from transformers / peft that difflib cannot relate to ours (`learning_rate` vs `lr`).
_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "max_seq_length": "max_length",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "model_name_or_path": "base_model",
    "dataset": "data",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "mixed_precision": "precision",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "checkpoint_every",
}


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close and _ALIASES.get(key.lower()) in known:
        close = [_ALIASES[key.lower()]]
    return f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(known))}"


def _walk(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel], Any]:
    """Dotted path of an error location, the model holding its last key, and that field's info
    (None for an unknown key). Union members add entries after a field (`literal['auto']`): dropped."""
    model: Any = TrainConfig
    holder: type[BaseModel] = TrainConfig
    info = None
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
            continue
        if model is None:
            break
        if item not in model.model_fields:
            return ".".join([*parts, str(item)]), model, None
        holder, info = model, model.model_fields[item]
        parts.append(item)
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return ".".join(parts), holder, info


def _allowed(ann: Any) -> list[Any]:
    """The literal values an annotation admits (`Literal["auto"] | bool` -> ["auto"])."""
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    return [v for a in get_args(ann) for v in _allowed(a)]


def _out_of_range(path: str, info: Any, got: Any) -> str:
    """`lr: 3.0 must be in (0, 1)` for two bounds, `batch_size: must be >= 1, got 0` for one."""
    lo = hi = None
    for m in info.metadata if info else ():
        if isinstance(m, (Gt, Ge)):
            lo = ("(", m.gt) if isinstance(m, Gt) else ("[", m.ge)
        elif isinstance(m, (Lt, Le)):
            hi = (")", m.lt) if isinstance(m, Lt) else ("]", m.le)
    if info is not None and float in (info.annotation, *get_args(info.annotation)) and isinstance(got, int):
        got = float(got)  # show the value as the number it was read as
    if lo and hi:
        return f"{path}: {got!r} must be in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if not (lo or hi):
        return f"{path}: {got!r} is out of range"
    sign, bound = lo or hi  # type: ignore[misc]
    op = {"(": ">", "[": ">=", ")": "<", "]": "<="}[sign]
    return f"{path}: must be {op} {bound}, got {got!r}"


def _problems(err: ValidationError) -> list[str]:
    """One line per problem; errors of one key (union members) merged into one line."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    out: list[str] = []
    for e in err.errors():
        if e["type"] == _CHECKS:
            out.extend(e["ctx"]["problems"])
            continue
        path, _, _ = _walk(e["loc"])
        by_path.setdefault(path, []).append(e)
    for path, errs in by_path.items():
        e = errs[0]
        _, holder, info = _walk(e["loc"])
        got = e["input"]
        if e["type"] == "extra_forbidden":
            leaf = path.rsplit(".", 1)[-1]
            out.append(f"unknown key '{path}'{_suggest(leaf, list(holder.model_fields))}")
        elif e["type"] in _RANGE:
            out.append(_out_of_range(path, info, got))
        elif e["type"] == "too_short":
            out.append(f"{path}: list at least {e['ctx']['min_length']} item(s), got {got!r}")
        elif e["type"] == "value_error":
            out.append(f"{path}: {e['ctx']['error']}")
        elif all(x["type"] in _EXPECTED or x["type"] == "literal_error" for x in errs):
            allowed = _allowed(info.annotation) if info else []
            wants = [_EXPECTED[x["type"]] for x in errs if x["type"] in _EXPECTED]
            if allowed and not wants:
                out.append(f"{path}: {got!r} is not one of {allowed}")
            else:
                wants = [repr(v) for v in allowed] + list(dict.fromkeys(wants))
                out.append(f"{path}: expected {' or '.join(wants)}, got {got!r}")
        else:
            out.append(f"{path}: {e['msg']} (got {got!r})")
    return out


def _without(data: dict[str, Any], loc: tuple[Any, ...]) -> None:
    """Remove the value at `loc` (as deep as it is a mapping) so the rest can still be checked."""
    node = data
    for i, item in enumerate(loc):
        if not isinstance(node, dict) or item not in node:
            return
        child = node[item]
        if i + 1 < len(loc) and isinstance(child, dict) and isinstance(loc[i + 1], str) and loc[i + 1] in child:
            node = child
            continue
        del node[item]
        return


def validate_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from plain data; raises ConfigError listing every problem.

    pydantic skips the cross-field checks when a field is invalid, so on field errors the checks are
    run once more on the data without the invalid values: one round trip reports everything."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        problems = _problems(e)
        if not any(x["type"] == _CHECKS for x in e.errors()):
            rest = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
            for x in e.errors():
                _without(rest, x["loc"])
            try:
                TrainConfig.model_validate(rest)
            except ValidationError as e2:
                problems += [p for x in e2.errors() if x["type"] == _CHECKS for p in x["ctx"]["problems"]]
        raise ConfigError(problems, source) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read YAML (or defaults when `path` is None), apply `--set` overrides, expand ${ENV},
    build and validate. Raises ConfigError listing every problem."""
    data: dict[str, Any] = {}
    source = str(path) if path else "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"{path} not found; pass a YAML file such as configs/demo-minilm-lora.yaml"], source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from e
        if not isinstance(data, dict):
            raise ConfigError(["the top level must be a mapping of keys to values"], source)
    over, problems = parse_overrides(overrides)
    data = expand_env(_merge(data, over))
    if not data.get("name") and path is not None:
        data["name"] = path.stem
    try:
        cfg = validate_dict(data, source)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def arch_config(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """Resolved architecture kwargs for init=random (preset + overrides + tokenizer's pad id)."""
    arch = dict(ARCH_PRESETS.get(cfg.arch_preset or "", {}))
    arch.update(cfg.arch)
    # The MiniLM WordPiece tokenizer pads with id 0; RoBERTa's position ids offset from pad id.
    arch["pad_token_id"] = tokenizer.pad_token_id
    arch["vocab_size"] = max(int(arch.get("vocab_size", 0)), len(tokenizer))
    return arch
