"""Real pretrained MiniLM, bounded: full fine-tuning learns AG News well above chance in 50 small steps."""

from __future__ import annotations

import json

import pytest
from tiny import AGNEWS, MINILM

from training.__main__ import main


@pytest.mark.slow
def test_minilm_full_learns_agnews(tmp_path, capsys):
    # 50 steps x 16 rows (~15 s alone on 2 cores, ~60 s when shared), then 400 stratified test rows.
    code = main([
        "train", "configs/demo-minilm-full.yaml", "--set", f"data={AGNEWS}", f"base_model={MINILM}",
        "max_steps=50", "batch_size=16", "eval_every=0", "train_subset=2000", "val_subset=200",
        "test_subset=400", "--store", str(tmp_path / "store"), "--runs-dir", str(tmp_path / "runs"),
        "--name", "slow-full",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "runs" / "slow-full.json").read_text())["train_info"]
    assert info["test"]["n"] == 400 and info["samples_seen"] == 50 * 16
    assert info["test_accuracy"] > 0.7, info["test_accuracy"]  # chance is 0.25; ~0.85 measured
    assert info["trainable_params"] == info["total_params"] == 22_713_216 + 384 * 4 + 4  # MiniLM-L6 + head
