"""Config: every shipped config validates; overrides, env expansion, all problems reported at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from training.__main__ import main
from training.config import ARCH_PRESETS, ConfigError, TrainConfig, config_keys, load_config
from training.methods import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {
        "agnews-roberta-large-full.yaml",
        "agnews-roberta-large-lora.yaml",
        "demo-minilm-full.yaml",
        "demo-minilm-lora.yaml",
        "speed-roberta-base-random-lora.yaml",
        "tiny-bert-full.yaml",
        "tiny-bert-lora.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python -m training train configs/"), "each YAML opens with the command that runs it"
    cfg = load_config(path)
    assert cfg.name and cfg.method in METHODS
    if cfg.init == "random":
        assert cfg.arch_preset in ARCH_PRESETS and cfg.tokenizer
    if not path.name.startswith("agnews-"):  # CPU configs: precision from the hardware they meet
        assert cfg.precision == "auto"


def test_study_and_demo_settings():
    full = load_config("configs/agnews-roberta-large-full.yaml")
    lora = load_config("configs/agnews-roberta-large-lora.yaml")
    assert (full.base_model, full.data, full.lr, full.weight_decay, full.warmup_ratio) == (
        "roberta-large",
        "fancyzhx/ag_news",
        2e-5,
        0.01,
        0.06,
    )
    assert (lora.lr, lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.lora.targets) == (
        4e-4,
        8,
        16,
        0.1,
        ["query", "value"],
    )
    demo_full = load_config("configs/demo-minilm-full.yaml")
    demo_lora = load_config("configs/demo-minilm-lora.yaml")
    assert demo_full.max_steps == demo_lora.max_steps and demo_full.batch_size == demo_lora.batch_size
    assert (demo_full.name, demo_lora.name) == ("minilm-full", "minilm-lora-r8")
    large = load_config("configs/speed-roberta-base-random-lora.yaml", ["arch_preset=roberta-large"])
    assert ARCH_PRESETS["roberta-large"] == dict(
        model_type="roberta",
        num_hidden_layers=24,
        hidden_size=1024,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
    )
    assert large.init == "random"


def test_overrides_and_env_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("AGNEWS_DATA", str(tmp_path))
    cfg = load_config(
        "configs/demo-minilm-lora.yaml",
        ["lora.r=16", "lr=5e-4", "lora.targets=[query,key,value]", "eval_test=false", "max_steps=7"],
    )
    assert cfg.data == str(tmp_path)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lr, cfg.lora.targets, cfg.eval_test, cfg.max_steps) == (
        16,
        16,
        5e-4,
        ["query", "key", "value"],
        False,
        7,
    )
    monkeypatch.delenv("AGNEWS_DATA")
    assert load_config("configs/demo-minilm-lora.yaml").data == "../shared/data/ag_news"
    assert TrainConfig().lr is None and METHODS["full"].default_lr == 2e-5 and METHODS["lora"].default_lr == 4e-4


def test_a_mistyped_base_model_is_one_of_the_problems_not_a_crash():
    with pytest.raises(ConfigError) as e:  # was: TypeError (a list looked up among the arch presets)
        load_config(None, ["init=random", "base_model=[a]", "batch_size=0"])
    assert {p.split(":")[0] for p in e.value.problems} >= {"base_model", "batch_size"}


def test_all_problems_are_reported_at_once(tmp_path):
    """Field errors (pydantic), unknown keys at any depth and cross-field checks: one error lists all."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: qlora\nlearning_rate: 0.1\nbatch_size: 0\nlr: 3\nval_fraction: 0.9\n"
        "data: ./missing-dir\nlora: {r: 0, rank: 4, alpah: 8}\nprecision: fp8\ncompile: maybe\nmax_stesp: 5\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["init=random", "base_model=my-encoder", "max_length=abc", "bad-override"])
    problems = e.value.problems
    expected = [
        "--set 'bad-override': expected key=value",
        "method: 'qlora' is not one of ['full', 'lora']",
        "unknown key 'learning_rate' (did you mean 'lr'?)",
        "unknown key 'max_stesp' (did you mean 'max_steps'?)",
        "batch_size: must be >= 1, got 0",
        "lr: 3.0 must be in (0, 1)",
        "val_fraction: 0.9 must be in (0, 0.5)",
        "data: ./missing-dir does not exist",
        "lora.r: must be >= 1, got 0",
        "unknown key 'lora.rank' (did you mean 'r'?)",
        "unknown key 'lora.alpah' (did you mean 'alpha'?)",
        "precision: 'fp8' is not one of ['auto', 'fp32', 'bf16', 'fp16']",
        "compile: expected 'auto' or true/false, got 'maybe'",
        "init: random needs arch_preset",
        "max_length: expected an integer, got 'abc'",
        "tokenizer: init: random needs a tokenizer path",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected), problems
    assert str(e.value).startswith(f"{bad}: {len(expected)} problem(s):")
    # An unknown key far from every known one lists them instead of guessing.
    with pytest.raises(ConfigError, match=r"unknown key 'lora.zzz'; known keys: alpha, dropout, r, targets"):
        load_config("configs/tiny-bert-lora.yaml", ["lora.zzz=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("configs/tiny-bert-full.yaml", ["lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cross_field_checks_are_pydantic_validators():
    """Direct construction runs the same checks (the CLI is not the only gate)."""
    with pytest.raises(ValidationError, match="init: random needs a tokenizer path"):
        TrainConfig(init="random", arch_preset="tiny-bert")
    with pytest.raises(ValidationError, match="not one of"):
        TrainConfig(method="qlora")
    with pytest.raises(ValidationError, match="labels: names must be unique"):
        TrainConfig(labels=["a", "a"])
    assert TrainConfig(init="random", base_model="tiny-bert", tokenizer="t").arch_preset == "tiny-bert"


def test_precision_and_compile_defaults(monkeypatch):
    cfg = TrainConfig()
    assert (cfg.precision, cfg.compile, cfg.log_every) == ("auto", "auto", 10)
    cfg = load_config("configs/tiny-bert-full.yaml", ["precision=auto", "compile=false", "log_every=5"])
    assert (cfg.precision, cfg.compile, cfg.log_every) == ("auto", False, 5)
    assert load_config("configs/tiny-bert-full.yaml", ["compile=true"]).compile is True
    with pytest.raises(ConfigError, match="log_every: must be >= 1, got 0"):
        load_config("configs/tiny-bert-full.yaml", ["log_every=0"])
    # fp16 needs CUDA only when asked for explicitly; auto never fails validation.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="precision: fp16 autocast needs a CUDA GPU"):
        load_config("configs/tiny-bert-full.yaml", ["precision=fp16"])
    assert load_config("configs/tiny-bert-full.yaml", ["precision=auto"]).precision == "auto"


def test_dotted_overrides_and_env_values(monkeypatch, tmp_path):
    monkeypatch.setenv("STEPS", "12")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "method: lora\nbase_model: tiny-bert\ninit: random\ntokenizer: tok\nmax_steps: ${STEPS:-3}\n"
        "eval_every: ${UNSET_EVAL_EVERY:-4}\nlora: {r: 2, alpha: 4}\narch: {num_hidden_layers: 1}\n"
    )
    cfg = load_config(cfg_file, ["lora.r=16", "arch.hidden_size=64", "name=2024", "lora.dropout=0"])
    # env values arrive as strings and are validated as the field's type
    assert (cfg.max_steps, cfg.eval_every) == (12, 4)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 4, 0.0)
    assert cfg.arch == {"num_hidden_layers": 1, "hidden_size": 64} and cfg.arch_preset == "tiny-bert"
    assert cfg.name == "2024"  # a YAML number is a fine variant name
    assert load_config(cfg_file).name == "run"  # default: the file's stem
    with pytest.raises(ConfigError, match="lora was set to a value, not a mapping"):
        load_config(cfg_file, ["lora=3", "lora.r=2"])


def test_help_lists_every_key_with_its_description(capsys):
    keys = {k: (default, doc) for k, default, doc in config_keys()}
    assert keys["lora.r"] == (8, "rank of the low-rank update")
    assert keys["precision"][0] == "auto" and "resolve_precision" in keys["precision"][1]
    assert all(doc for _, doc in keys.values()), [k for k, (_, d) in keys.items() if not d]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "lora.r = 8" in out and "rank of the low-rank update" in out and "log_every = 10" in out


def test_a_tilde_base_model_is_expanded(tmp_path, monkeypatch):
    """`base_model: ~/minilm` (existing) was refused as 'does not exist'."""
    import os

    (tmp_path / "minilm").symlink_to(os.environ.get("BASE_MODEL", "/work/shared/models/all-MiniLM-L6-v2"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        "configs/tiny-bert-full.yaml", ["init=pretrained", "arch_preset=null", "tokenizer=null", "base_model=~/minilm"]
    )
    assert cfg.base_model == str(tmp_path / "minilm")


def test_a_hub_id_not_in_the_cache_offline_is_one_line_saying_what_to_do(tmp_path, monkeypatch, capsys):
    """It was transformers' 54-line OSError traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = ["max_steps=1", "init=pretrained", "arch_preset=null", "tokenizer=null", "base_model=no-such-org/no-such"]
    rc = main(
        [
            "train",
            "configs/tiny-bert-full.yaml",
            "--store",
            str(tmp_path / "s"),
            "--runs-dir",
            str(tmp_path / "r"),
            "--set",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "no-such-org/no-such: not a local model directory" in err and "huggingface-cli download" in err


def test_arch_overrides_are_checked_against_the_model_type():
    """transformers' configs take any keyword: a misspelt arch key silently built the preset unchanged, and
    arch.num_labels crashed the build with a TypeError (a duplicate keyword beside `labels`)."""
    with pytest.raises(ConfigError) as e:
        load_config(
            "configs/tiny-bert-full.yaml",
            ["arch.num_hiden_layers=1", "arch.num_labels=3", "arch.zzz=1", "batch_size=0"],
        )
    assert e.value.problems == [
        "batch_size: must be >= 1, got 0",
        "unknown key 'arch.num_hiden_layers' for model_type bert (did you mean 'num_hidden_layers'?)",
        "arch.num_labels: set by labels (num_labels, id2label, label2id come from it); remove it",
        "unknown key 'arch.zzz' for model_type bert (BertConfig has no such setting)",
    ]
    with pytest.raises(ConfigError, match=r"arch.model_type: 'robertaa' is not a transformers model type \(did you"):
        load_config("configs/tiny-bert-full.yaml", ["arch.model_type=robertaa"])
    ok = [
        "arch.model_type=roberta",
        "arch.num_hidden_layers=1",
        "arch.hidden_dropout_prob=0",
        "arch.classifier_dropout=0.2",
    ]
    assert load_config("configs/tiny-bert-full.yaml", ok).arch["num_hidden_layers"] == 1


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_epochs_must_be_a_finite_number(value):
    """`epochs: .inf` passed validation and the run died computing its step count (OverflowError traceback)."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny-bert-full.yaml", ["max_steps=null", f"epochs={value}"])
    assert e.value.problems == [f"epochs: expected a finite number, got {float(value[1:])!r}"]


def test_an_arch_preset_with_a_pretrained_init_is_an_error_reported_with_the_rest():
    """`arch_preset` with `init: pretrained` built nothing (the pretrained base_model is loaded) yet was
    recorded in the results config and the manifest's provenance; `arch` there was already an error."""
    base = os.environ.get("BASE_MODEL", "/work/shared/models/all-MiniLM-L6-v2")
    pretrained = ["init=pretrained", "tokenizer=null", f"base_model={base}"]
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny-bert-full.yaml", [*pretrained, "arch.num_hidden_layers=1", "batch_size=0"])
    assert e.value.problems == [
        "batch_size: must be >= 1, got 0",
        "arch_preset: 'tiny-bert' applies only with init: random (a pretrained model is base_model's "
        "architecture); remove it (--set arch_preset=null) or set init: random",
        "arch: overrides apply only with init: random (a pretrained model keeps its architecture)",
    ]
    assert load_config("configs/tiny-bert-full.yaml", [*pretrained, "arch_preset=null"]).arch_preset is None
    assert load_config("configs/tiny-bert-full.yaml").arch_preset == "tiny-bert"  # init: random keeps it
