"""One batcher per device (in the engine process): owns the runtime, forms token-budget batches.

Loop (the batcher thread): apply pending admin commands (commit a prepared load / unload) -> if
rows of more than one request wait, or a batch is running, wait up to --max-wait-ms for company (a
lone request with nothing running goes at once; the default 0 is continuous batching: rows gather
while the lanes run, and a free lane takes what waits) -> take the oldest row's group (all LoRA
adapters form one group; each other variant is its own) -> add rows of that group shortest-first
while rows x longest <= --max-batch-tokens -> one forward -> answer each finished request through
its `done` callback.

Lanes (CPU): a compute-heavy model's batches (torch or ONNX) run on lane threads, up to --lanes at once
with --lone-threads/lanes torch threads each (Runtime.lane_parallel), at niceness +--lane-nice so that
front-ends and the swap worker run first when they wake; everything else runs on this thread,
one batch at a time. Whatever changes the models (commands, cold reloads, freeing replaced versions,
eviction) waits until no batch runs, so a running batch never loses its weights.

Loads are verified and golden-checked on a swap worker thread beside the batches (Runtime.prepare).
An adapter that fits a free bank slot is then committed right there, beside running batches
(Runtime.commit_beside); anything else commits here, between batches. Either way a batch is formed
under the runtime's lock, so it sees one version of every model, and a replaced version is freed
only when no batch runs (Runtime.settle).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.errors import ModelNotFound, QueueFull, ServiceError, Unavailable
from service.metrics import EngineMetrics
from service.runtime import Entry, Runtime

log = logging.getLogger("service")
IDLE_POLL_S = 0.1
HEAVY_BATCH_S = 0.02  # a batch estimated above this runs on every core (see _dispatch)
MAX_RELOAD_ROUNDS = 3  # _make_resident: a second round already finds every replaced adapter resident


@dataclass
class Job:
    """One HTTP request: its pre-tokenised rows and the callback that answers it (from the batcher thread)."""

    variant: str
    texts: list[str]
    rows: list[list[int]]
    tok_key: str | None  # the tokenizer `rows` came from (Entry.tok_key); re-tokenised if a swap changed it
    done: Callable[[Job, Exception | None], None]
    deadline_s: float = math.inf  # unix time past which nobody waits for the answer (its rows are dropped)
    enqueued_s: float = field(default_factory=time.perf_counter)
    logits: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    cancelled: bool = False  # set by the handler on timeout; its rows are skipped
    # one request, one version: the entry that computed its answered rows; a hot-swap landing between its
    # batches starts it again (epoch + 1: rows of an older epoch, queued or running, are ignored)
    entry: Entry | None = None
    epoch: int = 0

    def __post_init__(self) -> None:
        self.logits = [None] * len(self.rows)
        self.remaining = len(self.rows)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def labels(self) -> list[str] | None:
        """The label names of the version that computed the answer (a swap may have changed them since the
        front-end cached the variant's)."""
        return None if self.entry is None else self.entry.manifest.labels

    def result(self) -> dict[str, Any]:
        """The answer as the engine hands it to a front-end (zmq engine and Ray replica alike)."""
        logits = np.stack(self.logits).astype(np.float32, copy=False)
        return {
            "logits": logits.tobytes(),
            "labels": logits.shape[1],
            "names": self.labels,
            "queue_ms": self.queue_ms,
            "compute_ms": self.compute_ms,
            "tokens": self.tokens,
        }


@dataclass
class Row:
    job: Job
    index: int
    epoch: int = 0

    def stale(self, now_s: float) -> bool:
        """Nobody waits for this row: its request was started again (see Job.entry), left, or timed out (then
        marked cancelled: the front-end has answered 504 already)."""
        if self.epoch != self.job.epoch:
            return True
        if not self.job.cancelled and self.job.deadline_s < now_s:
            self.job.cancelled = True
        return self.job.cancelled

    @property
    def length(self) -> int:
        return len(self.job.rows[self.index])


class Batcher:
    """See the module docstring. `submit` and `command` are called from the event loop."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: EngineMetrics,
        answering: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.runtime = runtime
        self.cfg = runtime.cfg
        self.metrics = metrics
        # entered around the answers of one batch: the engine sends them as one message per front-end
        self._answering = answering
        self._rows: deque[Row] = deque()
        # (op, name or prepared Entry, future, when the command arrived, why: see `command`)
        self._commands: deque[tuple[str, Any, concurrent.futures.Future, float, str]] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self.ready = threading.Event()
        self.startup_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._checking = 0
        # arrival order of admin commands: a PUT whose commit waits for the batcher must not land after a later
        # PUT/DELETE of the same name that went by it (commit_beside), so the runtime drops the older (Entry.seq)
        self._seq = itertools.count(1)
        # Lanes: see the module docstring. Measured in-process (2-core Xeon, MiniLM): two 1-thread lanes
        # gave 1.45x (fp32) to 2x (bf16) the rows/s of one 2-thread forward (benchmarks ceiling --lanes).
        self._lanes_by_cost = self.cfg.lanes == "auto"  # else every torch model's batches use the lanes
        self.lanes = self.cfg.lanes if isinstance(self.cfg.lanes, int) else self.cfg.lone_threads
        if self.cfg.device != "cpu":
            self.lanes = 1
        self._lane_threads = max(1, self.cfg.lone_threads // self.lanes)
        self._busy = 0  # batches running on lane threads (changes under _cond)
        self._last_jobs = 1  # requests the last finished batch answered (see _dispatch's `lone`)
        self._lane_pool = (
            concurrent.futures.ThreadPoolExecutor(
                self.lanes, thread_name_prefix="lane", initializer=_nice_thread, initargs=(self.cfg.lane_nice,)
            )
            if self.lanes > 1
            else None
        )
        self._answer_lock = threading.Lock()  # rows of one request may finish on two lanes at once
        # Verification and golden checks of new variants run here, beside the batches (Runtime.prepare), on
        # the cores one lane leaves (every core without lanes): MiniLM fp32 under wrk c=4, 2-core Xeon, a
        # one-text check took 36 ms p50 on 1 thread and 27 ms on 2 (the batches lose as little).
        check_threads = max(1, self.cfg.lone_threads - self._lane_threads) if self.lanes > 1 else self.cfg.lone_threads
        self._swap_worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="swap-verify", initializer=torch.set_num_threads, initargs=(check_threads,)
        )

    # ---- called from the HTTP side ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._accepting:
                raise Unavailable("the server is shutting down; retry on another replica", headers={"Retry-After": "1"})
            if len(self._rows) + len(job.rows) > self.cfg.max_queue:
                self._drop_stale()  # rows nobody waits for any more must not turn live requests away
            if len(self._rows) + len(job.rows) > self.cfg.max_queue:
                raise QueueFull(
                    f"queue full ({len(self._rows)} rows waiting, limit {self.cfg.max_queue}); retry after a moment",
                    headers={"Retry-After": "1"},
                )
            self._rows.extend(Row(job, i) for i in range(len(job.rows)))
            self.metrics.queue_depth.set(len(self._rows))
            self._cond.notify()

    def _drop_stale(self) -> None:
        """Forget queued rows whose request timed out, left or was started again. Caller holds _cond.
        (_pick drops them too, with the unloaded-variant rows it must answer under the runtime's lock.)"""
        now_s = time.time()
        self._rows = deque(r for r in self._rows if not r.stale(now_s))
        self.metrics.queue_depth.set(len(self._rows))

    def command(self, op: str, name: str, reason: str = "admin") -> concurrent.futures.Future:
        """Load/replace or unload `name`. A load is verified on the swap worker while batches go on; only
        its commit (attach + rename) waits for a gap between batches, like an unload. `reason`: "admin" (PUT/DELETE,
        counted in service_admin_operations) or why the engine does it itself ("cold": a request needs the variant,
        as Ray Serve's multiplexed loads; "evicted": Ray's LRU dropped it), not an admin operation; a load is timed
        under its reason in service_adapter_load_seconds."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        # running from the start: a waiter that gives up (asyncio.wrap_future cancels the future it wraps)
        # cannot cancel a command the engine will carry out anyway, nor make its answer raise InvalidStateError
        fut.set_running_or_notify_cancel()
        t0, seq = time.perf_counter(), next(self._seq)
        if op == "load" and self.ready.is_set():
            self._swap_worker.submit(self._prepare, name, fut, t0, seq, reason)
        else:  # before startup is done, loads queue behind it on the batcher thread
            self._enqueue((op, (name, seq), fut, t0, reason))
        return fut

    def _enqueue(self, command: tuple[str, Any, concurrent.futures.Future, float, str]) -> None:
        with self._cond:
            if self.startup_error is not None:  # the batcher thread has exited: nobody would ever answer
                command[2].set_exception(self._startup_failed())
                return
            self._commands.append(command)
            self._cond.notify()

    def _startup_failed(self) -> Unavailable:
        return Unavailable(f"the engine's startup failed ({self.startup_error}); fix the store and restart the service")

    def _admin_op(self, op: str, outcome: str, reason: str) -> None:
        if reason == "admin":
            self.metrics.swaps.labels(op, outcome).inc()

    def _prepare(self, name: str, fut: concurrent.futures.Future, t0: float, seq: int, reason: str) -> None:
        """Swap worker thread: verify + golden-check `name`, then commit it here when the bank has a free
        slot for it (Runtime.commit_beside), else hand it to the batcher to commit between batches."""
        self._checking += 1
        try:
            entry = self.runtime.prepare(name)
            entry.seq = seq
            existed = name in self.runtime.entries
            if self.runtime.commit_beside(entry):
                self._loaded(entry, existed, t0, fut, reason)
                with self._cond:
                    self._cond.notify()  # an idle batcher settles (frees the replaced slot) now
                return
        except Exception as e:
            self._admin_op("load", "refused", reason)
            fut.set_exception(e)
            return
        finally:
            self._checking -= 1
        self._enqueue(("commit", entry, fut, t0, reason))

    def _loaded(self, entry: Entry, existed: bool, t0: float, fut: concurrent.futures.Future, reason: str) -> None:
        load_s = time.perf_counter() - t0  # from the command's arrival to servable
        self.metrics.adapter_load.labels(entry.kind, reason).observe(load_s)
        self._admin_op("load", "ok", reason)
        fut.set_result(
            {
                "name": entry.name,
                "status": "replaced" if existed else "loaded",
                "kind": entry.kind,
                "load_ms": load_s * 1e3,
            }
        )
        self._update_gauges()

    def queue_depth(self) -> int:
        return len(self._rows)

    def state(self) -> dict[str, Any]:
        """The engine's state as front-ends (over the engine's socket, or Ray) read it: readiness, every servable
        variant with its tokenizer key, refusals, queue depth."""
        entries = dict(self.runtime.entries)  # a snapshot: this thread may swap entries meanwhile
        return {
            "ready": self.ready.is_set(),
            "startup_error": self.startup_error,
            "precision": self.runtime.precision_state(),
            "cuda_graphs": self.runtime.graph_state(),
            "refused": dict(self.runtime.refused),
            "queue_rows": self.queue_depth(),
            "entries": {
                name: {
                    "kind": e.kind,
                    "precision": self.runtime.entry_precision(e),
                    "labels": e.manifest.labels,
                    "tok": e.tok_key,
                    "resident": e.resident,
                    "bytes": e.bytes,
                    "last_used": e.usage.last_used,
                    "request_count": e.usage.request_count,
                }
                for name, e in entries.items()
            },
        }

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let queued rows finish (up to the timeout), then end the thread."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + drain_timeout_s
        while self._rows and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    # ---- the batcher thread ----------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.cfg.threads)
        try:
            self._startup()
        except Exception as e:  # the server stays up and /readyz says why
            log.exception("startup failed")
            with self._cond:  # commands queued behind the startup would wait forever: fail them
                self.startup_error = f"{type(e).__name__}: {e}"
                queued, self._commands = list(self._commands), deque()
            for command in queued:
                command[2].set_exception(self._startup_failed())
            return
        self.ready.set()
        while True:
            try:
                self._apply_commands()
                batch = self._next_batch()
                if batch:
                    self._dispatch(batch)
                elif self._stopping and not self._rows:
                    self._wait_idle()
                    return
            except Exception:  # never a dead batcher: log, fail nothing else, keep going
                log.exception("batcher loop error")

    def _startup(self) -> None:
        rt = self.runtime
        rt.load_base()
        wanted = (
            rt.store.names()
            if self.cfg.variants == "all"
            else [v.strip() for v in self.cfg.variants.split(",") if v.strip()]
        )
        for name in wanted:
            t0 = time.perf_counter()
            try:
                entry = rt.load(name)
            except ServiceError as e:  # refused or missing: listed with its reason in GET /v1/models
                log.warning("not serving %s: %s", name, e.message)
                continue
            self.metrics.adapter_load.labels(entry.kind, "start").observe(time.perf_counter() - t0)
        self._update_gauges()
        log.info("serving %s", ", ".join(sorted(rt.entries)) or "nothing")

    def _wait_idle(self) -> None:
        """Until no batch runs on a lane (the models may change then)."""
        with self._cond:
            while self._busy:
                self._cond.wait()

    def _apply_commands(self) -> None:
        rt = self.runtime
        if not (self._commands or rt.unsettled() or rt.over_cap()):
            return
        self._wait_idle()
        rt.settle()
        rt.evict_over_cap(set())  # a batch needed more adapters than --max-adapters at once
        self._update_gauges()  # settle may have freed or evicted adapters (a PUT committed beside, over the cap)
        while self._commands:
            with self._cond:
                op, target, fut, t0, reason = self._commands.popleft()
            try:
                if op in ("load", "commit"):  # "commit": prepared on the swap worker; "load": all here
                    name = target.name if op == "commit" else target[0]
                    existed = name in self.runtime.entries
                    entry = self.runtime.commit(target) if op == "commit" else self.runtime.load(*target)
                    self._loaded(entry, existed, t0, fut, reason)
                    continue
                self.runtime.unload(*target)
                self._admin_op(op, "ok", reason)
                fut.set_result({"name": target[0], "status": "unloaded"})
            except Exception as e:
                self._admin_op("load" if op == "commit" else op, "refused", reason)
                fut.set_exception(e)
            self._update_gauges()

    def _next_batch(self) -> list[tuple[Row, Entry]] | None:
        with self._cond:
            # every lane runs a batch: rows gather meanwhile. While a swap worker checks a new variant
            # one lane runs and the check takes the other lanes' cores (MiniLM bf16, 2-core Xeon, wrk c=4,
            # replace / reload p50: both lanes running 102 / 69 ms; one lane, check on 2 threads 74 / 61;
            # one lane, check on 1 thread 57 / 51; the one-lane engine of before, same hour, 55 / 55)
            while self._busy >= (1 if self._checking else self.lanes):
                self._cond.wait(IDLE_POLL_S)
            if not self._rows and not self._commands:
                self._cond.wait(IDLE_POLL_S)
            if not self._rows or self._commands:
                return None
            first_s = self._rows[0].job.enqueued_s
            # Wait for company only while another request is in flight (queued - rows of one request
            # are contiguous - or in a running batch): a lone request never pays --max-wait-ms, so c=1
            # latency is compute only, while a lane's batch does not leave with the first row back.
            alone = self._rows[0].job is self._rows[-1].job and not self._busy
        # Wait for company until the oldest row has waited max_wait_ms or the budget is full.
        deadline = first_s if alone else first_s + self.cfg.max_wait_ms / 1e3
        while time.perf_counter() < deadline and not self._commands:
            with self._cond:
                full = (
                    len(self._rows) >= self.cfg.max_batch_size
                    or sum(r.length for r in self._rows) >= self.cfg.max_batch_tokens
                )
                if full:
                    break
                self._cond.wait(max(0.0, deadline - time.perf_counter()))
        with self._cond:
            return self._take_batch()

    def _take_batch(self) -> list[tuple[Row, Entry]]:
        """Pick rows of the oldest row's group; shortest first within the token budget. Caller holds the lock."""
        with self.runtime.lock:  # one version of every variant for the whole batch (commit_beside)
            return self._pick()

    def _pick(self) -> list[tuple[Row, Entry]]:
        entries = self.runtime.entries
        live: deque[Row] = deque()
        now_s = time.time()
        for row in self._rows:  # drop timed-out rows and rows whose variant was unloaded
            if row.stale(now_s):
                continue
            if row.job.variant not in entries:
                self._fail(
                    row.job,
                    ModelNotFound(
                        f"'{row.job.variant}' was unloaded while the request waited; load it with PUT /v1/adapters/{row.job.variant}"
                    ),
                )
                continue
            live.append(row)
        self._rows = live
        if not live:
            self.metrics.queue_depth.set(0)
            return []
        oldest = live[0]
        group = entries[oldest.job.variant].group
        candidates = [r for r in live if entries[r.job.variant].group == group]
        chosen = [oldest]
        width = oldest.length
        for r in sorted(candidates[1:], key=lambda r: r.length):
            w = max(width, r.length)
            if len(chosen) >= self.cfg.max_batch_size or (len(chosen) + 1) * w > self.cfg.max_batch_tokens:
                break
            chosen.append(r)
            width = w
        taken = {id(r) for r in chosen}
        self._rows = deque(r for r in live if id(r) not in taken)
        self.metrics.queue_depth.set(len(self._rows))
        return [(r, entries[r.job.variant]) for r in chosen]

    def _dispatch(self, batch: list[tuple[Row, Entry]]) -> None:
        """Run `batch` on a free lane, or here (see the module docstring)."""
        batch = self._make_resident(batch)
        if not batch:
            return
        rows, entries = [r for r, _ in batch], [e for _, e in batch]
        ids = [self._ids_for(r, e) for r, e in batch]
        # Every core (--lone-threads) for a lone request (nothing else queued or running, and the batch
        # before it answered one request: the front-ends are idle) and, without lanes, for a batch whose
        # measured cost dwarfs the front-ends' share of the CPU (~1 ms a request): 2-core Xeon, MiniLM
        # fp32, c=32, AG News texts: 1 engine thread 77 req/s, 2 threads 119 req/s. A light model's
        # batches keep --threads, leaving the front-ends their core.
        # Why "the batch before answered one request": under load the engine empties for a moment when a
        # batch's answers go out, and the first request of the wave coming back looked lone, ran on
        # every core on this thread and held up the rest of the wave (one big batch on one lane, then a
        # trickle on the other). Measured, 2-core AMD EPYC (AVX2, fp32), MiniLM, `benchmarks ceiling
        # --scenarios full,adapters-32 --concurrency 32 --duration 8 --rounds 2 --no-naive`, 4 pairs,
        # service / in-process: full 0.89/0.85/0.78/0.69 -> 0.80/0.83/0.99/0.85, 32 adapters 0.72/0.71/
        # 0.85/0.57 -> 0.83/0.91/0.70/0.86 (req/s means 55.0 -> 63.8 and 49.8 -> 60.6); c=1 unchanged.
        lone = self._last_jobs <= 1 and not self._rows and not self._busy and all(r.job is rows[0].job for r in rows)
        if (
            self._lane_pool is not None
            and not lone
            and self.runtime.lane_parallel(entries[0], by_cost=self._lanes_by_cost)
        ):
            with self._cond:
                self._busy += 1
            self._lane_pool.submit(self._on_lane, rows, entries, ids)
            return
        heavy = self.cfg.lone_threads > self.cfg.threads and self.runtime.batch_cost_s(entries, ids) > HEAVY_BATCH_S
        # While a swap worker checks a new variant (on the cores a lane leaves; every core without lanes)
        # batches keep --threads: oversubscribed threads stall each other (MiniLM fp32, wrk c=4: replace
        # p50 46-58 -> 41-49 ms).
        threads = self.cfg.lone_threads if (lone or heavy) and not self._checking else self.cfg.threads
        self._wait_idle()
        self._execute(rows, entries, ids, threads, "batcher")

    def _on_lane(self, rows: list[Row], entries: list[Entry], ids: list[list[int]]) -> None:
        try:
            self._execute(rows, entries, ids, self._lane_threads, "lane")
        except Exception:  # never a lost lane: log; the batch's requests were answered or failed
            log.exception("lane error")
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _execute(self, rows: list[Row], entries: list[Entry], ids: list[list[int]], threads: int, where: str) -> None:
        """One forward of the batch on this thread with `threads` torch threads, then the answers."""
        if torch.get_num_threads() != threads:  # per thread: each lane keeps its own count
            torch.set_num_threads(threads)
        # the batch starts here: cold reloads (service_adapter_load_seconds) and waits for running lanes
        # before it are queueing, not compute
        start_s, cpu0 = time.perf_counter(), time.thread_time()
        try:
            logits = self.runtime.forward(entries, ids)
        except Exception as e:
            log.exception("forward failed")
            for job in {id(r.job): r.job for r in rows}.values():
                self._fail(job, ServiceError(f"inference failed: {type(e).__name__}: {e}; this is a server bug"))
            return
        compute_s = time.perf_counter() - start_s
        self.metrics.batch_cpu.labels(where).inc(time.thread_time() - cpu0)
        rows_logits = logits.numpy()
        width = max(len(i) for i in ids)
        self.metrics.compute.labels(entries[0].group).observe(compute_s)
        self.metrics.batches.labels(where).inc()
        self.metrics.batch_size.observe(len(rows))
        self.metrics.batch_tokens.observe(len(rows) * width)
        self.metrics.batch_adapters.observe(len({e.name for e in entries}))
        restart: list[Job] = []
        with self._answer_lock, self._answering():
            self._last_jobs = self._answer(rows, entries, rows_logits, start_s, compute_s, restart)
        if restart:  # after _answer_lock: _pick holds _cond while it takes _answer_lock (_fail)
            self.metrics.restarts.inc(len(restart))
            with self._cond:
                self._rows.extendleft(Row(j, i, j.epoch) for j in restart for i in reversed(range(len(j.rows))))
                self.metrics.queue_depth.set(len(self._rows))
                self._cond.notify()

    def _answer(
        self,
        rows: list[Row],
        entries: list[Entry],
        rows_logits: np.ndarray,
        start_s: float,
        compute_s: float,
        restart: list[Job],
    ) -> int:
        """Hand each row its logits and answer the requests it completes; returns the requests in the batch.
        Requests whose rows met two versions of their variant are reset and added to `restart`."""
        seen: set[int] = set()
        now = time.time()
        for row, entry, p in zip(rows, entries, rows_logits, strict=True):
            job = row.job
            if row.epoch != job.epoch or job.cancelled:
                continue
            if job.entry is None:
                job.entry = entry
            elif job.entry is not entry:  # a swap landed between this request's batches: all of it again
                job.epoch += 1
                job.entry, job.logits, job.remaining = None, [None] * len(job.rows), len(job.rows)
                restart.append(job)
                continue
            job.logits[row.index] = p
            job.remaining -= 1
            wait_s = start_s - job.enqueued_s
            self.metrics.queue_wait.labels(job.variant).observe(wait_s)
            job.queue_ms = max(job.queue_ms, wait_s * 1e3)
            if id(job) not in seen:
                seen.add(id(job))
                job.compute_ms += compute_s * 1e3
            entry.usage.last_used = now
            if job.remaining == 0 and not job.cancelled:
                entry.usage.request_count += 1
                job.done(job, None)
        return len(seen)

    def _make_resident(self, batch: list[tuple[Row, Entry]]) -> list[tuple[Row, Entry]]:
        """`batch` with every adapter resident: LRU-evicted ones reloaded transparently (a cold load); rows
        whose reload failed are answered 503 and left out.

        A row picked with an evicted version that a hot-swap replaced since (commit_beside, on the swap
        worker, after _pick or while a reload here reads the disk) is served by the version now holding
        the name, as if it had arrived after the swap; the old version stays out of the bank. Re-mapped
        under the runtime's lock until nothing is cold, so no forward ever runs an entry without weights
        (a replacement is resident from its commit: a second round finds nothing cold)."""
        rt = self.runtime
        failed: set[str] = set()
        for attempt in range(MAX_RELOAD_ROUNDS):
            with rt.lock:
                batch = [(r, e if e.resident else rt.entries.get(e.name, e)) for r, e in batch if e.name not in failed]
            cold = {e.name: e for _, e in batch if not e.resident}
            if not cold:
                return batch
            if attempt == 0:
                self._wait_idle()  # a reload may grow the bank's stacks and evict what a running batch reads
            names = {e.name for _, e in batch}
            for name, entry in sorted(cold.items()):
                t0 = time.perf_counter()
                try:
                    if rt.ensure_resident(entry, protect=names):
                        self.metrics.adapter_load.labels("lora", "cold").observe(time.perf_counter() - t0)
                except Exception as e:
                    log.warning("cold reload of %s failed: %s", name, e)
                    failed.add(name)
                    self._fail_rows(
                        batch,
                        name,
                        Unavailable(
                            f"reloading evicted adapter '{name}' failed: {e}; check the store",
                            headers={"Retry-After": "1"},
                        ),
                    )
            self._update_gauges()
        for name in {e.name for _, e in batch if not e.resident}:  # swaps kept taking these names meanwhile
            self._fail_rows(
                batch,
                name,
                Unavailable(
                    f"adapter '{name}' was replaced repeatedly while it reloaded; retry", headers={"Retry-After": "1"}
                ),
            )
        return [(r, e) for r, e in batch if e.resident]

    def _fail_rows(self, batch: list[tuple[Row, Entry]], name: str, error: Exception) -> None:
        for row, entry in batch:
            if entry.name == name:
                self._fail(row.job, error)

    @staticmethod
    def _ids_for(row: Row, entry: Entry) -> list[int]:
        if row.job.tok_key != entry.tok_key:  # a replacement brought another tokenizer (or a stale front-end)
            row.job.rows = entry.encode(row.job.texts)
            row.job.tok_key = entry.tok_key
        return row.job.rows[row.index]

    def _fail(self, job: Job, error: Exception) -> None:
        with self._answer_lock:  # exactly one answer, whichever lane gets there first
            if not job.cancelled:
                job.cancelled = True
                job.done(job, error)

    def _update_gauges(self) -> None:
        self.metrics.loaded_adapters.set(self.runtime.resident_adapters())
        self.metrics.loaded_variants.set(len(self.runtime.entries))


def _nice_thread(nice: int) -> None:
    """Raise this thread's niceness by `nice` (os.nice acts on the calling thread on Linux, as for
    --frontend-nice in service/__main__.py; where it does not exist this is a no-op)."""
    if nice:
        with contextlib.suppress(AttributeError, OSError):
            os.nice(nice)
