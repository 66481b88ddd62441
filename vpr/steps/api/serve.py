"""``vpr api``: uvicorn running the service for the configured release."""

from __future__ import annotations

import logging

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.shared.release import ReleaseError as ReleaseError  # what `vpr api` reports without a release
from vpr.steps.api.app import create_app
from vpr.steps.api.live import LiveRelease

logger = logging.getLogger(__name__)


def build_app(cfg: Config, head: str | None = None, *, watch: bool = True):
    """The FastAPI app over ``head``'s live release (default ``index.head``) of this project."""
    layout = Layout.from_config(cfg)
    live = LiveRelease(
        layout.release_dir(head or cfg.index.head), device=cfg.train.device, shards_dir=layout.shards_dir
    )
    return create_app(live, cfg.api, cfg.locate, watch=watch)


def serve(cfg: Config, head: str | None = None, host: str | None = None, port: int | None = None) -> None:
    """Run the service in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    app = build_app(cfg, head)
    host, port = host or cfg.api.host, cfg.api.port if port is None else port
    logger.info("vpr api: release %s on http://%s:%d (docs at /docs)", app.state.live.current().version, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
