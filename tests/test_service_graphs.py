"""service.graphs: what a CUDA graph replays, checked on CPU (the bank's slots: test_service_bank.py).

The capture itself needs a GPU (scripts/gpu_bench.sh runs it); here the same bucketed static-buffer
path runs eagerly (`capture=False`) on real tiny models and must give the eager forward's logits.
"""

from __future__ import annotations

import pytest
import torch

from models.loading import pad_rows, query_key_mask
from service.graphs import LENGTH_BUCKETS, ROW_BUCKETS, GraphedForward, bucket
from tests.tiny import tiny_classifier, tokenizer

TEXTS = ["hello world", "stocks fell sharply today in a long sentence", "the team won", "x", "another one"]


def _rows(texts: list[str]) -> list[list[int]]:
    return tokenizer()(texts)["input_ids"]


def test_pad_rows_fills_a_bucket_without_all_masked_rows() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8]], 0, height=4, width=16)
    assert ids.shape == mask.shape == (4, 16)
    assert ids[0, :3].tolist() == [5, 6, 7] and ids[1, :1].tolist() == [8] and int(ids[:, 3:].sum()) == 0
    assert mask.sum(1).tolist() == [3, 1, 1, 1]  # filler rows attend to their one pad token
    with pytest.raises(ValueError, match="do not fit"):
        pad_rows([[1] * 20], 0, width=16)
    assert bucket(5, ROW_BUCKETS) == 8 and bucket(17, LENGTH_BUCKETS) == 32 and bucket(10_000, LENGTH_BUCKETS) is None


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bucketed_static_forward_equals_eager(arch: str) -> None:
    model = tiny_classifier(arch).eval()
    pad = tokenizer().pad_token_id
    runner = GraphedForward(
        lambda ids, mask, _: model(input_ids=ids, attention_mask=query_key_mask(mask)).logits,
        device=torch.device("cpu"),
        pad_id=pad,
        with_slots=False,
        capture=False,
    )
    with torch.inference_mode():
        for texts in (TEXTS, TEXTS[:1], TEXTS[1:4], TEXTS * 5):
            ids, mask = pad_rows(_rows(texts), pad)
            ref = model(input_ids=ids, attention_mask=mask).logits
            got = runner(_rows(texts))
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert runner.state()["captured"] == ["1x16", "32x16", "4x16", "8x16"]  # buckets, reused across calls
    assert runner.eager == 0


def test_a_bucket_that_disagrees_with_the_plain_forward_is_never_served() -> None:
    """A forward whose answers depend on the padded shape (as a graph that baked a shape in, or let
    filler rows leak into real ones, would) gives other logits once padded to a bucket; the bucket's
    first batch is checked against the plain forward, answered with the plain forward's logits, and
    the model is served eagerly from then on."""
    model = tiny_classifier("bert").eval()
    pad = tokenizer().pad_token_id
    runner = GraphedForward(
        lambda ids, mask, _: model(input_ids=ids, attention_mask=mask).logits * ids.shape[1],
        device=torch.device("cpu"),
        pad_id=pad,
        with_slots=False,
        capture=False,
        tolerance=1e-3,
    )
    with torch.inference_mode():
        rows = _rows(TEXTS[:3])  # 3 rows -> a 4-row bucket, widths < 16 -> padded to 16 tokens
        ids, mask = pad_rows(rows, pad)
        plain = model(input_ids=ids, attention_mask=mask).logits * ids.shape[1]
        got = runner(rows)
        assert torch.allclose(got, plain, atol=1e-6)  # the plain forward's answer, not the bucket's
        assert runner.disabled is not None and "disagrees with the plain forward" in runner.disabled
        assert "4x16" in runner.disabled and "tolerance 0.001" in runner.disabled
        state = runner.state()
        assert state["captured"] == [] and state["disabled"] == runner.disabled
        again = runner(rows)  # from now on eager, with the same answers
        assert torch.allclose(again, plain, atol=1e-6) and runner.eager == 2


def test_a_length_bucket_never_runs_past_the_models_position_table() -> None:
    """A BERT with 40 positions and rows of 35 tokens: the 48-token bucket is cut to 40 (BERT numbers every
    padded position; past its table it is a device-side assert on CUDA, which no fallback survives)."""
    from transformers import BertConfig, BertForSequenceClassification

    from service.graphs import buckets_of

    config = tiny_classifier("bert").config.to_dict()
    model = BertForSequenceClassification(BertConfig(**{**config, "max_position_embeddings": 40})).eval()
    runner = GraphedForward(
        lambda ids, mask, _: model(input_ids=ids, attention_mask=query_key_mask(mask)).logits,
        device=torch.device("cpu"),
        pad_id=tokenizer().pad_token_id,
        with_slots=False,
        capture=False,
        max_width=40,
    )
    rows = [list(range(1000, 1035)), list(range(2000, 2020))]
    assert buckets_of(rows, 40) == (2, 40) and buckets_of(rows) == (2, 48) and buckets_of([[1] * 41], 40)[1] is None
    with torch.inference_mode():
        got = runner(rows)
        ids, mask = pad_rows(rows, tokenizer().pad_token_id)
        eager = model(input_ids=ids, attention_mask=query_key_mask(mask)).logits
    assert runner.disabled is None and runner.state()["captured"] == ["2x40"], runner.state()
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
