"""UTM mining against a brute-force reference on random points."""

import numpy as np
import polars as pl
import pytest

from vpr.foundations.config import MiningConfig
from vpr.steps.mining import mine_all, mine_batches, mine_split, radius_neighbours, utm_positives, write_mining_batches


def brute_force(db: np.ndarray, q: np.ndarray, radius: float) -> list[list[int]]:
    d = np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1))
    return [sorted(np.flatnonzero(row <= radius).tolist()) for row in d]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radius_neighbours_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    db = rng.uniform(0, 300, size=(2000, 2)) + [584000, 4477000]
    q = rng.uniform(0, 300, size=(300, 2)) + [584000, 4477000]
    for radius in (10.0, 25.0):
        got = [h.tolist() for h in radius_neighbours(db, q, radius)]
        assert got == brute_force(db, q, radius)


def test_hard_positives_are_subset_of_soft():
    rng = np.random.default_rng(3)
    db, q = rng.uniform(0, 100, (500, 2)), rng.uniform(0, 100, (50, 2))
    hard, soft = utm_positives(db, q, 10, 25)
    for h, s in zip(hard, soft):
        assert set(h) <= set(s)


def _catalog(db: np.ndarray, q: np.ndarray, split: str) -> pl.DataFrame:
    rows = [(f"images/{split}/database/db{i:05d}.jpg", "database", *xy) for i, xy in enumerate(db)]
    rows += [(f"images/{split}/queries/q{i:05d}.jpg", "queries", *xy) for i, xy in enumerate(q)]
    return pl.DataFrame(rows, schema=["path", "role", "utm_east", "utm_north"], orient="row").with_columns(
        split=pl.lit(split)
    )


@pytest.mark.parametrize("split", ["train", "test"])
def test_mine_split_matches_brute_force_and_drops_only_on_train(split):
    rng = np.random.default_rng(7)
    db = rng.uniform(0, 400, (800, 2))
    q = rng.uniform(0, 400, (200, 2))
    cfg = MiningConfig(train_positive_m=10, test_positive_m=25)
    table = mine_split(_catalog(db, q, split), split, cfg)
    hard_ref, soft_ref = brute_force(db, q, 10), brute_force(db, q, 25)
    db_paths = [f"images/{split}/database/db{i:05d}.jpg" for i in range(len(db))]
    expected = {
        f"images/{split}/queries/q{i:05d}.jpg": ([db_paths[j] for j in h], [db_paths[j] for j in s])
        for i, (h, s) in enumerate(zip(hard_ref, soft_ref))
        if split != "train" or h
    }
    if split == "train":
        assert table.height < len(q), "the random layout must leave some queries without a hard positive"
    else:
        assert table.height == len(q)
    assert table["path"].to_list() == sorted(expected)
    for row in table.iter_rows(named=True):
        hard, soft = expected[row["path"]]
        assert row["hard_positives"] == hard
        assert row["soft_positives"] == soft
        if split == "train":
            assert row["hard_positives"], "every kept train query has a hard positive"


def test_queries_without_database_is_an_error():
    cat = _catalog(np.empty((0, 2)), np.ones((3, 2)), "val")
    with pytest.raises(ValueError, match="no database"):
        mine_split(cat, "val", MiningConfig())


def test_heading_filter_keeps_hard_positives_facing_the_query_way():
    # database: at the query's spot facing 0°, 180° and unknown; one 20 m away (soft only)
    db = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [20.0, 0.0], [500.0, 0.0]])
    q = np.array([[0.5, 0.0], [500.0, 1.0]])
    cat = _catalog(db, q, "train").with_columns(
        heading=pl.Series([0.0, 180.0, None, 350.0, 90.0, 350.0, 270.0], dtype=pl.Float64)
    )
    plain = mine_split(cat, "train", MiningConfig(train_positive_heading_deg=None))
    facing = mine_split(cat, "train", MiningConfig(train_positive_heading_deg=90))
    assert plain["hard_positives"][0].to_list() == [f"images/train/database/db{i:05d}.jpg" for i in (0, 1, 2)]
    # 350° vs 0° is 10° apart (wrap-around); 180° is dropped; unknown heading is kept
    assert facing["hard_positives"][0].to_list() == [f"images/train/database/db{i:05d}.jpg" for i in (0, 2)]
    assert facing["soft_positives"][0].to_list() == plain["soft_positives"][0].to_list()  # never negatives
    # the second query's only hard positive faces 90° vs 270°: no triplet, dropped with its whole row
    assert plain.height == 2 and facing.height == 1
    assert facing["path"].to_list() == ["images/train/queries/q00000.jpg"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_batched_mining_file_equals_the_whole_table_for_any_batch_size(tmp_path, split):
    rng = np.random.default_rng(11)
    db, q = rng.uniform(0, 300, (600, 2)), rng.uniform(0, 300, (150, 2))
    catalog = _catalog(db, q, split).with_columns(heading=pl.Series(rng.uniform(0, 360, 750)))
    cfg = MiningConfig(train_positive_m=10, test_positive_m=25, train_positive_heading_deg=90)
    whole = mine_split(catalog, split, cfg)
    for chunk in (1, 7, 150, 10_000):
        target = write_mining_batches(mine_batches(catalog, split, cfg, chunk=chunk), tmp_path / f"{chunk}.parquet")
        got = pl.read_parquet(target)
        assert got.equals(whole), f"batch size {chunk} changed the table"
        assert got.schema == whole.schema


def test_mine_all_writes_every_split_even_an_empty_one(tmp_path):
    rng = np.random.default_rng(12)
    catalog = _catalog(rng.uniform(0, 100, (50, 2)), rng.uniform(0, 100, (10, 2)), "test")
    catalog.write_parquet(tmp_path / "catalog.parquet")
    paths = mine_all(tmp_path / "catalog.parquet", tmp_path / "mining", MiningConfig())
    assert pl.read_parquet(paths["test"]).equals(mine_split(catalog, "test", MiningConfig()))
    empty = pl.read_parquet(paths["val"])  # no val rows in the catalog: an empty, readable table
    assert empty.height == 0 and empty.columns == ["path", "utm_east", "utm_north", "hard_positives", "soft_positives"]
    assert not list((tmp_path / "mining").glob(".*.tmp")), "no temporaries left behind"
