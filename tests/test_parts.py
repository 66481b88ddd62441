"""Appends to the catalog and the shard index write only the batch (one part file); read back, the tables are
what the full rewrite of each append gave; compaction and full rebuilds fold or supersede the parts, and
a crash between a new base and the parts' removal reads every row exactly once."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from vpr.foundations.layout import SPLITS
from vpr.foundations.parts import MARKER, MAX_PARTS, compact, live_parts, parts_dir, parts_from, write_base
from vpr.shared.shardio import INDEX_FILE, INDEX_SCHEMA, read_index
from vpr.steps.catalog import CATALOG_SCHEMA, ROW_SCHEMA, catalog_file, mark_duplicates, read_catalog
from vpr.steps.catalogappend import append_to_catalog
from vpr.steps.shards import append_to_index


def _row(split: str, name: str, sha: str, role: str = "database") -> dict:
    row = {k: None for k in ROW_SCHEMA}
    row.update(path=f"images/{split}/{role}/{name}.jpg", split=split, role=role, sha256=sha, width=4, height=3)
    row.update(utm_east=float(len(name)), utm_north=2.0, utm_zone=33, format="JPEG")
    return row


def _ingested(rows: list[dict]) -> pl.DataFrame:
    """What ``vpr ingest`` makes of these rows: sorted by path, duplicates marked over every split."""
    table = pl.DataFrame(rows, schema=ROW_SCHEMA).sort("path")
    return mark_duplicates(table).select(list(CATALOG_SCHEMA))


def _ingest(folder: Path, rows: list[dict]) -> None:
    catalog = _ingested(rows)
    for split in SPLITS:  # as ``ingest`` writes each split
        write_base(catalog.filter(pl.col("split") == split), catalog_file(folder, split), keep_dir=True)


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


BASE = [
    _row("train", "t1", "aa"),
    _row("train", "t2", "bb"),
    _row("val", "v1", "cc"),
    _row("test", "a1", "dd"),
    _row("test", "a2", "ee", "queries"),
]
BATCHES = [
    [_row("test", "b1", "aa"), _row("test", "b2", "ff")],  # a copy of a training image: leakage
    [_row("test", "c1", "ff"), _row("test", "c2", "gg"), _row("test", "c3", "gg")],  # copies of the last batch's
    [_row("test", "d1", "cc", "queries"), _row("test", "d2", "dd")],  # of val, of a test image
]


def test_appends_read_back_as_ingest_writes_and_leave_the_base_alone(tmp_path):
    _ingest(tmp_path, BASE)
    base = catalog_file(tmp_path, "test")
    before = {s: _stat(catalog_file(tmp_path, s)) for s in SPLITS}
    seen = list(BASE)
    for batch in BATCHES:
        part = append_to_catalog(base, batch)
        seen += batch
        assert part.parent == parts_dir(base)
        assert read_catalog(tmp_path).equals(_ingested(seen))
        assert {s: _stat(catalog_file(tmp_path, s)) for s in SPLITS} == before  # no base read for writing
    assert [p.name for p in live_parts(base)] == ["000000.parquet", "000001.parquet", "000002.parquet"]
    assert read_catalog(tmp_path, ("test",)).equals(_ingested(seen).filter(pl.col("split") == "test"))
    dup = dict(read_catalog(tmp_path).select("path", "duplicate_of").iter_rows())
    assert dup["images/test/database/b1.jpg"] == "images/train/database/t1.jpg"
    assert dup["images/test/database/c1.jpg"] == "images/test/database/b2.jpg"
    assert dup["images/test/database/c3.jpg"] == "images/test/database/c2.jpg"


def test_a_retried_append_adds_each_image_once(tmp_path):
    _ingest(tmp_path, BASE)
    base = catalog_file(tmp_path, "test")
    append_to_catalog(base, BATCHES[0])
    assert append_to_catalog(base, BATCHES[0]) == base  # nothing new: no part
    append_to_catalog(base, BATCHES[0] + BATCHES[1])
    assert len(live_parts(base)) == 2
    assert read_catalog(tmp_path).equals(_ingested(BASE + BATCHES[0] + BATCHES[1]))


def test_an_appended_image_can_become_the_original_of_a_cataloged_copy(tmp_path):
    """As ``vpr ingest`` would mark it (a copy of a query re-indexed into the database sorts before it):
    the cataloged row is written again in the part, the base is not rewritten."""
    _ingest(tmp_path, BASE)
    base = catalog_file(tmp_path, "test")
    before = _stat(base)
    earlier = _row("test", "a0", "dd")  # sorts before images/test/database/a1.jpg, same bytes
    query_copy = _row("test", "q0", "ee")  # a database copy of the query a2 (database < queries)
    append_to_catalog(base, [earlier, query_copy])
    assert read_catalog(tmp_path).equals(_ingested([*BASE, earlier, query_copy]))
    dup = dict(read_catalog(tmp_path).select("path", "duplicate_of").iter_rows())
    assert dup["images/test/database/a1.jpg"] == earlier["path"] and dup[earlier["path"]] is None
    assert dup["images/test/queries/a2.jpg"] == query_copy["path"]
    assert _stat(base) == before and pl.read_parquet(live_parts(base)[0]).height == 4
    compact(base, key="path", keep="last")  # folded: one row per path
    assert read_catalog(tmp_path).equals(_ingested([*BASE, earlier, query_copy]))


def test_parts_are_folded_into_the_base_past_the_bound(tmp_path):
    _ingest(tmp_path, BASE)
    base = catalog_file(tmp_path, "test")
    rows = [_row("test", f"n{i:02d}", f"h{i % 5}") for i in range(MAX_PARTS + 1)]
    for i, row in enumerate(rows[:MAX_PARTS]):
        append_to_catalog(base, [row])
        assert len(live_parts(base)) == i + 1
    before = _stat(base)
    append_to_catalog(base, [rows[-1]])
    assert _stat(base) != before and live_parts(base) == []
    assert parts_from(base) == MAX_PARTS + 1
    assert sorted(p.name for p in parts_dir(base).iterdir()) == [MARKER]
    assert read_catalog(tmp_path).equals(_ingested(BASE + rows))
    extra = _row("test", "z", "h1")
    assert append_to_catalog(base, [extra]).name == f"{MAX_PARTS + 1:06d}.parquet"  # numbers never reused
    assert read_catalog(tmp_path).equals(_ingested(BASE + rows + [extra]))


def test_a_crash_between_the_new_base_and_the_parts_removal_reads_each_row_once(tmp_path):
    _ingest(tmp_path, BASE)
    base = catalog_file(tmp_path, "test")
    for batch in BATCHES:
        append_to_catalog(base, batch)
    expected = _ingested(BASE + [r for b in BATCHES for r in b])
    kept = tmp_path / "kept"
    shutil.copytree(parts_dir(base), kept)
    compact(base, key="path", keep="last")
    shutil.copytree(kept, parts_dir(base), dirs_exist_ok=True)  # the crash: the folded parts still there
    assert len(list(parts_dir(base).glob("*.parquet"))) == 3 and live_parts(base) == []
    assert read_catalog(tmp_path).equals(expected)
    more = [_row("test", "e1", "zz")]
    append_to_catalog(base, more)  # numbered past the folded ones
    assert read_catalog(tmp_path).equals(_ingested(BASE + [r for b in BATCHES for r in b] + more))


def test_a_rebuild_supersedes_the_parts_even_when_it_crashes_before_removing_them(tmp_path):
    _ingest(tmp_path, BASE)
    base = catalog_file(tmp_path, "test")
    for batch in BATCHES:
        append_to_catalog(base, batch)
    kept = tmp_path / "kept"
    shutil.copytree(parts_dir(base), kept)
    rebuilt = BASE + BATCHES[0]  # `vpr ingest` of a tree that holds only the first batch
    _ingest(tmp_path, rebuilt)
    assert sorted(p.name for p in parts_dir(base).iterdir()) == [MARKER]
    shutil.copytree(kept, parts_dir(base), dirs_exist_ok=True)  # the crash: the stale parts still there
    assert read_catalog(tmp_path).equals(_ingested(rebuilt))
    _ingest(tmp_path, rebuilt)  # the next rebuild removes them, and writes the same bytes
    assert sorted(p.name for p in parts_dir(base).iterdir()) == [MARKER]


# --------------------------------------------------------------------------- the shard index


def _index_row(i: int, shard: str, offset: int) -> dict:
    return {
        **{k: None for k in INDEX_SCHEMA},
        **{"id": i, "key": f"test_database_{i:07d}", "path": f"images/test/database/{i}.jpg", "split": "test"},
        **{"role": "database", "shard": shard, "offset": offset, "size": 10, "crc32": i},
    }


def _old_append(index: pl.DataFrame, rows: list[dict]) -> pl.DataFrame:
    """The full rewrite ``append_to_index`` did before parts: a row of an indexed id replaces it."""
    new = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    kept = index.filter(~pl.col("id").is_in(new["id"].implode()))
    return pl.concat([kept.cast(INDEX_SCHEMA), new]).sort("id")  # type: ignore[arg-type]


@pytest.mark.parametrize("batches", [3, MAX_PARTS + 2])
def test_index_appends_read_back_as_the_full_rewrite(tmp_path, batches):
    first = pl.DataFrame([_index_row(i, "test-database-000000.tar", i) for i in range(0, 40, 2)], schema=INDEX_SCHEMA)
    write_base(first, tmp_path / INDEX_FILE)
    expected = first
    for b in range(batches):
        shard = f"test-database-{b + 1:06d}.tar"
        carried = [_index_row(i, shard, 100 + i) for i in (38 - 2 * b, 36 - 2 * b)]  # the tail moves on
        rows = carried + [_index_row(1001 + 10 * b + k, shard, 500 + k) for k in range(3)]
        before = _stat(tmp_path / INDEX_FILE)
        append_to_index(tmp_path, rows)
        expected = _old_append(expected, rows)
        assert read_index(tmp_path).equals(expected)
        if b < MAX_PARTS:
            assert _stat(tmp_path / INDEX_FILE) == before
    assert len(live_parts(tmp_path / INDEX_FILE)) == (batches if batches <= MAX_PARTS else batches - MAX_PARTS - 1)
