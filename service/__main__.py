"""`python -m service --store DIR ...`: the engine process plus --frontends HTTP processes on one port.

This process supervises the engine (service/supervisor.py) and runs uvicorn: the front-end itself
when --frontends is 1, else uvicorn's worker manager with N front-end processes sharing the listening
socket. On SIGTERM/SIGINT uvicorn stops accepting and waits for in-flight requests (bounded by
--request-timeout-s), then the engine drains its queue and exits; the status is 0, or 1 when the
engine kept crashing and the supervisor gave up.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from service.app import CONFIG_ENV, create_app
    from service.config import load_config
    from service.supervisor import EngineSupervisor

    cfg = load_config(argv)
    if cfg.device == "cuda":  # else the engine dies in its constructor 5 times (a torch traceback each) first
        import torch

        if not torch.cuda.is_available():  # a configuration error: exit 2, as argparse's are
            print(
                f"python -m service: error: --device cuda, but torch {torch.__version__} sees no CUDA device "
                "(CPU-only build or no driver); use --device cpu",
                file=sys.stderr,
            )
            sys.exit(2)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    supervisor = None
    frontend_cfg = cfg
    if not cfg.engine_address:  # else front-ends only, for the engine running there
        supervisor = EngineSupervisor(cfg, on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        frontend_cfg = cfg.model_copy(update={"engine_address": supervisor.address})
    if cfg.frontend_nice:
        # nice is per thread on Linux and inherited: the supervisor's thread (which (re)starts the engine)
        # already runs at 0; this thread, uvicorn's and any front-end worker processes get the niceness
        os.nice(cfg.frontend_nice)
    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place that
    # returns here (and the engine is drained below) instead of killing the process.
    signal.signal(signal.SIGTERM, lambda *_: None)
    common = dict(
        host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=int(cfg.request_timeout_s) + 5
    )
    metrics_dir = None
    try:
        if cfg.frontends == 1:
            uvicorn.run(create_app(frontend_cfg), **common)
        else:  # worker processes build their app from the config in the environment
            metrics_dir = tempfile.mkdtemp(prefix="agnews-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            os.environ[CONFIG_ENV] = frontend_cfg.model_dump_json()
            uvicorn.run("service.app:app_from_env", factory=True, workers=cfg.frontends, **common)
    finally:
        if supervisor is not None:
            supervisor.stop(drain_timeout_s=cfg.request_timeout_s)
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(1 if supervisor is not None and supervisor.failed else 0)


if __name__ == "__main__":
    main()
