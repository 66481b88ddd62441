"""Triplets: which database images a query is trained against, the images they stack into, and the loss.

Positives come from UTM mining (``vpr.steps.mining``); among a query's hard positives the nearest in
descriptor space is used (the study's "best positive"), and negatives are the nearest candidates
that are not soft positives (hard negatives), topped up at random when too few are available.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vpr.shared.descriptors import stack_images
from vpr.shared.shardio import ShardReader


def select_triplets(
    q_desc: np.ndarray,
    pool_desc: np.ndarray,
    pool_idx: np.ndarray,
    hard: list[np.ndarray],
    soft: list[np.ndarray],
    candidates: np.ndarray,
    n_neg: int,
    n_db: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Per query: [best positive, n_neg hardest negatives] as database indices (m × (1+n_neg)).

    ``pool_idx`` (sorted) lists the database indices whose descriptors are in ``pool_desc``.
    Negatives are the nearest ``candidates`` that are not soft positives; with no candidates (or
    too few) the rest is drawn uniformly from the database's non-positives.
    """
    m = len(q_desc)
    out = np.empty((m, 1 + n_neg), dtype=np.int64)
    cand_rows = np.searchsorted(pool_idx, candidates)
    cand_desc = pool_desc[cand_rows] if len(candidates) else np.empty((0, q_desc.shape[1]), np.float32)
    dist = np.sum(q_desc**2, 1)[:, None] + np.sum(cand_desc**2, 1)[None, :] - 2.0 * q_desc @ cand_desc.T
    for i in range(m):
        pos_rows = np.searchsorted(pool_idx, hard[i])
        d_pos = np.sum((pool_desc[pos_rows] - q_desc[i]) ** 2, 1)
        out[i, 0] = hard[i][int(np.argmin(d_pos))]
        row = dist[i].copy()
        if len(candidates):
            row[np.isin(candidates, soft[i])] = np.inf
        valid = int(np.isfinite(row).sum())
        take = min(n_neg, valid)
        chosen = candidates[np.argsort(row, kind="stable")[:take]] if take else np.empty(0, np.int64)
        if take < n_neg:
            chosen = np.concatenate([chosen, _random_negatives(n_db, soft[i], chosen, n_neg - take, rng)])
        out[i, 1:] = chosen
    return out


def _random_negatives(n_db: int, soft: np.ndarray, exclude: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    allowed = np.setdiff1d(np.arange(n_db), np.concatenate([soft, exclude]), assume_unique=False)
    if len(allowed) == 0:
        raise ValueError("no database image is a negative for some query: the split is too small")
    return rng.choice(allowed, size=k, replace=len(allowed) < k)


class TripletImages(Dataset):
    """One query's triplet images stacked: (2 + n_neg) × 3 × H × W."""

    def __init__(self, reader: ShardReader, triplet_ids: np.ndarray, query_transform, db_transform):
        self.reader, self.ids = reader, triplet_ids
        self.query_transform, self.db_transform = query_transform, db_transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.ids[i]
        images = [self.query_transform(self.reader.load(int(row[0])))]
        images += [self.db_transform(self.reader.load(int(j))) for j in row[1:]]
        return stack_images(images)


def triplet_loss(desc: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean triplet margin loss over (query, best positive, each negative); desc is B×(2+N)×D."""
    q, p, n = desc[:, :1], desc[:, 1:2], desc[:, 2:]
    return F.triplet_margin_loss(q.expand_as(n), p.expand_as(n), n, margin=margin, p=2)


class TrainingDiverged(ValueError):
    """A non-finite loss: training stops before the step, so no checkpoint holds NaN weights."""


def refuse_non_finite(loss: torch.Tensor, where: str) -> None:
    """Raise ``TrainingDiverged`` (before any step is taken) when ``loss`` is NaN or infinite."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"{where}: the loss is {loss.item()}; no step taken and no checkpoint written "
            "(a damaged input, or train.lr too high)"
        )
