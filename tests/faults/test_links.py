"""Symbolic links never bring bytes from outside a root (issue 17, case 2), and every entry under
``images/`` is cataloged or rejected with a reason (case 9): the rule is applied by ingest, by the
shard step that reads the catalog's files, and by re-indexing (where links are never moved)."""

from __future__ import annotations

import os
import shutil

import polars as pl
import pytest

from vpr.foundations.imageio import REASON_LINK, REASON_OUTSIDE_ROOT
from vpr.shared.shardio import ShardError
from vpr.steps.catalog import REASON_STRAY, ingest
from vpr.steps.shards import write_shards


def _shifted(name: str, metres: float) -> str:
    """Another datasets_vg name ``metres`` east of ``name`` (so it is not a duplicate path)."""
    east, north = (float(v) for v in name.split("@")[1:3])
    return f"@{east + metres:.2f}@{north:.2f}@@@@@@@@@@@@@.jpg"


def test_ingest_refuses_links_that_lead_outside_the_root_and_follows_those_inside(released, tmp_path):
    _, cfg, layout = released
    db = layout.data / "images/test/database"
    first = sorted(db.iterdir())[0]
    outside = tmp_path / "secret.jpg"
    shutil.copy(first, outside)  # a perfectly good image, but not the dataset's
    os.symlink(outside, db / _shifted(first.name, 0.5))
    os.symlink(first, db / _shifted(first.name, 0.7))  # inside the root: followed
    linked_dir = layout.data / "images/test/queries_night"
    os.symlink(tmp_path, linked_dir)  # a stray (and linked) folder beside the role folders
    (layout.data / "images/notes.txt").write_text("not an image folder")

    result = ingest(layout.data, tmp_path / "catalog", cfg.ingest)
    reasons = dict(result.rejected_table.select("path", "reason").iter_rows())
    assert reasons[f"images/test/database/{_shifted(first.name, 0.5)}"] == REASON_OUTSIDE_ROOT
    assert f"images/test/database/{_shifted(first.name, 0.7)}" in result.catalog["path"].to_list()
    assert reasons["images/test/queries_night"].startswith(REASON_STRAY)
    assert reasons["images/notes.txt"].startswith(REASON_STRAY)


def test_a_role_folder_linked_outside_the_root_contributes_nothing(released, tmp_path):
    _, cfg, layout = released
    queries = layout.data / "images/val/queries"
    moved = tmp_path / "elsewhere"
    shutil.move(queries, moved)
    os.symlink(moved, queries)
    result = ingest(layout.data, tmp_path / "catalog", cfg.ingest)
    inside = result.catalog.filter(pl.col("path").str.starts_with("images/val/queries/"))
    assert inside.height == 0
    rejected = result.rejected_table.filter(pl.col("path").str.starts_with("images/val/queries/"))
    assert rejected.height == len(list(moved.iterdir())) and set(rejected["reason"]) == {REASON_OUTSIDE_ROOT}


def test_the_shard_step_refuses_a_cataloged_file_swapped_for_an_outside_link(released, tmp_path):
    _, cfg, layout = released
    victim = sorted((layout.data / "images/test/database").iterdir())[0]
    outside = tmp_path / "outside.jpg"
    shutil.copy(victim, outside)
    victim.unlink()
    os.symlink(outside, victim)  # same bytes, same sha256: only the link rule can catch it
    before = sorted(p.name for p in layout.split_shards("test").iterdir())
    with pytest.raises(ShardError, match=REASON_OUTSIDE_ROOT):
        write_shards(layout.catalog("test"), layout.data, layout.split_shards("test"), cfg.shards, workers=1)
    assert sorted(p.name for p in layout.split_shards("test").iterdir()) == before


def test_the_shard_step_refuses_a_file_changed_since_ingest(released):
    _, cfg, layout = released
    a, b = sorted((layout.data / "images/test/database").iterdir())[:2]
    shutil.copy(b, a)
    with pytest.raises(ShardError, match="changed since it was cataloged"):
        write_shards(layout.catalog("test"), layout.data, layout.split_shards("test"), cfg.shards, workers=1)


def test_reindex_quarantines_links_and_linked_folders_and_never_moves_them(released, tmp_path):
    from vpr.steps.reindex import run_reindex

    _, cfg, layout = released
    queries = sorted((layout.data / "images/test/queries").iterdir())
    layout.inbox.mkdir(exist_ok=True)
    outside = tmp_path / "outside.jpg"
    shutil.copy(queries[1], outside)
    os.symlink(outside, layout.inbox / queries[1].name)
    (tmp_path / "folder").mkdir()
    shutil.copy(queries[2], tmp_path / "folder" / queries[2].name)
    os.symlink(tmp_path / "folder", layout.inbox / "linked-folder")
    shutil.copy(queries[0], layout.inbox / queries[0].name)

    result = run_reindex(cfg, layout)
    assert [a["inbox"] for a in result.added] == [queries[0].name]
    reasons = {r["inbox"]: r["reason"] for r in result.rejected}
    assert reasons[queries[1].name].startswith(REASON_LINK) and reasons["linked-folder"].startswith(REASON_LINK)
    data_tree = list((layout.data / "images").rglob("*"))
    assert not any(p.is_symlink() for p in data_tree)
    assert outside.read_bytes() == queries[1].read_bytes() and (tmp_path / "folder" / queries[2].name).exists()
