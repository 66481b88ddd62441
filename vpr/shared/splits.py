"""A split as training and evaluation see it: mined queries and database images as shard ids.

The mining table names images by path; the shard index gives each path its id. ``load_split`` joins
them once, so every consumer works with ids and with positives as indices into ``db_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class SplitData:
    """A split's mined queries as shard ids, positives as indices into ``db_ids``."""

    db_ids: np.ndarray
    q_ids: np.ndarray
    hard: list[np.ndarray]
    soft: list[np.ndarray]


def load_split(index: pl.DataFrame, mining: pl.DataFrame, split: str) -> SplitData:
    """Join a mining table with the shard index: paths become ids."""
    rows = index.filter(pl.col("split") == split)
    db = rows.filter(pl.col("role") == "database").sort("path")
    db_pos = {p: i for i, p in enumerate(db["path"].to_list())}
    q_id = dict(rows.filter(pl.col("role") == "queries").select("path", "id").iter_rows())
    missing = [p for p in mining["path"].to_list() if p not in q_id]
    if missing:
        raise ValueError(f"{len(missing)} mined {split} queries are not in the shard index, e.g. {missing[0]}")

    def positions(paths: list[str]) -> np.ndarray:
        return np.array([db_pos[p] for p in paths], dtype=np.int64)

    return SplitData(
        db_ids=db["id"].to_numpy().astype(np.int64),
        q_ids=np.array([q_id[p] for p in mining["path"].to_list()], dtype=np.int64),
        hard=[positions(h) for h in mining["hard_positives"].to_list()],
        soft=[positions(s) for s in mining["soft_positives"].to_list()],
    )
