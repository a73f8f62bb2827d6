"""`python -m service --store DIR ...`: run the service under uvicorn (see service/config.py)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from service.app import create_app
    from service.config import load_config

    cfg = load_config(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # On SIGTERM/SIGINT uvicorn stops accepting, waits for in-flight requests (bounded by
    # timeout_graceful_shutdown), then the lifespan drains the batcher queue and exits.
    uvicorn.run(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=int(cfg.request_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
