"""Thin Prefect tasks around the pipeline steps of ``vpr`` — one implementation per step, no logic here.

Every task takes the validated ``Config`` and the project ``root`` (paths and config only: objects such
as tensors never travel between tasks, so cache keys stay content-based). Each task's cache key is its
DVC stage's dependency contents + params values + the wrapper's source (``tasks.cache``), so re-running
with nothing changed skips the work, while any edit to an input file, a relevant param or the code
re-runs exactly the affected steps. Retries come from ``orchestration.task_retries`` (``configure``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task

from tasks.cache import StageInputs, outputs_present
from vpr.config import Config
from vpr.layout import Layout

RETRY_DELAY_S = [5, 30, 120]


def _layout(cfg: Config, root: str) -> Layout:
    return Layout.from_config(cfg, Path(root))


@task(name="ingest", task_run_name="ingest", cache_policy=StageInputs(stage="ingest"), persist_result=True)
def ingest(cfg: Config, root: str) -> dict:
    """Validate every image of ``data/`` once → ``artifacts/catalog`` (one catalog per split + rejected list)."""
    from vpr.catalog import ingest as run_ingest

    layout = _layout(cfg, root)
    result = run_ingest(layout.data, layout.catalog_dir, cfg.ingest)
    return {
        "accepted": result.accepted,
        "rejected": result.rejected,
        "catalog": str(layout.catalog_dir),
        "rejected_files": result.rejected_table.head(50).to_dicts(),
    }


@task(name="shard", task_run_name="shard@{split}", cache_policy=StageInputs(stage="shard@{split}"), persist_result=True)
def shard(cfg: Config, root: str, split: str) -> dict:
    """Pack one split's cataloged images into WebDataset tars → ``artifacts/shards/{split}``."""
    from vpr.shards import write_shards

    layout = _layout(cfg, root)
    index = write_shards(layout.catalog(split), layout.data, layout.split_shards(split), cfg.shards)
    return {"index": str(index)}


@task(name="mine", task_run_name="mine@{split}", cache_policy=StageInputs(stage="mine@{split}"), persist_result=True)
def mine(cfg: Config, root: str, split: str) -> dict:
    """UTM positives per query of one split → ``artifacts/mining/{split}.parquet``."""
    from vpr.mining import mine_all

    layout = _layout(cfg, root)
    return {
        s: str(path) for s, path in mine_all(layout.catalog(split), layout.mining_dir, cfg.mining, (split,)).items()
    }


@task(name="train", task_run_name="train@{head}", cache_policy=StageInputs(stage="train@{head}"), persist_result=True)
def train(cfg: Config, root: str, head: str) -> dict:
    """Triplet-train one head → ``artifacts/models/{head}`` (CRN reads NetVLAD's checkpoint).

    With ``train.nproc`` > 1 the task starts that many data-parallel ranks through torchrun and waits.
    """
    from vpr.launch import train_head_ranks

    summary = train_head_ranks(head, cfg, _layout(cfg, root))
    return {k: v for k, v in summary.items() if k != "history"} | {"epochs_run": len(summary.get("history", []))}


@task(
    name="evaluate",
    task_run_name="evaluate@{head}",
    cache_policy=StageInputs(stage="evaluate@{head}"),
    persist_result=True,
)
def evaluate(cfg: Config, root: str, head: str) -> dict:
    """Recall@N of one trained head on the test split → ``metrics/{head}.json`` + predictions."""
    from vpr.evaluate import evaluate_head

    return evaluate_head(head, cfg, _layout(cfg, root))


@task(name="baseline", task_run_name="baseline", cache_policy=StageInputs(stage="baseline"), persist_result=True)
def baseline(cfg: Config, root: str, head: str = "avg") -> dict:
    """Recall@N of ``head`` with no VPR training (the study's base line) → ``metrics/{head}-untrained.json``."""
    from vpr.evaluate import evaluate_head

    return evaluate_head(head, cfg, _layout(cfg, root), untrained=True)


@task(name="index", task_run_name="index", cache_policy=StageInputs(stage="index"), persist_result=True)
def index(cfg: Config, root: str) -> dict:
    """Build the release (FAISS index + ids + model) of ``index.head`` → ``artifacts/release/{head}``."""
    from vpr.index import build_release

    version = build_release(cfg.index.head, cfg, _layout(cfg, root))
    return {"head": cfg.index.head, "version": str(version)}


@task(name="report", task_run_name="report", cache_policy=StageInputs(stage="report"), persist_result=True)
def report(cfg: Config, root: str) -> dict:
    """The study report (results table, plots) → ``reports/``."""
    from vpr.report import write_report

    return {"report": str(write_report(cfg, _layout(cfg, root)))}


def configure(step: Task, cfg: Config, root: str | Path, stage: str) -> Task:
    """``step`` with the run's retry policy, forced to run when its stage's outputs are missing on disk.

    A cache record says "these inputs gave those outputs"; if the outputs were deleted since, the
    record must not be trusted, so the task refreshes its cache entry instead of reading it.
    """
    retries = cfg.orchestration.task_retries
    options: dict[str, Any] = {"retries": retries, "retry_delay_seconds": RETRY_DELAY_S[: max(1, retries)]}
    if not outputs_present(root, stage):
        options["refresh_cache"] = True
    return step.with_options(**options)
