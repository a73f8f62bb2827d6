"""Shared helpers: test-split loading, results JSON with provenance, free ports, store copies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_DATA = os.environ.get("AGNEWS_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"))


def load_split(data: str | os.PathLike | None = None, split: str = "test") -> tuple[list[str], list[int]]:
    """(texts, labels) of an AG News split: a thin call into training's reader (training.data.read_split),
    so benchmarks and training evaluation read the same file the same way.

    `data` is a local dir/file (parquet, csv, jsonl) or a Hub id; default: AGNEWS_DATA or ../shared/data/ag_news.
    """
    from training.data import read_split

    df = read_split(str(data or DEFAULT_DATA), split)
    return df["text"].tolist(), df["label"].astype(int).tolist()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (small race window; fine for loopback tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_adapter(store_root: str | os.PathLike, source: str, new_name: str) -> Path:
    """Copy LoRA variant `source` as `new_name` in the same store, rewriting only manifest.name.

    The file hashes in the manifest stay valid because no weight file changes; used to
    measure the service with many resident adapters without training each one.
    """
    from models import Store
    from models.atomic import atomic_dir
    from models.manifest import Manifest

    store = Store(store_root)
    src = store.path(source)
    dst = store.root / new_name
    if dst.exists():
        return dst
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        m = Manifest.load(tmp)
        m.name = new_name
        m.save(tmp)
    return dst


def wait_http_ok(url: str, timeout_s: float = 120.0, proc: Any = None) -> None:
    """Poll `url` until it answers 200; raise with a clear message on timeout or if `proc` exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before {url} was ready")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s (last: {last})")


@contextmanager
def running_server(
    cmd: list[str],
    ready_url: str,
    log_path: str | os.PathLike | None = None,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Start a server subprocess, wait until `ready_url` answers 200, stop it (SIGTERM, then kill) on exit.

    Output goes to `log_path` (or a temporary file); on a failed start its tail is raised
    with the error so the cause is visible.
    """
    log = open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        try:
            wait_http_ok(ready_url, timeout_s=timeout_s, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            log.flush()
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{e}\ncommand: {' '.join(cmd)}\n--- server output (tail) ---\n{tail}") from e
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
