"""UTM mining: which database images are positives of each query.

Positives come from metric distance: *hard* positives lie within ``train_positive_m`` (used to
pick the training positive), *soft* positives within ``test_positive_m`` (never used as negatives,
and the evaluation threshold). Optionally hard positives must also face the query's way
(``train_positive_heading_deg``), as in Mapillary SLS: which positive is "best" is otherwise left to
the descriptors, and an untrained network often picks the opposite street side. A KD-tree answers
the radius queries, so a million database points mine in seconds instead of an all-pairs matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

from vpr.foundations.atomic import atomic_path
from vpr.foundations.config import MiningConfig
from vpr.foundations.parts import read_table


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
    database_xy: np.ndarray,
    query_xy: np.ndarray,
    train_positive_m: float,
    test_positive_m: float,
    tree: cKDTree | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(hard, soft) positive index lists per query, from one shared KD-tree (built here unless given)."""
    if tree is None and len(database_xy):
        tree = cKDTree(np.asarray(database_xy, dtype=np.float64).reshape(-1, 2))
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


QUERY_CHUNK = 65_536
"""Queries mined per batch: peak memory is one batch's positive lists, whatever the split's size."""

_SCHEMA = pa.schema(
    [
        ("path", pa.large_string()),
        ("utm_east", pa.float64()),
        ("utm_north", pa.float64()),
        ("hard_positives", pa.list_(pa.large_string())),
        ("soft_positives", pa.list_(pa.large_string())),
    ]
)


def _path_lists(db_paths: pa.Array, hits: list[np.ndarray]) -> pa.ListArray:
    """Database paths per query as one Arrow list column, built from flat indices and offsets.

    Gathering into Arrow (not Python lists of str) keeps a batch's memory to its string bytes.
    """
    lengths = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    offsets = np.zeros(len(hits) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(hits) if hits else np.empty(0, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), db_paths.take(pa.array(flat, type=pa.int64())))


def mine_batches(catalog: pl.DataFrame, split: str, cfg: MiningConfig, chunk: int = QUERY_CHUNK) -> Iterator[pa.Table]:
    """The mining table of ``split`` in query batches of ``chunk`` rows, in query path order.

    Columns: ``path``, ``utm_east``, ``utm_north``, ``hard_positives``, ``soft_positives`` (database
    paths). On the train split, queries without a hard positive cannot form a triplet and are dropped;
    the same boolean mask filters every per-query column, so lists never shift against their query.
    One KD-tree over the database serves every batch; the output does not depend on ``chunk``.
    """
    rows = catalog.filter(pl.col("split") == split)
    database = rows.filter(pl.col("role") == "database").sort("path")
    queries = rows.filter(pl.col("role") == "queries").sort("path")
    if database.height == 0 and queries.height > 0:
        raise ValueError(f"split {split!r} has queries but no database images")
    db_xy = database.select("utm_east", "utm_north").to_numpy().astype(np.float64)
    tree = cKDTree(db_xy) if len(db_xy) else None
    db_paths = database["path"].to_arrow().cast(pa.large_string())
    facing = cfg.train_positive_heading_deg is not None and "heading" in rows.columns
    if facing:
        db_heading = database["heading"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    for start in range(0, queries.height, chunk):
        batch = queries.slice(start, chunk)
        q_xy = batch.select("utm_east", "utm_north").to_numpy().astype(np.float64)
        hard, soft = utm_positives(db_xy, q_xy, cfg.train_positive_m, cfg.test_positive_m, tree)
        if facing:
            q_heading = batch["heading"].cast(pl.Float64).fill_null(np.nan).to_numpy()
            hard = facing_filter(hard, db_heading, q_heading, cfg.train_positive_heading_deg)
        table = pa.Table.from_arrays(
            [
                batch["path"].to_arrow().cast(pa.large_string()),
                batch["utm_east"].cast(pl.Float64).to_arrow(),
                batch["utm_north"].cast(pl.Float64).to_arrow(),
                _path_lists(db_paths, hard),
                _path_lists(db_paths, soft),
            ],
            schema=_SCHEMA,
        )
        if split == "train":
            table = table.filter(pa.array([len(h) > 0 for h in hard], type=pa.bool_()))
        yield table


def mine_split(catalog: pl.DataFrame, split: str, cfg: MiningConfig) -> pl.DataFrame:
    """The whole mining table of ``split`` in memory (see ``mine_batches``), for callers that need all of it."""
    batches = list(mine_batches(catalog, split, cfg))
    return pl.from_arrow(pa.concat_tables(batches) if batches else _SCHEMA.empty_table())


def write_mining_batches(batches: Iterable[pa.Table], target: str | Path) -> Path:
    """Stream mining batches into one Parquet file, one row group per batch, published atomically."""
    with atomic_path(target) as tmp, pq.ParquetWriter(tmp, _SCHEMA) as writer:
        for batch in batches:
            writer.write_table(batch)
    return Path(target)


def mine_all(
    catalog_path: str | Path, out_dir: str | Path, cfg: MiningConfig, splits: tuple[str, ...] = ("train", "val", "test")
) -> dict[str, Path]:
    """Mine every split of a catalog into ``out_dir/{split}.parquet`` (the DVC/Prefect step).

    Each split is written batch by batch, so memory stays at one query batch plus the database's
    coordinates and paths instead of growing with every query's positive lists.
    """
    catalog = read_table(catalog_path, key="path", keep="last")  # the base and the batches re-indexing appended
    return {s: write_mining_batches(mine_batches(catalog, s, cfg), Path(out_dir) / f"{s}.parquet") for s in splits}
