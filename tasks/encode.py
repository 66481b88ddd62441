"""Descriptor extraction as a map over shards: one Prefect task per (stage, shard), on any task runner.

A stage that reads descriptors (``evaluate@H``, ``baseline``, ``index``) is preceded by one
``encode_shard`` task per shard it reads; each writes its shard's entry of the descriptor store
(``vpr.shared.descstore``), so the stage itself finds every shard encoded and only searches or indexes. On the
Dask task runner (``orchestration.task_runner: dask``) the shards are encoded on all workers at once.
A task's cache key is its stage's inputs plus the shard; the store is content-addressed as well, so an
unchanged shard is never encoded twice either way.

On a Dask cluster whose workers do not share the project folder (``orchestration.dask_address``),
``encode_detached`` runs on the workers instead: each gets the model's bytes and its shard's index rows,
streams the shard from ``resources.shards_url`` and sends the descriptors back; ``store_detached`` writes
them into the store in the flow's process (``vpr.shared.detached``).

Nothing here imports torch until a task body runs: a cached re-run of ``train-all`` (every task a cache
hit) never loads it (tests/test_flows.py checks). The task bodies import the steps' modules first, one
thread at a time (``vpr.pipeline.import_steps``), as ``run_stage`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.cache import StageInputs
from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.pipeline import import_steps, stage_model
from vpr.pipeline import stage_shards as shards_of

if TYPE_CHECKING:
    from vpr.shared.detached import EncodedShard, ShardJob


@task(
    name="encode-shard",
    task_run_name="encode@{shard}[{stage}]",
    cache_policy=StageInputs(stage="{stage}", inputs=("shard",)),
    persist_result=True,
)
def encode_shard(cfg: Config, root: str, stage: str, shard: str) -> dict:
    """The descriptors of one shard with the model of ``stage`` → the descriptor store."""
    import_steps()
    from vpr.shared.descstore import encode_named_shards

    head, untrained = stage_model(cfg, stage)
    (part,) = encode_named_shards(head, cfg, Layout.from_config(cfg, Path(root)), [shard], untrained=untrained)
    return {"shard": shard, "stage": stage, "encoded": part.encoded, "images": len(part.ids)}


def stage_shards(cfg: Config, root: str | Path, stage: str) -> list[str]:
    """The shards a descriptor-reading stage encodes (empty for any other stage): ``vpr.pipeline`` says."""
    return shards_of(cfg, Layout.from_config(cfg, Path(root)), stage)


def detached_jobs(cfg: Config, root: str, stage: str) -> list[ShardJob]:
    """The shards of ``stage`` that the store lacks, as jobs for workers without the project folder."""
    import_steps()
    from vpr.shared.detached import shard_jobs

    layout = Layout.from_config(cfg, Path(root))
    head, untrained = stage_model(cfg, stage)
    return shard_jobs(head, cfg, layout, shards_of(cfg, layout, stage), untrained=untrained)


@task(name="encode-detached", task_run_name="encode@{job.shard}", cache_policy=NO_CACHE, persist_result=False)
def encode_detached(cfg: Config, job: ShardJob) -> EncodedShard:
    """One shard encoded on whichever worker runs this: the descriptors come back to the flow."""
    import_steps()
    from vpr.shared.detached import encode_job

    return encode_job(job, cfg)


@task(name="store-detached", task_run_name="store@{result.shard}", cache_policy=NO_CACHE, persist_result=False)
def store_detached(cfg: Config, root: str, result: EncodedShard) -> dict:
    """A worker's descriptors into the project's store, from the flow's own process."""
    import_steps()
    from vpr.shared.detached import store_encoded

    stored = store_encoded(result, Layout.from_config(cfg, Path(root)))
    return {"shard": result.shard, "encoded": stored, "images": len(result.descriptors)}
