"""Encoding on a worker that does not share the project folder (a Dask worker on another machine).

The driver sends each worker what decides the bits of a shard's descriptors: the model as bytes, the
config, and the shard's rows of the shard index. The worker streams the shard (from
``resources.shards_url``, or from the driver's shard folder when the folder is shared), encodes it and
sends the descriptors back; the driver writes them into its own descriptor store. Nothing is written on
a worker, so a worker that dies mid-shard leaves nothing half-written: Dask gives the shard to another
worker and the store only ever sees whole entries, written atomically by the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.shared.checkpoints import model_bytes, model_from_bytes
from vpr.shared.descriptors import resolve_device
from vpr.shared.descstore import DescriptorStore, encode_plan, encoder_for, head_model
from vpr.shared.shardio import ShardError, ShardReader, shard_plans
from vpr.shared.shardnet import remote_shards


@dataclass(frozen=True)
class ShardJob:
    """One shard to encode elsewhere: its name, its shard-index rows and the model's bytes."""

    shard: str
    rows: pl.DataFrame
    model: bytes
    shards_dir: str  # the driver's shard folder: read there when no ``resources.shards_url`` is set


@dataclass(frozen=True)
class EncodedShard:
    """What a worker sends back: the store key its encoder gives, the descriptors and the sidecar facts."""

    shard: str
    key: str
    descriptors: np.ndarray
    info: dict


def shard_jobs(
    head: str, cfg: Config, layout: Layout, shards: Sequence[str], *, untrained: bool = False
) -> list[ShardJob]:
    """The jobs of ``shards`` whose entry this process's encoder does not find in the store."""
    device = resolve_device(cfg.train.device)
    model = head_model(head, cfg, layout, device, untrained=untrained)
    encoder = encoder_for(model, cfg, device)
    index = ShardReader(layout.shards_dir).index
    store = DescriptorStore(layout.descriptors_dir)
    payload = model_bytes(model, head, cfg.model)
    jobs = []
    for shard in shards:
        rows = index.filter(pl.col("shard") == shard)
        if rows.is_empty():
            raise ShardError(f"no shard {shard} in the shard index of {layout.shards_dir}")
        (plan,) = shard_plans(rows, layout.shards_dir)
        if store.info(encoder.key(plan)) is None:
            jobs.append(ShardJob(shard, rows, payload, str(layout.shards_dir)))
    return jobs


def encode_job(job: ShardJob, cfg: Config) -> EncodedShard:
    """Encode one job where it runs (no project folder needed); the descriptors come back, nothing is kept."""
    device = resolve_device(cfg.train.device)
    encoder = encoder_for(model_from_bytes(job.model, device, f"the model of {job.shard}"), cfg, device)
    (plan,) = shard_plans(job.rows, remote_shards(cfg.resources) or job.shards_dir)
    descriptors, info = encode_plan(encoder, plan)
    return EncodedShard(job.shard, encoder.key(plan), descriptors, info)


def store_encoded(result: EncodedShard, layout: Layout) -> bool:
    """Write a worker's descriptors into this project's store (atomically); False when already there."""
    store = DescriptorStore(layout.descriptors_dir)
    if store.info(result.key) is not None:
        return False
    store.save(result.key, result.descriptors, result.info)
    return True
