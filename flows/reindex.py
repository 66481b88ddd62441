"""Flow ``reindex``: add new inbox imagery to the shards, catalog and live release (logic: ``vpr.steps.reindex``).

At most one run at a time: the flow holds a slot of the Prefect global concurrency limit
``vpr-reindex`` (limit 1, created on first use) for its whole body, and the served deployment also has
``concurrency_limit=1`` (a scheduled run that collides with a running one is cancelled, not queued).
After a batch is added the flow records the changed outputs in DVC (``data.dvc`` and the stages that
own the catalog, shards and release) and publishes a summary artifact.
"""

from __future__ import annotations

import argparse
import json
import sys

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

import tasks
from flows.common import resolve
from vpr.foundations.layout import Layout

CONCURRENCY_LIMIT = "vpr-reindex"


def ensure_concurrency_limit(name: str = CONCURRENCY_LIMIT, limit: int = 1) -> None:
    """Create (or reset to ``limit``) the global concurrency limit the flow runs under."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


@flow(name="reindex", log_prints=True)
def reindex(
    params: str = "params.yaml", root: str = ".", record_dvc: bool = True, wait_timeout_s: float | None = None
) -> dict:
    """Validate and add the inbox's new images (or finish a batch a crashed run left pending)."""
    cfg, root_path, _ = resolve(params, root)
    layout = Layout.from_config(cfg, root_path)
    ensure_concurrency_limit()
    with concurrency(CONCURRENCY_LIMIT, occupy=1, strict=True, timeout_seconds=wait_timeout_s):
        step = tasks.reindex_batch.with_options(retries=cfg.orchestration.task_retries, retry_delay_seconds=5)
        summary = step(cfg, str(root_path))
        if summary["added"] and record_dvc:
            split = layout.split_shards(cfg.orchestration.reindex_split)
            paths = [layout.catalog_dir, split, *(layout.release_dir(h) for h in summary["releases"])]
            summary["dvc"] = tasks.record_in_dvc(str(root_path), tasks.stages_writing(root_path, paths))
    if summary["added"] or summary["rejected"]:
        tasks.publish_reindex_summary(summary)
    print(summary["note"] + (f"; quarantined {len(summary['rejected'])}" if summary["rejected"] else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.reindex", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--no-dvc", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(reindex(params=args.params, root=args.root, record_dvc=not args.no_dvc), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
