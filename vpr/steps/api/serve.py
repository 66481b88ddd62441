"""``vpr api``: uvicorn running the service for the configured release."""

from __future__ import annotations

import logging

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.shared.release import ReleaseError as ReleaseError  # what `vpr api` reports without a release
from vpr.steps.api.app import create_app
from vpr.steps.api.guards import uvicorn_config
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

    api = cfg.api.model_copy(update={"host": host or cfg.api.host, "port": cfg.api.port if port is None else port})
    app = build_app(cfg.model_copy(update={"api": api}), head)  # the bound host is an allowed Host
    version = app.state.live.current().version
    logger.info("vpr api: release %s on http://%s:%d (schema at /openapi.json)", version, api.host, api.port)
    config = uvicorn_config(app, api, host=api.host, port=api.port, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
