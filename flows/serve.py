"""Serve the deployments: ``train-all/train-all`` (on demand) and ``reindex/reindex`` (cron from params).

    python -m flows.serve [--params params.yaml] [--root .]

Needs a Prefect API: start one with ``prefect server start`` (SQLite, Prefect's default) and point
``PREFECT_API_URL`` at it (``make up`` does both in one shell; or ``make server`` and ``make serve``
in two). Then, from another shell:
``prefect deployment run train-all/train-all --watch``; runs, logs and artifacts are in the UI
(http://127.0.0.1:4200). The serving process executes the runs itself (no work pool needed); for
work pools see ``prefect.yaml`` and ``docs/orchestration.md``.
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.common import resolve
from flows.reindex import reindex
from flows.train_all import train_all


def build_deployments(params: str = "params.yaml", root: str = ".") -> list:
    """The ``RunnerDeployment`` objects ``serve`` runs (parameters point at this project)."""
    cfg, root_path, params_path = resolve(params, root)
    parameters = {"params": str(params_path), "root": str(root_path)}
    return [
        train_all.to_deployment(
            name="train-all",
            parameters=parameters,
            tags=["vpr"],
            description="ingest → shard → mine → train heads → evaluate → index → report → DVC record",
        ),
        reindex.to_deployment(
            name="reindex",
            parameters=parameters,
            tags=["vpr"],
            cron=cfg.orchestration.reindex_cron,
            # ENQUEUE, not CANCEL_NEW: a manual run seconds before a scheduled one waits its turn instead of
            # being cancelled unseen (an extra run over an empty inbox is a no-op)
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description="add new inbox imagery to the shards, catalog and live FAISS release",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    serve(*build_deployments(args.params, args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
