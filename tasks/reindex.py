"""The re-index step as a Prefect task (logic: ``vpr.steps.reindex``)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout


@task(name="reindex-batch")
def reindex_batch(cfg: Config, root: str) -> dict:
    """Resume a pending batch or add the inbox's new images; never cached (the inbox is the input)."""
    from vpr.steps.reindex import run_reindex

    return run_reindex(cfg, Layout.from_config(cfg, Path(root))).to_dict()
