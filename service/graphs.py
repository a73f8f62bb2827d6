"""CUDA graphs of a served forward over a few (rows x length) buckets.

Why: on a GPU an eager transformers forward is launch-bound at serving batch sizes. RoBERTa-large
bf16 on an H200 took 17.1 ms of compute for one text and 23.1 ms for a batch of ~32 (ceiling,
2026-11-28): the host launching several hundred small kernels one by one, not the GPU computing.
A CUDA graph records those launches once per input shape and replays them with one call, so a
batch costs what the GPU needs. vLLM does the same for its decode batches (captured per batch size,
one shared memory pool); TEI pads to buckets for the same reason.

How: each batch is padded to the smallest bucket that holds it (`ROW_BUCKETS` x `LENGTH_BUCKETS`);
filler rows are one pad token attending to itself, so they cost little and never produce NaNs. A
bucket's graph is captured the first time it is needed (one warm-up forward on a side stream, then
the capture) and replayed after that: copy the padded ids, mask and adapter slots into the graph's
static inputs, replay, one device-to-host copy of the logits. All graphs share one memory pool; that
is safe because graphs run one at a time on one thread and each output is copied out right after its
replay. Graphs read weights by address: `key()` (the LoRA bank's generation) changes when stacks are
reallocated, and the captured graphs are then dropped and recaptured on demand.

Verified before use: a bucket's first replay (or, with `capture=False`, its first padded forward) is
compared with the plain forward of the same rows, unpadded and uncaptured; beyond `tolerance`
(max |Δlogit|, the golden-set load tolerance of the serving precision) the model is served eagerly
from then on and `state()["disabled"]` says why. A graph that captured something other than the
forward (a host read, a shape baked in, filler rows that leak into real ones) then costs one eager
forward instead of wrong answers. "captured" in `state()` lists verified buckets only.

With `capture=False` the same class runs the forward eagerly on the padded static inputs: the CPU
test suite checks the bucketing, padding, slot routing and verification that the GPU path replays.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.loading import pad_rows

log = logging.getLogger("service")

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)

# fn(input_ids (h, w), attention_mask (h, w), slots (h,) or None) -> logits (h, labels)
Forward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None beyond the largest (that batch runs eagerly)."""
    return next((b for b in buckets if b >= n), None)


def buckets_of(rows: list[list[int]], max_width: int | None = None) -> tuple[int | None, int | None]:
    """(rows bucket, length bucket) of a batch of unpadded rows; None where it is beyond the largest. A length
    bucket wider than `max_width` (the model's position table) is cut to it: BERT numbers every padded position,
    and an index past its table is a device-side assert on CUDA, not an error to fall back from."""
    longest = max(len(r) for r in rows)
    w = bucket(longest, LENGTH_BUCKETS)
    if w is not None and max_width is not None and w > max_width:
        w = max_width if longest <= max_width else None
    return bucket(len(rows), ROW_BUCKETS), w


@dataclass
class _Graph:
    ids: torch.Tensor
    mask: torch.Tensor
    slots: torch.Tensor | None
    out: torch.Tensor | None = None
    graph: Any = None  # torch.cuda.CUDAGraph once captured


class GraphedForward:
    """One model's forward, replayed from a CUDA graph per bucket (see the module docstring)."""

    def __init__(
        self,
        fn: Forward,
        *,
        device: torch.device,
        pad_id: int,
        with_slots: bool,
        capture: bool,
        pool: Any = None,
        key: Callable[[], Any] = lambda: 0,
        capture_lock: Any = None,
        tolerance: float = 1e-3,
        max_width: int | None = None,
    ):
        self.fn, self.device, self.pad_id, self.with_slots = fn, device, pad_id, with_slots
        self.tolerance = tolerance
        self.max_width = max_width  # the model's position table (buckets_of)
        self.capture, self.pool, self.key = capture, pool, key
        # held by whoever else uses this GPU from another thread (the swap worker's golden checks):
        # work on another stream during a capture can break it
        self.capture_lock = capture_lock or threading.Lock()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._key = key()
        self.disabled: str | None = None  # why graphs are off for this model (a capture failed or disagreed)
        self.replays = self.eager = 0

    def __call__(self, rows: list[list[int]], slots: list[int] | None = None) -> torch.Tensor:
        """fp32 CPU logits of `rows` (token ids, unpadded); `slots`: each row's LoRA bank slot."""
        h, w = buckets_of(rows, self.max_width)
        if h is None or w is None or self.disabled:
            return self._eager(rows, slots)
        if self.key() != self._key:  # the weights it read moved: recapture on demand
            self.graphs.clear()
            self._key = self.key()
        g = self.graphs.get((h, w))
        if g is not None:
            return self._run(g, rows, slots)
        if self.capture and not self.capture_lock.acquire(blocking=False):
            return self._eager(rows, slots)  # another thread is on the GPU: capture on a later batch
        try:
            g = self._static(h, w)
            self._fill(g, rows, slots)
            if self.capture:
                self._capture(g)
            out = self._run(g, rows, slots, filled=True)
            error = self._verify(out, rows, slots, h, w)
        except Exception as e:  # never fail a request over a graph: serve eagerly from now on
            error = f"{self._what} at {h}x{w} failed: {type(e).__name__}: {e}"
        finally:
            if self.capture:
                self.capture_lock.release()
        if error is not None:
            self.disabled = error
            log.warning("%s; serving this model eagerly", error)
            self.graphs.clear()
            return self._eager(rows, slots)
        self.graphs[(h, w)] = g
        return out

    def _run(self, g: _Graph, rows: list[list[int]], slots: list[int] | None, filled: bool = False) -> torch.Tensor:
        """Replay `g` (capture=False: run the forward on its static buffers) for `rows`."""
        if not filled:
            self._fill(g, rows, slots)
        if self.capture:
            g.graph.replay()
        else:
            g.out = self.fn(g.ids, g.mask, g.slots)
        self.replays += 1
        return g.out[: len(rows)].float().cpu()  # the one device-to-host copy (and wait) of the batch

    @property
    def _what(self) -> str:
        return "CUDA graph" if self.capture else "bucketed forward"

    def _verify(self, out: torch.Tensor, rows: list[list[int]], slots: list[int] | None, h: int, w: int) -> str | None:
        """Why the new h x w bucket's logits `out` are not the plain forward's (None when they agree)."""
        ref = self._plain(rows, slots)
        delta = float((out - ref).abs().max()) if out.shape == ref.shape else math.inf
        if delta <= self.tolerance:  # NaN fails too
            return None
        return f"{self._what} at {h}x{w} disagrees with the plain forward (max |Δlogit| {delta:.4g}, tolerance {self.tolerance:g})"

    def _fill(self, g: _Graph, rows: list[list[int]], slots: list[int] | None) -> None:
        h, w = g.ids.shape
        ids, mask = pad_rows(rows, self.pad_id, height=h, width=w)
        g.ids.copy_(ids, non_blocking=True)
        g.mask.copy_(mask, non_blocking=True)
        if g.slots is not None:
            assert slots is not None, "a LoRA bank forward needs each row's slot"
            g.slots.copy_(torch.tensor(slots + [slots[0]] * (h - len(slots))), non_blocking=True)

    def _eager(self, rows: list[list[int]], slots: list[int] | None) -> torch.Tensor:
        self.eager += 1
        return self._plain(rows, slots)

    def _plain(self, rows: list[list[int]], slots: list[int] | None) -> torch.Tensor:
        """The forward of `rows` padded only to their longest, no graph: what a replay must match."""
        ids, mask = pad_rows(rows, self.pad_id)
        s = torch.tensor(slots, device=self.device) if slots is not None else None
        return self.fn(ids.to(self.device), mask.to(self.device), s).float().cpu()

    def _static(self, h: int, w: int) -> _Graph:
        """Input buffers outside the graph pool: their addresses are what a graph reads."""
        ids = torch.full((h, w), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((h, w), dtype=torch.long, device=self.device)
        slots = torch.zeros(h, dtype=torch.long, device=self.device) if self.with_slots else None
        return _Graph(ids, mask, slots)

    def _capture(self, g: _Graph) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy cuBLAS / allocator initialisation
            self.fn(g.ids, g.mask, g.slots)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            g.out = self.fn(g.ids, g.mask, g.slots)
        g.graph = graph

    def state(self) -> dict[str, Any]:
        return {
            # a snapshot (one C call): the engine's socket thread asks while the batcher adds or clears buckets
            "captured": sorted(f"{h}x{w}" for h, w in list(self.graphs)),
            "replays": self.replays,
            "eager_batches": self.eager,
            "disabled": self.disabled,
        }
