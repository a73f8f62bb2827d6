"""The training loop at hardware speed: no device reads inside a step, precision from the hardware, few shapes."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import AGNEWS, tokenizer

import models.hardware
import training.loop as loop
from models import Store
from training.config import load_config
from training.data import collate, encode, epoch_batches, shard

# Every way Python code reads a tensor's value back to the host (on a GPU: a sync that stalls the launch queue).
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("agnews")
    pd.read_parquet(AGNEWS / "train_subset_20k.parquet").groupby("label").head(50).to_parquet(d / "train.parquet")
    pd.read_parquet(AGNEWS / "test.parquet").groupby("label").head(10).to_parquet(d / "test.parquet")
    return d


def _cfg(data_dir, *overrides: str):
    return load_config("configs/tiny-bert-full.yaml", [f"data={data_dir}", "eval_test=false", *overrides])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_step_reads_nothing_back_outside_the_log_interval(tmp_path, data_dir, monkeypatch, grad_accum):
    events: list[tuple[str, str]] = []  # ("batch", "") when the loop takes a micro-batch, ("read", caller)
    real_shard = loop.shard

    def marking_shard(*args, **kwargs):
        events.append(("batch", ""))
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(loop, "shard", marking_shard)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            events.append(("read", sys._getframe(1).f_code.co_name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    cfg = _cfg(data_dir, "max_steps=8", "log_every=4", "eval_every=0", f"grad_accum={grad_accum}", "compile=false")
    info = loop.train(cfg, store=Store(tmp_path / "store"), runs_dir=tmp_path / "runs")["train_info"]
    monkeypatch.undo()

    # reads between the start of step s and the start of step s + 1 belong to step s
    starts = [i for i, (kind, _) in enumerate(events) if kind == "batch"][::grad_accum]
    assert len(starts) == 8
    per_step = [
        [caller for kind, caller in events[a:b] if kind == "read"] for a, b in zip(starts, starts[1:], strict=False)
    ]
    for step, reads in enumerate(per_step, start=1):
        if step % 4:
            assert reads == [], f"step {step} read device values back: {reads}"
    assert per_step[3], "the log step (4) reads the loss back: the counter must see it"
    assert [p["step"] for p in info["train_loss_curve"]] == [4, 8]
    assert all(np.isfinite(p["loss"]) and 0.5 < p["loss"] < 3 for p in info["train_loss_curve"])


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-roberta"])
def test_the_query_key_mask_gives_the_2d_masks_logits(arch):
    """The step's (batch, query, key) mask (no "all ones?" read in transformers) = the usual 2-D one."""
    from models.loading import query_key_mask
    from training.config import TrainConfig
    from training.loop import build_model

    cfg = TrainConfig(init="random", arch_preset=arch, base_model=arch, tokenizer="x", data="x")
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer()).eval()
    ids = torch.randint(5, 1000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=query_key_mask(mask)).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-roberta"])
def test_the_mask_in_autocast_dtype_keeps_the_attention_probabilities_bf16_and_the_logits(arch):
    """Under bf16 autocast the encoder's additive mask (so the attention probabilities) is bf16; outside it
    fp32 as before; the logits agree with the fp32-mask forward within bf16 rounding."""
    from models.loading import mask_in_autocast_dtype, query_key_mask
    from training.config import TrainConfig
    from training.loop import CPU_ATTENTION, build_model

    cfg = TrainConfig(init="random", arch_preset=arch, base_model=arch, tokenizer="x", data="x")
    torch.manual_seed(0)
    plain = build_model(cfg, tokenizer(), attention=CPU_ATTENTION).eval()
    patched = build_model(cfg, tokenizer(), attention=CPU_ATTENTION).eval()
    patched.load_state_dict(plain.state_dict())
    assert mask_in_autocast_dtype(patched)
    probs: list[torch.dtype] = []
    for layer in patched.base_model.encoder.layer:
        layer.attention.self.register_forward_hook(lambda m, i, out: probs.append(out[1].dtype))
    ids = torch.randint(5, 1000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = plain(input_ids=ids, attention_mask=query_key_mask(mask)).logits.float()
            b = patched(input_ids=ids, attention_mask=query_key_mask(mask)).logits.float()
        assert set(probs) == {torch.bfloat16}
        probs.clear()
        fp32 = patched(input_ids=ids, attention_mask=query_key_mask(mask)).logits
        assert set(probs) == {torch.float32}
        torch.testing.assert_close(fp32, plain(input_ids=ids, attention_mask=query_key_mask(mask)).logits)
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def _autocast_dtypes(monkeypatch) -> list[torch.dtype]:
    """Dtype of the classifier's output in every training forward (bf16 under bf16 autocast)."""
    seen: list[torch.dtype] = []
    real_build = loop.build_model

    def build(cfg, tok, **kwargs):
        model = real_build(cfg, tok, **kwargs)
        model.classifier.register_forward_hook(lambda m, i, out: seen.append(out.dtype) if m.training else None)
        return model

    monkeypatch.setattr(loop, "build_model", build)
    return seen


def test_auto_precision_is_fp32_on_a_cpu_without_native_bf16(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(models.hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    seen = _autocast_dtypes(monkeypatch)
    res = loop.train(_cfg(data_dir, "precision=auto", "max_steps=2"), store=Store(tmp_path / "s"), runs_dir=tmp_path)
    choice = res["train_info"]["precision"]
    assert (choice["precision"], choice["requested"]) == ("fp32", "auto") and "lacks" in choice["reason"]
    assert seen == [torch.float32, torch.float32]


def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(models.hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    seen = _autocast_dtypes(monkeypatch)
    res = loop.train(_cfg(data_dir, "precision=auto", "max_steps=2"), store=Store(tmp_path / "s"), runs_dir=tmp_path)
    choice = res["train_info"]["precision"]
    assert (choice["precision"], choice["requested"]) == ("bf16", "auto") and "avx512_bf16" in choice["reason"]
    assert seen == [torch.bfloat16, torch.bfloat16]
    info = res["train_info"]
    assert (info["num_processes"], info["global_batch_size"]) == (1, 8)
    assert info["compile"] == {"enabled": False, "reason": loop.resolve_compile("auto", "cpu")[1]}


def test_accelerate_launch_settings_do_not_override_the_precision(tmp_path, data_dir, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (or an `accelerate config` saying so) reaches the run as
    ACCELERATE_MIXED_PRECISION; the loop's own choice (here fp32) is what computes and what is recorded."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    seen = _autocast_dtypes(monkeypatch)
    res = loop.train(_cfg(data_dir, "precision=fp32", "max_steps=2"), store=Store(tmp_path / "s"), runs_dir=tmp_path)
    info = res["train_info"]
    assert info["precision"]["precision"] == "fp32" and info["compile"]["enabled"] is False
    assert seen == [torch.float32, torch.float32]  # was bf16: accelerate's autocast around the forward


def test_auto_precision_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    """T4 / V100: torch.cuda.is_bf16_supported() answers True by default there (a bf16 tensor can be made,
    computed in emulation); auto must take fp16 + GradScaler instead. Fakes only the capability query."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    choice = models.hardware.resolve_precision("auto", "cuda")
    assert choice.precision == "fp16" and "Tesla T4" in choice.reason


def test_compiled_shapes_are_a_few_buckets_not_one_per_batch(data_dir):
    """What keeps a compiled step from recompiling per batch: fixed rows, widths in multiples of a bucket."""
    cfg = _cfg(data_dir)
    texts = pd.read_parquet(AGNEWS / "train_subset_20k.parquet").head(2000)
    data = encode(texts, tokenizer(), 128)
    multiple = loop.bucket_tokens(128)
    assert multiple == 16
    shapes, eager_widths = set(), set()
    for batch in epoch_batches(data.lengths, 2 * cfg.batch_size, seed=0, epoch=0, grouped=True):
        for rank in (0, 1):
            idx, real = shard(batch, rank, 2)
            b = collate(data, idx, 0, real=real, rows=cfg.batch_size, length_multiple=multiple, max_length=128)
            shapes.add(tuple(b["input_ids"].shape))
            assert int((b["labels"] != -100).sum()) == real == len(batch[rank::2])
            assert torch.equal(b["attention_mask"].sum(1)[:real], torch.as_tensor(data.lengths[idx[:real]]))
            eager_widths.add(collate(data, idx, 0)["input_ids"].shape[1])
    assert {rows for rows, _ in shapes} == {cfg.batch_size}
    assert {width % multiple for _, width in shapes} <= {0} and max(w for _, w in shapes) <= 128
    assert len(shapes) <= 8 < len(eager_widths)


def test_a_small_last_batch_leaves_no_process_without_a_batch(data_dir):
    data = encode(pd.DataFrame({"text": ["one two", "three"], "label": [1, 2]}), tokenizer(), 16)
    batch = np.array([1])
    assert shard(batch, 0, 2)[1] == 1
    idx, real = shard(batch, 1, 2)  # nothing left for process 1: a filler row the loss ignores
    b = collate(data, idx, 0, real=real)
    assert real == 0 and b["labels"].tolist() == [-100] and b["input_ids"].shape[0] == 1
    loss = torch.nn.functional.cross_entropy(torch.randn(1, 4), b["labels"], reduction="sum")
    assert loss.item() == 0.0


def test_resolve_compile():
    assert loop.resolve_compile(True, "cpu")[0] is True
    assert loop.resolve_compile(False, "cuda")[0] is False
    assert loop.resolve_compile("auto", "cuda")[0] is True
    assert loop.resolve_compile("auto", "cpu")[0] is False  # measured no faster on CPU (see its docstring)


def test_step_overhead_benchmark_compares_the_same_work():
    """Not a timing test: both loops train the same model on the same batches to the same loss."""
    from benchmarks.step_overhead import StepOverheadSettings, run

    payload = run(StepOverheadSettings(steps=12, batch_size=4, max_length=32, repeats=1))
    minimal, ours = payload["runs"]["minimal"][0], payload["runs"]["training"][0]
    assert minimal["steps"] == ours["steps"] == payload["steps"] == 12
    assert minimal["precision"] == ours["precision"] == payload["precision"] == "fp32"
    assert ours["last_interval_loss"] == pytest.approx(minimal["last_interval_loss"], rel=1e-4)
    assert payload["minimal_ms_per_step"] == pytest.approx(1000 * minimal["time_s"] / 12)
    assert payload["ratio"] == pytest.approx(payload["training_ms_per_step"] / payload["minimal_ms_per_step"])
    assert payload["meets_target"] == (payload["ratio"] <= 1.2)


def test_a_compiler_that_cannot_run_leaves_an_eager_run_with_the_reason(tmp_path, data_dir):
    """compile=true on a machine whose compiler does not work (here: inductor pointed at a C++
    compiler that does not exist, as on a slim image without g++): the run trains eagerly, exactly as
    an eager run does, and its results say that compiling failed and why."""
    import torch._inductor.config as inductor_config

    common = ["max_steps=4", "log_every=1", "eval_every=0", "precision=fp32"]
    common += ["arch.hidden_dropout_prob=0", "arch.attention_probs_dropout_prob=0"]  # same math in both
    runs = {}
    for flag in ("false", "true"):
        cfg = _cfg(data_dir, *common, f"compile={flag}", f"name=compile-{flag}")
        torch._dynamo.reset()  # nothing cached from other tests: the compiled run must compile (and fail)
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
            runs[flag] = loop.train(cfg, store=Store(tmp_path / "s"), runs_dir=tmp_path / "r")["train_info"]
    torch._dynamo.reset()
    eager, info = runs["false"], runs["true"]
    assert info["compile"]["enabled"] is False
    reason = info["compile"]["reason"]
    assert reason.startswith("compile failed at step 1 (InvalidCxxCompiler: ") and reason.endswith("trained eagerly")
    assert "C++ compiler" in reason
    assert info["steps"] == 4 and info["length_multiple"] == eager["length_multiple"]
    assert [p["loss"] for p in info["train_loss_curve"]] == pytest.approx(
        [p["loss"] for p in eager["train_loss_curve"]], rel=1e-5
    )


def test_train_speed_does_not_report_an_eager_fallback_as_compiled(monkeypatch):
    """A compiled run whose compiler failed trains eagerly (above); train-speed recorded its figures under
    compile=true. It is a failed run now, with the loop's reason."""
    import torch._inductor.config as inductor_config

    from benchmarks.train_speed import TrainSpeedSettings, run

    monkeypatch.setenv("AGNEWS_DATA", str(AGNEWS))
    settings = TrainSpeedSettings(
        methods=["full"],
        batch_sizes=[4],
        compile=["true"],
        steps=4,
        log_every=2,
        precision="fp32",
        overrides=["arch_preset=tiny-roberta", "train_subset=200", "val_subset=16"],
    )
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        out = run(settings)
    torch._dynamo.reset()
    assert out["runs"] == []
    (reason,) = out["failed"].values()
    assert reason.startswith("compiling failed, measured nothing compiled: compile failed at step 1"), reason


def test_compiled_step_trains_like_eager_and_compiles_once_per_shape(tmp_path, data_dir):
    """compile=true (what auto picks on CUDA): same losses as eager, one graph for every padded width."""
    from torch._dynamo.utils import counters

    from models.loading import load_tokenizer
    from training.data import load_splits

    common = ["max_steps=6", "log_every=1", "eval_every=0", "precision=fp32"]
    common += ["arch.hidden_dropout_prob=0", "arch.attention_probs_dropout_prob=0"]  # same math in both
    curves = {}
    counters.clear()
    for flag in ("false", "true"):
        cfg = _cfg(data_dir, *common, f"compile={flag}", f"name=compile-{flag}")
        info = loop.train(cfg, store=Store(tmp_path / "s"), runs_dir=tmp_path / "r")["train_info"]
        assert info["compile"]["enabled"] is (flag == "true"), info["compile"]
        curves[flag] = [p["loss"] for p in info["train_loss_curve"]]
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-4)
    # the six batches' natural widths vary; padded to 16-token buckets they make a few shapes, and the
    # dynamic-shape compilation serves them all with one graph (reduce-overhead then records one CUDA graph each)
    data = encode(load_splits(cfg).train, load_tokenizer(cfg.tokenizer_path), cfg.max_length)
    batches = epoch_batches(data.lengths, cfg.batch_size, cfg.seed, 0, cfg.length_grouping)[:6]
    widths = {int(data.lengths[b].max()) for b in batches}
    buckets = {min(-(-w // 16) * 16, cfg.max_length) for w in widths}
    assert loop.bucket_tokens(cfg.max_length) == 16
    assert 1 < len(buckets) < len(widths)
    assert counters["stats"]["unique_graphs"] == 1


def test_step_overhead_trains_on_the_cpu_on_a_gpu_machine_too(monkeypatch):
    """The minimal loop runs on the CPU; `training` took a GPU where one is (accelerate's default), so on a GPU
    machine the ratio compared a GPU step with a CPU one. Here a GPU is claimed by torch.cuda.is_available
    (only the probe is faked): accelerate must still be told to train on the CPU."""
    import os

    from benchmarks.step_overhead import StepOverheadSettings, run

    seen = []
    real_cpu_only = loop._cpu_only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a claimed GPU")  # the results' provenance
    monkeypatch.setattr(loop, "_cpu_only", lambda: seen.append(real_cpu_only()) or seen[-1])
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    payload = run(StepOverheadSettings(steps=4, batch_size=4, max_length=32, repeats=1))
    assert seen and all(seen), "training was not told to use the CPU"
    assert payload["runs"]["training"][0]["steps"] == 4
    assert "ACCELERATE_USE_CPU" not in os.environ  # restored after the run
