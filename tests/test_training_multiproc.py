"""Two real processes (accelerate launch, gloo on CPU) train exactly as one process with the same global batch."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file
from tiny import AGNEWS

from models import Store
from training.config import load_config
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]
# Dropout off: each process draws its own masks, which one process could not reproduce.
COMMON = [
    "max_steps=6",
    "eval_every=3",
    "log_every=1",
    "precision=fp32",
    "arch.hidden_dropout_prob=0",
    "arch.attention_probs_dropout_prob=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("agnews")
    # 107 rows -> 6 validation + 101 training: an epoch's last global batch is short and splits unevenly
    train_df = pd.read_parquet(AGNEWS / "train_subset_20k.parquet").groupby("label").head(28).head(107)
    train_df.to_parquet(d / "train.parquet")
    pd.read_parquet(AGNEWS / "test.parquet").groupby("label").head(10).to_parquet(d / "test.parquet")
    return d


def _launch_cmd(data_dir: Path, out: Path, *overrides: str) -> list[str]:
    """`accelerate launch` of two CPU processes training the tiny config into out/store and out/runs."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # torchrun underneath; on a machine without a GPU the loop joins the processes with gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "training",
        "train",
        "configs/tiny-bert-full.yaml",
        "--set",
        f"data={data_dir}",
        *overrides,
        "--store",
        str(out / "store"),
        "--runs-dir",
        str(out / "runs"),
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _launch_two(data_dir: Path, out: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = _launch_cmd(data_dir, out, *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**ENV, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, data_dir):
    per_process = 12  # x 2 processes = one process's 24; 101 rows -> 5 batches, the last one of 5 rows
    two = tmp_path / "two"
    proc = _launch_two(data_dir, two, f"batch_size={per_process}", *COMMON)
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and json.loads(reports[0])["variant"] == "tiny-bert-full"  # the main process only

    one = tmp_path / "one"
    cfg = load_config("configs/tiny-bert-full.yaml", [f"data={data_dir}", f"batch_size={2 * per_process}", *COMMON])
    train(cfg, store=Store(one / "store"), runs_dir=one / "runs")

    r1, r2 = (json.loads((d / "runs" / "tiny-bert-full.json").read_text())["train_info"] for d in (one, two))
    assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
    assert r1["global_batch_size"] == r2["global_batch_size"] == 2 * per_process
    assert r1["samples_seen"] == r2["samples_seen"] == 24 * 4 + 5 + 24  # one epoch of 101 rows, then one more batch
    assert r1["tokens_seen"] == r2["tokens_seen"]
    assert [p["step"] for p in r2["train_loss_curve"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(r1["train_loss_curve"], r2["train_loss_curve"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert len({p["loss"] for p in r1["train_loss_curve"]}) == 6  # it really trained: the loss moves
    assert [p["step"] for p in r2["validation_curve"]] == [3, 6]
    assert [p["accuracy"] for p in r2["validation_curve"]] == [p["accuracy"] for p in r1["validation_curve"]]
    assert r2["test"]["n"] == r1["test"]["n"] == 40

    w1, w2 = (load_file(str(d / "store" / "tiny-bert-full" / "model.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # Only the main process wrote: one variant, one results file, one TensorBoard run
    assert Store(two / "store").names() == ["tiny-bert-full"]
    assert sorted(p.name for p in (two / "runs").iterdir()) == ["tensorboard", "tiny-bert-full.json"]
    assert len(list((two / "runs" / "tensorboard" / "tiny-bert-full").iterdir())) == 1


def test_a_compiler_that_cannot_run_leaves_both_processes_training_eagerly(tmp_path, data_dir):
    """compile=true under `accelerate launch` on a machine whose C++ compiler does not work (CXX points
    nowhere, as on a slim image without g++): each process meets the failure at the same micro-batch,
    both go on eagerly in step (DDP keeps reducing), and the run equals a two-process eager run."""
    common = [*COMMON, "eval_every=0", "batch_size=12"]  # the later eval_every wins: no evaluation
    infos = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        proc = _launch_two(data_dir, out, *common, f"compile={flag}", env={"CXX": "/nonexistent/c++"})
        if flag == "true":
            warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: compile failed")]
            assert len(warnings) == 2, proc.stderr[-3000:]  # one per process
        infos[flag] = json.loads((out / "runs" / "tiny-bert-full.json").read_text())["train_info"]
    eager, info = infos["false"], infos["true"]
    assert info["num_processes"] == 2 and info["compile"]["enabled"] is False
    reason = info["compile"]["reason"]
    assert reason.startswith("compile failed at step 1 (InvalidCxxCompiler: ") and reason.endswith("trained eagerly")
    assert info["samples_seen"] == eager["samples_seen"] and info["steps"] == eager["steps"] == 6
    assert [p["loss"] for p in info["train_loss_curve"]] == pytest.approx(
        [p["loss"] for p in eager["train_loss_curve"]], rel=1e-5
    )


def test_workers_of_a_killed_launcher_stop_before_writing_anything(tmp_path, data_dir):
    """torch elastic starts each worker in a session of its own: a SIGKILL of `accelerate launch` (what a user,
    a CI cancel or `timeout -s KILL` hits) left both ranks training the killed run, writing the store and
    removing the checkpoint that the --resume started meanwhile needed. They stop at their next step now."""
    out = tmp_path / "o"
    cmd = _launch_cmd(data_dir, out, "max_steps=5000", "batch_size=5", "checkpoint_every=4", "eval_test=false")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "runs" / "tiny-bert-full.ckpt" / "state.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert checkpoint.exists() and len(workers) >= 2, launcher.stderr.read()[-2000:] if launcher.poll() else workers
    launcher.kill()
    launcher.wait()
    try:
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers still training 30 s after their launcher was killed: {alive}"
    finally:
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
    assert checkpoint.exists() and not Store(out / "store").names()  # left for --resume, nothing written
