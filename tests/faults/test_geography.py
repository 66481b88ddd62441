"""Positions later steps would get wrong are refused with a reason, by one validation that ingest and
re-index share (issue 17, case 7); a malformed optional name field keeps the image, leaves the field
empty and is counted as a warning (case 8)."""

from __future__ import annotations

import shutil

import polars as pl

from vpr.foundations.geo import parse_name
from vpr.steps.catalog import REASON_BAD_POSITION, REASON_OTHER_ZONE, WARNINGS_FILE, ingest
from vpr.steps.mining import mine_split


def _names(like: str) -> dict[str, str]:
    g = parse_name(like)
    e, n = g.utm_east, g.utm_north
    return {
        "other_zone": f"@{e + 0.3:.2f}@{n:.2f}@{g.utm_zone + 1}@T@@@@@@@@@@@.jpg",
        "huge": "@1e308@-1e308@.jpg",
        "lat": f"@{e + 0.4:.2f}@{n:.2f}@@@95.0@-80.0@@@@@@@@@.jpg",
        "sloppy": f"@{e + 0.5:.2f}@{n:.2f}@x@Z@4a@@@@nope@@@@2019@@.jpg",
    }


def test_ingest_rejects_impossible_positions_and_other_zones_and_keeps_sloppy_names(released, tmp_path):
    _, cfg, layout = released
    db = layout.data / "images/test/database"
    source = sorted(db.iterdir())[0]
    names = _names(source.name)
    for name in names.values():
        shutil.copy(source, db / name)
    out = tmp_path / "catalog"
    result = ingest(layout.data, out, cfg.ingest)
    reasons = dict(result.rejected_table.select("path", "reason").iter_rows())
    at = {k: f"images/test/database/{v}" for k, v in names.items()}
    assert reasons[at["other_zone"]].startswith(REASON_OTHER_ZONE)
    assert reasons[at["huge"]].startswith(REASON_BAD_POSITION)
    assert reasons[at["lat"]] == f"{REASON_BAD_POSITION}: latitude 95 outside ±90"

    kept = result.catalog.filter(pl.col("path") == at["sloppy"]).row(0, named=True)
    assert (kept["utm_zone"], kept["utm_letter"], kept["lat"], kept["heading"]) == (None, None, None, None)
    assert kept["timestamp"] == "2019"
    warned = pl.read_parquet(out / WARNINGS_FILE)
    assert warned.equals(result.warnings_table)
    assert sorted(warned.filter(pl.col("path") == at["sloppy"])["field"]) == [
        "heading",
        "lat",
        "utm_letter",
        "utm_zone",
    ]
    assert warned.height == 4

    mining = mine_split(result.catalog, "test", cfg.mining)  # every row is minable
    assert mining.height > 0


def test_reindex_gives_the_same_reasons_and_warnings(released):
    from vpr.steps.reindex import run_reindex

    _, cfg, layout = released
    source = sorted((layout.data / "images/test/queries").iterdir())[0]
    names = _names(source.name)
    layout.inbox.mkdir(exist_ok=True)
    for name in names.values():
        shutil.copy(source, layout.inbox / name)
    result = run_reindex(cfg, layout)
    reasons = {r["inbox"]: r["reason"] for r in result.rejected}
    assert reasons[names["other_zone"]].startswith(REASON_OTHER_ZONE)
    assert reasons[names["huge"]].startswith(REASON_BAD_POSITION)
    assert reasons[names["lat"]] == f"{REASON_BAD_POSITION}: latitude 95 outside ±90"
    (added,) = result.added
    assert added["inbox"] == names["sloppy"] and len(added["warnings"]) == 4
