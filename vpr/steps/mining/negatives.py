"""Hard negatives in descriptor space, refreshed during training.

Before each chunk of ``train.refresh_every`` queries, descriptors are computed in inference mode for
the chunk's queries, their hard positives and the candidate negatives (``full``: the whole database;
``partial``: one shared random database sample; ``random``: none), and each query's triplet is picked
from one distance matrix (``vpr.shared.triplets.select_triplets``): the nearest hard positive, and the
nearest candidates that are not soft positives. Mining costs one inference pass per refresh instead of
a per-query loop.
"""

from __future__ import annotations

import numpy as np
import torch

from vpr.foundations.config import Config
from vpr.shared.descriptors import extract
from vpr.shared.distributed import current, gather_descriptors
from vpr.shared.models import VPRModel
from vpr.shared.shardio import ShardReader
from vpr.shared.splits import SplitData
from vpr.shared.triplets import select_triplets
from vpr.shared.trunk import TrunkCache


def encode_ids(
    model: VPRModel,
    reader: ShardReader,
    ids: np.ndarray,
    transform,
    device: torch.device,
    cache: TrunkCache | None,
    *,
    batch_size: int,
    workers: int,
) -> np.ndarray:
    """Inference-mode descriptors of ``ids``, from the trunk cache when there is one; a share per rank,
    all-gathered (every rank gets all of them)."""

    def encode(some: np.ndarray) -> np.ndarray:
        if cache is not None:
            return cache.descriptors(some, batch_size)
        return extract(model, reader, some, transform, device=device, batch_size=batch_size, workers=workers)

    return gather_descriptors(np.asarray(ids), encode, model.descriptor_dim, current(), device)


def negative_candidates(mode: str, n_db: int, sample: int, rng: np.random.Generator) -> np.ndarray:
    """Database indices a refresh considers as negatives: all (``full``), a sorted random sample of
    ``sample`` (``partial``), or none (``random``: triplets then draw negatives at random)."""
    if mode == "full":
        return np.arange(n_db)
    if mode == "partial":
        return np.sort(rng.choice(n_db, size=min(sample, n_db), replace=False))
    return np.empty(0, dtype=np.int64)


def mine_triplets(
    model: VPRModel,
    reader: ShardReader,
    train: SplitData,
    chunk: np.ndarray,
    transform,
    cfg: Config,
    device: torch.device,
    rng: np.random.Generator,
    cache: TrunkCache | None = None,
) -> np.ndarray:
    """Refresh descriptors for a chunk of training queries (indices into ``train.q_ids``) and pick
    their triplets: a ``len(chunk)×(1+negatives)`` array of database indices (best positive first)."""
    tc = cfg.train
    n_db = len(train.db_ids)
    candidates = negative_candidates(tc.mining, n_db, tc.negative_sample, rng)
    positives = np.concatenate([train.hard[i] for i in chunk])
    pool_idx = np.unique(np.concatenate([positives, candidates]))
    kw = {"batch_size": cfg.evaluate.batch_size, "workers": cfg.train.workers}
    if cache is not None:  # the refresh's images not cached yet, encoded together
        cache.ensure(np.concatenate([train.db_ids[pool_idx], train.q_ids[chunk]]))
    pool_desc = encode_ids(model, reader, train.db_ids[pool_idx], transform, device, cache, **kw)
    q_desc = encode_ids(model, reader, train.q_ids[chunk], transform, device, cache, **kw)
    return select_triplets(
        q_desc,
        pool_desc,
        pool_idx,
        [train.hard[i] for i in chunk],
        [train.soft[i] for i in chunk],
        candidates,
        tc.negatives,
        n_db,
        rng,
    )
