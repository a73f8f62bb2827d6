"""The engine's supervisor: start the engine process, restart it when it dies, stop it with a drain.

Lives in the process that starts the service (`python -m service`, or `create_app` in tests).
A crash is logged and the engine restarted after a short back-off; front-ends notice the lost
connection at once (the engine's end of their socket closes) and answer 503 + Retry-After until it is back. If it
keeps dying (MAX_CRASHES within CRASH_WINDOW_S, or MAX_CRASHES in a row before one of them was ready) the
supervisor gives up and calls `on_give_up`, so the service exits non-zero for its own supervisor (systemd,
Kubernetes) instead of looping. The second rule is for an engine that dies at startup (a model that does not
fit in memory, a device that fails): its crashes are as far apart as a startup takes, which for a real model
can exceed CRASH_WINDOW_S / MAX_CRASHES, and the window alone then restarted it forever.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.config import ServiceConfig

log = logging.getLogger("service.supervisor")
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class EngineSupervisor:
    def __init__(self, cfg: ServiceConfig, on_give_up: Callable[[], None] | None = None):
        self.cfg = cfg
        self._dir = Path(tempfile.mkdtemp(prefix="agnews-engine-"))
        self.address = f"unix://{self._dir}/engine.sock"
        self.on_give_up = on_give_up or (lambda: None)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.failed = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._ready_r: int | None = None  # read end of the pipe the running engine writes one byte to once ready

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> EngineSupervisor:
        self._spawn()
        self._watcher.start()
        return self

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the engine's gauges are live values, one process
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # glibc gives each thread that allocates (batcher, socket, swap worker) its own heap arena and
        # keeps freed pages per arena: measured on the memory sweep (MiniLM, 1 -> 8 adapters) +13.9 MiB
        # with the default, +5.6 MiB with one arena. Two leave the batcher and the swap worker apart.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        cmd = [
            sys.executable,
            "-m",
            "service.engine",
            "--address",
            self.address,
            "--config",
            # not the admin key: the engine never checks it, and a command line is readable by every local user (ps)
            self.cfg.model_dump_json(exclude={"api_key"}),
            "--parent-pid",
            str(os.getpid()),
        ]
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        cmd += ["--ready-fd", str(ready_w)]
        with self._lock:
            if self._stopping.is_set():
                os.close(ready_r)
            else:
                # its own session: a signal to the service's process group (Ctrl-C, `kill -- -PGID`) must not
                # make the engine drain and exit while uvicorn still finishes in-flight requests (and this
                # watcher restart it as crashed); stop() signals it after them, and the engine exits by itself
                # when this process dies (it polls its parent)
                self.proc = subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=Path(__file__).resolve().parents[1],
                    start_new_session=True,
                    pass_fds=(ready_w,),
                )
                self._ready_r = ready_r
        os.close(ready_w)  # the engine holds the write end: the read end sees its byte, or nothing once it dies

    def _was_ready(self) -> bool:
        """Whether the engine that just exited had finished its startup loads (it wrote its byte)."""
        fd, self._ready_r = self._ready_r, None
        if fd is None:
            return False
        try:
            return os.read(fd, 1) == b"r"
        except BlockingIOError:  # a child of the engine still holds the write end, and nothing was written
            return False
        finally:
            os.close(fd)

    def _watch(self) -> None:
        crashes: list[float] = []
        unready = 0  # crashes in a row of engines that died before they were ready
        while not self._stopping.is_set():
            proc = self.proc
            rc = proc.wait() if proc else 0
            if self._stopping.is_set():
                return
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
            unready = 0 if self._was_ready() else unready + 1
            log.error(
                "engine process %s exited with status %s (crash %d within %.0fs; %d in a row before it was ready)",
                proc.pid,
                rc,
                len(crashes),
                CRASH_WINDOW_S,
                unready,
            )
            if len(crashes) >= MAX_CRASHES or unready >= MAX_CRASHES:
                log.error("the engine keeps dying; giving up so the service exits non-zero")
                self.failed = True
                self.on_give_up()
                return
            time.sleep(BACKOFF_S[min(len(crashes), len(BACKOFF_S)) - 1])
            self.restarts += 1
            self._spawn()

    def stop(self, drain_timeout_s: float = 30.0) -> int | None:
        """SIGTERM the engine (it drains its queue), wait, kill if it does not exit; returns its status."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        rc = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=drain_timeout_s + 5)
            except subprocess.TimeoutExpired:
                log.error("engine %s did not stop within %.0fs; killing it", proc.pid, drain_timeout_s + 5)
                proc.kill()
                rc = proc.wait()
        elif proc is not None:
            rc = proc.returncode
        shutil.rmtree(self._dir, ignore_errors=True)
        return rc
