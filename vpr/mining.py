"""UTM mining: which database images are positives of each query.

Positives come from metric distance: *hard* positives lie within ``train_positive_m`` (used to
pick the training positive), *soft* positives within ``test_positive_m`` (never used as negatives,
and the evaluation threshold). Optionally hard positives must also face the query's way
(``train_positive_heading_deg``), as in Mapillary SLS: which positive is "best" is otherwise left to
the descriptors, and an untrained network often picks the opposite street side. A KD-tree answers
the radius queries, so a million database points mine in seconds instead of an all-pairs matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from scipy.spatial import cKDTree

from vpr.atomic import write_parquet_atomic
from vpr.config import MiningConfig


def radius_neighbours(
    database_xy: np.ndarray, query_xy: np.ndarray, radius_m: float, tree: cKDTree | None = None
) -> list[np.ndarray]:
    """For each query, the sorted indices of database points within ``radius_m`` (inclusive)."""
    database_xy = np.asarray(database_xy, dtype=np.float64).reshape(-1, 2)
    query_xy = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
    if len(database_xy) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(query_xy))]
    tree = tree if tree is not None else cKDTree(database_xy)
    hits = tree.query_ball_point(query_xy, r=radius_m, return_sorted=True, workers=-1)
    return [np.asarray(h, dtype=np.int64) for h in hits]


def utm_positives(
    database_xy: np.ndarray, query_xy: np.ndarray, train_positive_m: float, test_positive_m: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(hard, soft) positive index lists per query, from one shared KD-tree."""
    tree = cKDTree(np.asarray(database_xy, dtype=np.float64).reshape(-1, 2)) if len(database_xy) else None
    hard = radius_neighbours(database_xy, query_xy, train_positive_m, tree)
    soft = radius_neighbours(database_xy, query_xy, test_positive_m, tree)
    return hard, soft


def heading_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute angle between compass headings in degrees (0..180); NaN where either is unknown."""
    return np.abs((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) + 180.0) % 360.0 - 180.0)


def facing_filter(
    hard: list[np.ndarray], db_heading: np.ndarray, q_heading: np.ndarray, max_deg: float
) -> list[np.ndarray]:
    """Keep the hard positives within ``max_deg`` of their query's heading; unknown headings are kept."""
    out = []
    for i, h in enumerate(hard):
        diff = heading_difference(db_heading[h], q_heading[i])
        out.append(h[~(diff > max_deg)])  # NaN (unknown) compares False: kept
    return out


def mine_split(catalog: pl.DataFrame, split: str, cfg: MiningConfig) -> pl.DataFrame:
    """One row per query of ``split``: ``path``, ``hard_positives``, ``soft_positives`` (database paths).

    On the train split, queries without a hard positive cannot form a triplet and are dropped; the
    same boolean mask filters every per-query column, so lists never shift against their query.
    """
    rows = catalog.filter(pl.col("split") == split)
    database = rows.filter(pl.col("role") == "database").sort("path")
    queries = rows.filter(pl.col("role") == "queries").sort("path")
    if database.height == 0 and queries.height > 0:
        raise ValueError(f"split {split!r} has queries but no database images")
    db_xy = database.select("utm_east", "utm_north").to_numpy()
    q_xy = queries.select("utm_east", "utm_north").to_numpy()
    hard, soft = utm_positives(db_xy, q_xy, cfg.train_positive_m, cfg.test_positive_m)
    if cfg.train_positive_heading_deg is not None and "heading" in rows.columns:
        hard = facing_filter(
            hard,
            database["heading"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
            queries["heading"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
            cfg.train_positive_heading_deg,
        )
    db_paths = database["path"].to_numpy()
    table = pl.DataFrame(
        {
            "path": queries["path"],
            "utm_east": queries["utm_east"],
            "utm_north": queries["utm_north"],
            "hard_positives": [db_paths[h].tolist() for h in hard],
            "soft_positives": [db_paths[s].tolist() for s in soft],
        },
        schema={
            "path": pl.String,
            "utm_east": pl.Float64,
            "utm_north": pl.Float64,
            "hard_positives": pl.List(pl.String),
            "soft_positives": pl.List(pl.String),
        },
    )
    if split == "train":
        keep = np.array([len(h) > 0 for h in hard], dtype=bool)
        table = table.filter(pl.Series(keep))
    return table


def write_mining(table: pl.DataFrame, target: str | Path) -> Path:
    """Write a mining table atomically (temp file in the same folder, then rename)."""
    return write_parquet_atomic(table, target)


def mine_all(
    catalog_path: str | Path, out_dir: str | Path, cfg: MiningConfig, splits: tuple[str, ...] = ("train", "val", "test")
) -> dict[str, Path]:
    """Mine every split of a catalog into ``out_dir/{split}.parquet`` (the DVC/Prefect step)."""
    catalog = pl.read_parquet(catalog_path)
    return {s: write_mining(mine_split(catalog, s, cfg), Path(out_dir) / f"{s}.parquet") for s in splits}
