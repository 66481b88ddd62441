"""Prefect tasks: thin wrappers of the ``vpr`` pipeline steps (caching, retries, artifacts, DVC records)."""

from tasks.artifacts import publish_reindex_summary, publish_results
from tasks.cache import StageInputs, StageSpec, outputs_present, stage_key, stage_specs
from tasks.dvc import record_in_dvc, stages_writing
from tasks.pipeline import baseline, configure, evaluate, index, ingest, mine, report, shard, train
from tasks.reindex import reindex_batch

__all__ = [
    "StageInputs",
    "StageSpec",
    "baseline",
    "configure",
    "evaluate",
    "index",
    "ingest",
    "mine",
    "outputs_present",
    "publish_reindex_summary",
    "publish_results",
    "record_in_dvc",
    "reindex_batch",
    "report",
    "shard",
    "stage_key",
    "stage_specs",
    "stages_writing",
    "train",
]
