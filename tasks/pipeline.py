"""One thin Prefect task for every stage of the pipeline — the step itself lives in ``vpr.pipeline``.

The task takes the validated ``Config``, the project ``root`` and the stage name (``train@crn``): paths
and config only, so objects such as tensors never travel between tasks and cache keys stay
content-based. Its cache key is the stage's DVC dependency contents + params values + this wrapper's
source (``tasks.cache``), so re-running with nothing changed skips the work, while any edit to an input
file, a relevant param or the code re-runs exactly the affected steps. Retries come from
``orchestration.task_retries`` (``configure``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task

from tasks.cache import StageInputs, outputs_present
from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.pipeline import import_steps, run_step

RETRY_DELAY_S = [5, 30, 120]


@task(name="stage", task_run_name="{stage}", cache_policy=StageInputs(stage="{stage}"), persist_result=True)
def run_stage(cfg: Config, root: str, stage: str) -> dict:
    """Run one ``dvc.yaml`` stage (``ingest``, ``shard@test``, ``train@crn``) as ``vpr.pipeline`` binds it.

    With ``train.nproc`` > 1 a training starts that many data-parallel ranks through torchrun and waits.
    """
    import_steps()  # before any step runs: parallel tasks must not race through torchvision's import
    return run_step(stage, cfg, Layout.from_config(cfg, Path(root)))


def configure(step: Task, cfg: Config, root: str | Path, stage: str) -> Task:
    """``step`` with the run's retry policy, named after its stage group, forced to run when its stage's
    outputs are missing on disk.

    A cache record says "these inputs gave those outputs"; if the outputs were deleted since, the
    record must not be trusted, so the task refreshes its cache entry instead of reading it.
    """
    retries = cfg.orchestration.task_retries
    options: dict[str, Any] = {"retries": retries, "retry_delay_seconds": RETRY_DELAY_S[: max(1, retries)]}
    if step is run_stage:
        options["name"] = stage.partition("@")[0]
    if not outputs_present(root, stage):
        options["refresh_cache"] = True
    return step.with_options(**options)
