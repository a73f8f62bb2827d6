"""Training configuration: typed dataclasses, YAML loading, `--set` overrides, whole-config validation.

Defaults live here, one comment per field (nanoGPT style). Unknown keys are an error, and
`validate` reports every problem at once with what to do (torchtune style).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

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


class ConfigError(ValueError):
    """A config with one or more problems; `problems` lists them all."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  - " + "\n  - ".join(self.problems))


@dataclass
class LoraArgs:
    r: int = 8  # rank of the low-rank update
    alpha: int = 16  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.1  # dropout on the LoRA input
    targets: list[str] = field(default_factory=lambda: ["query", "value"])  # attention projections adapted


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------
    name: str = ""  # store variant name; defaults to the config file's stem
    method: Literal["full", "lora"] = "full"  # see training.methods.METHODS
    base_model: str = "roberta-large"  # Hub id or local path of the pretrained encoder
    init: Literal["pretrained", "random"] = "pretrained"  # random: build `arch_preset` with random weights
    arch_preset: str | None = None  # architecture for init=random: one of ARCH_PRESETS
    arch: dict[str, Any] = field(default_factory=dict)  # overrides of the preset, e.g. num_hidden_layers: 2
    tokenizer: str | None = None  # tokenizer path/id; defaults to base_model (needed for random init)
    # --- data ----------------------------------------------------------------------------
    data: str = "fancyzhx/ag_news"  # Hub dataset id, or a local directory / .parquet / .csv / .jsonl file
    text_column: str = "text"  # column holding the input text
    label_column: str = "label"  # column holding the class index (0..n-1) or label name
    labels: list[str] = field(default_factory=lambda: list(AG_NEWS_LABELS))  # names, order = class index
    max_length: int = 256  # tokens per text after truncation (AG News: mean ~56, tail ~200)
    val_fraction: float = 0.05  # stratified validation split carved from train (never the test split)
    train_subset: int | None = None  # cap on training rows (stratified sample); None = all
    test_subset: int | None = None  # cap on test rows evaluated at the end (stratified); None = all
    eval_test: bool = True  # evaluate the test split once at the end with the best checkpoint
    golden_per_class: int = 8  # golden-set texts per class (fixed indices of the test split)
    # --- optimisation --------------------------------------------------------------------
    batch_size: int = 16  # sequences per micro-batch
    eval_batch_size: int = 64  # sequences per evaluation batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float | None = None  # peak learning rate; None = the method's default
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases / LayerNorm)
    warmup_ratio: float = 0.06  # fraction of steps with linear warmup, then linear decay to 0
    max_grad_norm: float = 1.0  # gradient clipping
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast precision (bf16 works on this CPU)
    length_grouping: bool = True  # batch texts of similar length together (pads far less)
    seed: int = 42  # seeds init, split, shuffling and dropout
    # --- evaluation, checkpoints ---------------------------------------------------------
    eval_every: int = 0  # validation every N optimizer steps (0 = only at the end); best by macro-F1
    val_subset: int | None = None  # cap on validation rows (stratified); None = all
    checkpoint_every: int = 0  # resumable checkpoint every N optimizer steps (0 = none)
    lora: LoraArgs = field(default_factory=LoraArgs)  # used when method = lora

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.base_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """`key=value` pairs (dotted keys for nested fields) -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out, problems


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict) and k != "arch":
            merged[k] = _merge(merged[k], v)
        elif isinstance(v, dict) and k == "arch" and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


def _check_type(name: str, value: Any, tp: Any) -> str | None:
    """None when `value` fits `tp` (ints accepted for floats); else a problem string."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return None
    if origin is Literal:
        return None if value in args else f"{name}: {value!r} is not one of {list(args)}"
    if origin is not None and type(None) in args:  # Optional[...]
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _check_type(name, value, rest[0])
    if origin is list:
        if not isinstance(value, list):
            return f"{name}: expected a list, got {value!r}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else f"{name}: expected a mapping, got {value!r}"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{name}: expected a number, got {value!r}"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name}: expected an integer, got {value!r}"
    if tp is bool:
        return None if isinstance(value, bool) else f"{name}: expected true/false, got {value!r}"
    if tp is str:
        return None if isinstance(value, str) else f"{name}: expected a string, got {value!r}"
    return None


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {sorted(names)}"
            problems.append(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(
                    f"{prefix}{f.name}: expected a mapping of {sorted(x.name for x in dataclasses.fields(tp))}"
                )
                continue
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.", problems)
            continue
        if get_origin(tp) is not Literal and (tp is float or float in get_args(tp)):
            # YAML 1.1 reads `5e-4` (no dot) as a string; accept it as the number it means.
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = float(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
        problem = _check_type(prefix + f.name, value, tp)
        if problem:
            problems.append(problem)
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def validate(cfg: TrainConfig) -> list[str]:
    """Every semantic problem of a config (types were checked while building it)."""
    from training.methods import METHODS

    p = []
    if cfg.method not in METHODS:
        p.append(f"method: {cfg.method!r} is not one of {sorted(METHODS)}")
    if cfg.init == "random" and not cfg.arch_preset and "model_type" not in cfg.arch:
        p.append(
            f"init: random needs arch_preset (one of {sorted(ARCH_PRESETS)}) or arch.model_type "
            "(or base_model naming a preset)"
        )
    if cfg.arch_preset is not None and cfg.arch_preset not in ARCH_PRESETS:
        p.append(f"arch_preset: {cfg.arch_preset!r} is not one of {sorted(ARCH_PRESETS)}")
    if cfg.arch and cfg.init != "random":
        p.append("arch: overrides apply only with init: random (a pretrained model keeps its architecture)")
    if cfg.name:
        from models.store import check_name

        try:
            check_name(cfg.name)
        except ValueError as e:
            p.append(f"name: {e}")
    if len(cfg.labels) < 2:
        p.append(f"labels: need at least 2 label names, got {cfg.labels}")
    if len(set(cfg.labels)) != len(cfg.labels):
        p.append(f"labels: names must be unique, got {cfg.labels}")
    if not 8 <= cfg.max_length <= 4096:
        p.append(f"max_length: {cfg.max_length} is outside 8..4096")
    if not 0.0 < cfg.val_fraction < 0.5:
        p.append(f"val_fraction: {cfg.val_fraction} must be in (0, 0.5)")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "golden_per_class"):
        if getattr(cfg, key) < 1:
            p.append(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("train_subset", "test_subset", "val_subset", "max_steps"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            p.append(f"{key}: must be >= 1 or null, got {v}")
    if cfg.max_steps is None and cfg.epochs <= 0:
        p.append(f"epochs: must be > 0 (or set max_steps), got {cfg.epochs}")
    if cfg.lr is not None and not 0 < cfg.lr < 1:
        p.append(f"lr: {cfg.lr} must be in (0, 1)")
    if not 0 <= cfg.weight_decay < 1:
        p.append(f"weight_decay: {cfg.weight_decay} must be in [0, 1)")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"warmup_ratio: {cfg.warmup_ratio} must be in [0, 1)")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(cfg, key) < 0:
            p.append(f"{key}: must be >= 0 (0 = off), got {getattr(cfg, key)}")
    if cfg.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            p.append("precision: fp16 autocast needs a CUDA GPU; use bf16 (or fp32) on CPU")
    if cfg.method == "lora":
        if cfg.lora.r < 1:
            p.append(f"lora.r: must be >= 1, got {cfg.lora.r}")
        if cfg.lora.alpha < 1:
            p.append(f"lora.alpha: must be >= 1, got {cfg.lora.alpha}")
        if not 0 <= cfg.lora.dropout < 1:
            p.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
        if not cfg.lora.targets:
            p.append("lora.targets: list at least one module name, e.g. [query, value]")
    # Local paths must exist; anything else is treated as a Hub id (checked when loading).
    if _looks_local(cfg.data) and not Path(cfg.data).exists():
        p.append(f"data: {cfg.data} does not exist; give a Hub id (fancyzhx/ag_news) or an existing dir/file")
    for key in ("base_model", "tokenizer"):
        v = getattr(cfg, key)
        if key == "base_model" and cfg.init == "random":
            continue
        if v and _looks_local(v) and not Path(v).exists():
            p.append(f"{key}: {v} does not exist; give a local path or a Hub id")
    if cfg.init == "random" and not cfg.tokenizer:
        p.append("tokenizer: init: random needs a tokenizer path (e.g. ../shared/models/all-MiniLM-L6-v2)")
    return p


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".parquet", ".csv", ".jsonl", ".json")) or Path(s).exists()


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read YAML (or defaults when `path` is None), apply `--set` overrides, expand ${ENV},
    build and validate. Raises ConfigError listing every problem."""
    problems: list[str] = []
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
    over, over_problems = parse_overrides(overrides)
    problems += over_problems
    data = expand_env(_merge(data, over))
    cfg = _build(TrainConfig, data, "", problems)
    if not cfg.name and path is not None:
        cfg.name = Path(path).stem
    if cfg.init == "random" and cfg.arch_preset is None and cfg.base_model in ARCH_PRESETS:
        cfg.arch_preset = cfg.base_model  # `base_model: roberta-large` + `init: random` means that preset
    problems += validate(cfg)
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
