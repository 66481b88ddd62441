"""Prefect tasks: thin wrappers of the ``vpr`` pipeline steps (caching, retries, artifacts, DVC records)."""

from tasks.artifacts import publish_reindex_summary, publish_results
from tasks.cache import StageInputs, StageSpec, outputs_present, stage_key, stage_specs
from tasks.dvc import record_in_dvc, stages_writing
from tasks.encode import detached_jobs, encode_detached, encode_shard, stage_shards, store_detached
from tasks.logs import show_vpr_logs
from tasks.pipeline import configure, run_stage
from tasks.reindex import reindex_batch

show_vpr_logs()  # wherever tasks run (threads, Dask workers), vpr's messages go to the run's log

__all__ = [
    "StageInputs",
    "StageSpec",
    "configure",
    "detached_jobs",
    "encode_detached",
    "encode_shard",
    "outputs_present",
    "publish_reindex_summary",
    "publish_results",
    "record_in_dvc",
    "reindex_batch",
    "run_stage",
    "show_vpr_logs",
    "stage_key",
    "stage_shards",
    "stage_specs",
    "stages_writing",
    "store_detached",
]
