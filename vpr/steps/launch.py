"""Train one head in this process, or as ``train.nproc`` data-parallel ranks started through torchrun.

The CLI (``vpr train --nproc N``), DVC's ``train`` stages (``train.nproc`` in params.yaml) and the Prefect
``train`` task all come here, so a multi-rank run is started the same way whichever runs it, and each
gets the same summary back. The ranks read the exact configuration this process holds (written to a
temporary params file), and run in the project root so that its relative paths mean the same.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.shared.checkpoints import load_checkpoint
from vpr.shared.distributed import launch
from vpr.steps.train import train_head


class LaunchError(RuntimeError):
    """The ranks did not all finish."""


def train_head_ranks(
    head: str,
    cfg: Config,
    layout: Layout,
    *,
    nproc: int | None = None,
    resume: bool = False,
    rank_argv: list[str] | None = None,
) -> dict:
    """``train_head`` on ``nproc`` ranks (default ``train.nproc``); in-process when 1 or already a rank.

    Each rank runs ``python -m vpr.cli --no-summary RANK_ARGV --params <this config>`` (the caller's
    command line for this training: ``vpr.pipeline`` gives it).
    """
    nproc = nproc or cfg.train.nproc
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return train_head(head, cfg, layout, resume=resume)
    with tempfile.TemporaryDirectory(prefix="vpr-ranks-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        if rank_argv is None:
            raise LaunchError(f"training {head} on {nproc} ranks needs the command each rank runs")
        argv = ["--no-summary", *rank_argv, "--params", str(params)]
        code = launch(nproc, argv, cwd=layout.root)
    if code != 0:
        raise LaunchError(f"training {head} on {nproc} ranks failed: torchrun exited with status {code}")
    last = load_checkpoint(layout.last_checkpoint(head))
    return {
        "head": head,
        "select_by": f"recall@{cfg.train.for_head(head).select_by}",
        "best_val_recall": last["best_val_recall"],
        "epochs": len(last["history"]),
        "history": last["history"],
        "ranks": last["ranks"],
    }
