"""What a ``train-all`` run is doing, in the run the user watches: stage names as they start and finish,
with the cache hits counted.

The stages run as task runs of the ``train-all-steps`` subflow, but ``prefect deployment run train-all/train-all
--watch`` follows the parent run's own logs and events only (and the UI opens on the parent run): so the
progress lines go to the parent ``train-all`` run's logger (to the subflow's own when it runs alone).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.logging.loggers import flow_run_logger
from prefect.states import State


def watched_run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger of the flow run a user watches: this flow run's parent when it is a subflow."""
    context = FlowRunContext.get()
    parent_task_run = context.flow_run.parent_task_run_id if context and context.flow_run else None
    if parent_task_run is None:
        return get_run_logger()
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(client.read_task_run(parent_task_run).flow_run_id)
        flow = client.read_flow(parent.flow_id)
    return flow_run_logger(flow_run=parent, flow=flow)  # type: ignore[arg-type]  # only .name is read


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``: what a person reads at a glance."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class StageProgress:
    """Start and finish lines of every stage with running counts: done, cache hits, failed."""

    def __init__(self, total: int, log: Any) -> None:
        self.total, self.log = total, log
        self.started_at: dict[str, float] = {}
        self.done = self.hits = self.failed = 0
        self.t0 = time.monotonic()

    def started(self, stage: str) -> None:
        self.started_at[stage] = time.monotonic()
        self.log.info("started  %s (%d of %d stages started)", stage, len(self.started_at), self.total)

    def finished(self, stage: str, state: State) -> None:
        took = duration(time.monotonic() - self.started_at.get(stage, self.t0))
        if state.is_completed():
            self.done += 1
            cached = state.name == "Cached"
            self.hits += cached
            how = "cache hit" if cached else f"ran {took}"
            self.log.info("finished %s: %s (%s)", stage, how, self.counts())
        else:
            self.failed += 1
            self.log.error("FAILED   %s after %s: %s (%s)", stage, took, state.message or state.name, self.counts())

    def counts(self) -> str:
        return f"{self.done} of {self.total} done, {self.hits} cache {'hit' if self.hits == 1 else 'hits'}"

    def summary(self) -> str:
        """The closing line: how many stages ran, came from the cache, failed or never started."""
        not_run = self.total - len(self.started_at)
        return (
            f"stages: {self.done} of {self.total} done in {duration(time.monotonic() - self.t0)}, "
            f"{self.hits} cache {'hit' if self.hits == 1 else 'hits'} and {self.done - self.hits} ran"
            + (f", {self.failed} failed" if self.failed else "")
            + (f", {not_run} not run (upstream failed)" if not_run else "")
        )
