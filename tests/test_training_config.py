"""Config: every shipped config validates; overrides, env expansion, all problems reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ARCH_PRESETS, ConfigError, TrainConfig, load_config
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


def test_all_problems_are_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: qlora\nlearning_rate: 0.1\nbatch_size: 0\nlr: 3\nval_fraction: 0.9\n"
        "data: ./missing-dir\nlora: {r: 0, rank: 4}\nprecision: fp8\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["init=random", "base_model=my-encoder", "max_length=abc"])
    problems = e.value.problems
    expected = [
        "method: 'qlora' is not one of ['full', 'lora']",
        "unknown key 'learning_rate'",
        "batch_size: must be >= 1",
        "lr: 3.0 must be in (0, 1)",
        "val_fraction: 0.9",
        "data: ./missing-dir does not exist",
        "unknown key 'lora.rank'",
        "precision: 'fp8' is not one of",
        "init: random needs arch_preset",
        "max_length: expected an integer",
        "tokenizer: init: random needs a tokenizer path",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected), problems
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("configs/tiny-bert-full.yaml", ["lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
