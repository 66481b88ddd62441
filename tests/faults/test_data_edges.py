"""Case 7: duplicate images are reported (ingest and re-index) and kept; a database image far from
every query is kept through catalog, shards, training data and the release, and can be found."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageOps

from tests.micro import shard_and_mine
from vpr.foundations.geo import format_name, parse_name
from vpr.shared.shardio import read_index
from vpr.shared.splits import load_split
from vpr.steps.catalog import ingest, read_catalog
from vpr.steps.index import build_release, load_release
from vpr.steps.locate import locate

pytestmark = pytest.mark.timeout(180)


def _far_image(source, folder, east_offset: float):
    """New content (mirrored) at a position ``east_offset`` metres east of ``source``."""
    geo = parse_name(source.name)
    target = folder / format_name(
        geo.utm_east + east_offset, geo.utm_north, utm_zone=geo.utm_zone, utm_letter=geo.utm_letter, note="far"
    )
    with Image.open(source) as im:
        ImageOps.mirror(im.convert("RGB")).save(target, "JPEG", quality=95)
    return target


def test_duplicates_reported_and_a_far_database_image_kept(released, caplog):
    caplog.set_level(logging.INFO, logger="vpr")
    root, cfg, layout = released
    db = layout.data / "images/train/database"
    original = sorted(db.iterdir())[5]
    geo = parse_name(original.name)
    twin = db / format_name(
        geo.utm_east + 0.5, geo.utm_north, utm_zone=geo.utm_zone, utm_letter=geo.utm_letter, note="twin"
    )
    shutil.copy(original, twin)  # same bytes, another name
    far = _far_image(sorted((layout.data / "images/train/queries").iterdir())[0], db, 50_000.0)

    ingest(layout.data, layout.catalog_dir, cfg.ingest)
    summary = caplog.text
    rel = {p: f"images/train/database/{p.name}" for p in (original, twin, far)}
    first, second = sorted([rel[original], rel[twin]])
    assert "duplicates: 1 image(s)" in summary and f"{second} == {first}" in summary
    catalog = read_catalog(layout.catalog_dir)
    dup = dict(catalog.select("path", "duplicate_of").iter_rows())
    assert dup[second] == first and dup[first] is None and dup[rel[far]] is None

    shard_and_mine(cfg, layout, workers=1)
    index = read_index(layout.shards_dir)
    ids = dict(index.select("path", "id").iter_rows())
    assert {rel[original], rel[twin], rel[far]} <= set(ids)
    mined = pl.read_parquet(layout.mining("train"))
    assert not any(rel[far] in s for s in mined["soft_positives"].to_list())  # out of every query's reach...
    train = load_split(index, mined, "train")
    assert ids[rel[far]] in train.db_ids  # ...yet still a database image (a negative) for training

    build_release("avg", cfg, layout)
    release = load_release(layout.release_dir("avg"))
    assert {ids[rel[far]], ids[rel[twin]], ids[rel[original]]} <= set(release.ids["id"].to_list())
    answer = locate([far], layout.release_dir("avg"), 3, release=release)[0]
    assert answer["matches"][0]["id"] == ids[rel[far]] and answer["matches"][0]["distance"] < 1e-3


def test_reindex_reports_a_duplicate_and_keeps_a_far_image(released):
    from vpr.steps.reindex import run_reindex

    root, cfg, layout = released
    layout.inbox.mkdir()
    original = sorted((layout.data / "images/test/database").iterdir())[2]
    geo = parse_name(original.name)
    copy = layout.inbox / format_name(
        geo.utm_east + 1.0, geo.utm_north, utm_zone=geo.utm_zone, utm_letter=geo.utm_letter, note="again"
    )
    shutil.copy(original, copy)
    far = _far_image(sorted((layout.data / "images/test/queries").iterdir())[1], layout.inbox, -40_000.0)

    result = run_reindex(cfg, layout)
    by_name = {a["path"].rsplit("/", 1)[1]: a for a in result.added}
    assert set(by_name) == {copy.name, far.name}
    assert by_name[copy.name]["duplicate_of"] == f"images/test/database/{original.name}"
    assert by_name[far.name]["duplicate_of"] is None
    assert "same bytes as an image already cataloged" in result.note
    release_ids = set(load_release(layout.release_dir("avg")).ids["id"].to_list())
    assert {a["id"] for a in result.added} <= release_ids


def test_a_copy_of_a_val_image_is_leakage_and_changes_no_other_split(released, caplog):
    """Re-indexed bytes of a validation image: the summary's warnings name the leak, and the next ingest
    leaves the val catalog byte for byte as it was (its stages stay cached), marking the test copy."""
    from vpr.steps.reindex import run_reindex

    root, cfg, layout = released
    val_catalog = layout.catalog("val").read_bytes()
    original = sorted((layout.data / "images/val/database").iterdir())[0]
    geo = parse_name(original.name)
    layout.inbox.mkdir()
    shutil.copy(
        original,
        layout.inbox
        / format_name(geo.utm_east, geo.utm_north, utm_zone=geo.utm_zone, utm_letter=geo.utm_letter, note="copy"),
    )
    result = run_reindex(cfg, layout)
    (added,) = result.added
    source = f"images/val/database/{original.name}"
    assert added["duplicate_of"] == source and added["warnings"] == [f"leakage: same bytes as {source}"]
    assert "1 leak(s)" in result.note

    caplog.set_level(logging.INFO, logger="vpr")
    ingest(layout.data, layout.catalog_dir, cfg.ingest)
    assert layout.catalog("val").read_bytes() == val_catalog
    dup = dict(read_catalog(layout.catalog_dir).select("path", "duplicate_of").iter_rows())
    assert dup[added["path"]] == source and dup[source] is None
    assert any(r.levelno == logging.WARNING and "leakage: 1 image(s)" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- high bit depth


def _deep_images(folder, like) -> dict[str, object]:
    """A 16-bit grey PNG, an int32 TIFF and a float TIFF, each under a datasets_vg ``.jpg`` name."""
    geo = parse_name(like.name)
    ramp = np.linspace(0.0, 1.0, 64 * 48).reshape(48, 64)
    arrays = {
        "png16": (np.rint(ramp * 65535).astype(np.uint16), "PNG"),
        "int32": (np.rint(ramp * 2**31 - 1).astype(np.int32), "TIFF"),
        "float": (ramp.astype(np.float32), "TIFF"),
    }
    paths = {}
    for i, (note, (array, fmt)) in enumerate(arrays.items()):
        name = format_name(
            geo.utm_east + 1.0 + i, geo.utm_north, utm_zone=geo.utm_zone, utm_letter=geo.utm_letter, note=note
        )
        Image.fromarray(array).save(folder / name, fmt)
        paths[note] = folder / name
    return paths


def test_high_bit_depth_images_are_scaled_or_rejected_never_blank(released, tmp_path):
    from vpr.foundations.imageio import REASON_PIXEL_FORMAT
    from vpr.shared.shardio import ShardReader
    from vpr.steps.shards import write_shards

    root, cfg, layout = released
    db = layout.data / "images/test/database"
    deep = _deep_images(db, sorted(db.iterdir())[0])

    result = ingest(layout.data, layout.catalog_dir, cfg.ingest)
    rejected = dict(result.rejected_table.select("path", "reason").iter_rows())
    for note in ("int32", "float"):  # no range in the file to scale by: refused, with the reason
        assert rejected[f"images/test/database/{deep[note].name}"] == REASON_PIXEL_FORMAT
    write_shards(layout.catalog("test"), layout.data, tmp_path / "shards" / "test", cfg.shards)
    reader = ShardReader(tmp_path / "shards", ("test",))
    row = reader.index.filter(pl.col("path") == f"images/test/database/{deep['png16'].name}")
    pixels = np.asarray(reader.load(int(row["id"][0])).convert("L"), dtype=np.float64)
    assert 0.3 * 255 < pixels.mean() < 0.7 * 255 and pixels.std() > 40  # the ramp, not a white sheet

    answers = locate([deep["float"], deep["int32"], deep["png16"]], layout.release_dir("avg"), top_k=3)
    assert [a["ok"] for a in answers] == [False, False, True]
    assert all(REASON_PIXEL_FORMAT in a["error"] for a in answers[:2])


def test_ids_of_a_reindex_survive_the_next_rebuild(released):
    """An id is assigned once: after a re-index, a full rebuild (ingest, shard, mine, index) gives every
    image the id it had, re-indexed ones included, so ``/v1/images/<id>`` of the summary keeps answering."""
    from vpr.steps.reindex import run_reindex

    root, cfg, layout = released
    layout.inbox.mkdir()
    for east in (-30_000.0, 30_000.0):
        _far_image(sorted((layout.data / "images/test/queries").iterdir())[2], layout.inbox, east)
    result = run_reindex(cfg, layout)
    added = {a["id"]: a["path"] for a in result.added}
    assert len(added) == 2
    before = dict(read_index(layout.shards_dir).select("path", "id").iter_rows())

    ingest(layout.data, layout.catalog_dir, cfg.ingest)
    shard_and_mine(cfg, layout, workers=1)
    build_release("avg", cfg, layout)

    assert dict(read_index(layout.shards_dir).select("path", "id").iter_rows()) == before
    served = dict(load_release(layout.release_dir("avg")).ids.select("id", "path").iter_rows())
    assert {i: served.get(i) for i in added} == added
