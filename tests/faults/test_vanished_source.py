"""A file of an interrupted re-index batch that is deleted before the next run never blocks
re-indexing (issue 17, case 3): an unpublished batch is rolled back for that file and the rest goes
on; a published one finishes from its shards. Later inbox files are then processed as usual."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

import vpr.steps.reindex as rx
from vpr.shared.shardio import read_index
from vpr.steps.catalog import read_catalog
from vpr.steps.index import load_release


def _crash_at(monkeypatch, step: str) -> None:
    def crash(at: str) -> None:
        if at == step:
            raise RuntimeError(f"killed at {at}")

    monkeypatch.setattr(rx, "reached", crash)


@pytest.mark.parametrize("step", ["shards-written", "release-switched"])
def test_a_vanished_file_of_the_pending_batch_does_not_block_reindexing(released, monkeypatch, step):
    _, cfg, layout = released
    q = sorted((layout.data / "images/test/queries").iterdir())
    layout.inbox.mkdir(exist_ok=True)
    for p in q[:3]:
        shutil.copy(p, layout.inbox / p.name)
    _crash_at(monkeypatch, step)
    with pytest.raises(RuntimeError):
        rx.run_reindex(cfg, layout)
    monkeypatch.undo()
    (layout.inbox / q[1].name).unlink()  # the user tidies the inbox after the crash

    resumed = rx.run_reindex(cfg, layout)
    assert resumed.resumed and not (rx.work_dir(layout) / rx.PENDING).exists()
    catalog = read_catalog(layout.catalog_dir)
    cataloged = set(catalog.filter(pl.col("path").str.starts_with("images/test/database/")).get_column("path"))
    release_ids = set(load_release(layout.release_dir("avg")).ids["id"].to_list())
    added = {a["inbox"]: a["id"] for a in resumed.added}
    assert all(f"images/test/database/{p.name}" in cataloged for p in (q[0], q[2]))
    assert f"images/test/database/{q[1].name}" not in cataloged  # no catalog row for a file that is gone
    if step == "shards-written":  # not yet published: rolled back for the lost file
        assert set(added) == {q[0].name, q[2].name}
        assert [r["reason"].split(":")[0] for r in resumed.rejected] == [rx.REASON_VANISHED]
    else:  # published: it is served from its shard copy until the next rebuild
        assert set(added) == {p.name for p in q[:3]}
    assert set(added.values()) <= release_ids

    shutil.copy(q[3], layout.inbox / q[3].name)  # and re-indexing carries on
    later = rx.run_reindex(cfg, layout)
    assert [a["inbox"] for a in later.added] == [q[3].name] and not later.resumed


def test_a_batch_whose_files_all_vanished_is_rolled_back(released, monkeypatch):
    _, cfg, layout = released
    q = sorted((layout.data / "images/test/queries").iterdir())
    layout.inbox.mkdir(exist_ok=True)
    shutil.copy(q[0], layout.inbox / q[0].name)
    before = load_release(layout.release_dir("avg")).version
    _crash_at(monkeypatch, "shards-written")
    with pytest.raises(RuntimeError):
        rx.run_reindex(cfg, layout)
    monkeypatch.undo()
    (layout.inbox / q[0].name).unlink()
    result = rx.run_reindex(cfg, layout)
    assert result.added == [] and "rolled back" in result.note
    assert not (rx.work_dir(layout) / rx.PENDING).exists()
    assert load_release(layout.release_dir("avg")).version == before
    unreferenced = {p.name for p in layout.split_shards("test").glob("*.tar")} - set(
        read_index(layout.split_shards("test"))["shard"]
    )
    assert unreferenced == set()
