"""Re-indexing logic (``vpr.steps.reindex``, no Prefect): validation, quarantine, planning, crash + resume."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import vpr.steps.inbox as vi
import vpr.steps.reindex as rx
from tests.flowkit import exif_photo, jpeg_bytes, truncated_jpeg
from vpr.foundations.geo import parse_name
from vpr.foundations.layout import Layout, image_id
from vpr.shared.shardio import ShardReader, read_index
from vpr.steps.catalog import ingest, read_catalog
from vpr.steps.index import build_release, load_release


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A prepared micro project with a trained ``avg`` head and its release (built once per module)."""
    from tests.micro import build_micro_project
    from vpr.steps.train import train_head

    root = tmp_path_factory.mktemp("reindex") / "project"
    cfg, layout = build_micro_project(root, {"train": {"epochs": 1, "queries_per_epoch": 4, "negatives": 2}})
    cfg = cfg.model_copy(update={"index": cfg.index.model_copy(update={"head": "avg"})})
    train_head("avg", cfg, layout)
    build_release("avg", cfg, layout)
    return root, cfg


@pytest.fixture
def project(released, tmp_path):
    root, cfg = released
    copy = tmp_path / "project"
    shutil.copytree(root, copy)
    return copy, cfg, Layout.from_config(cfg, copy)


def _queries(layout: Layout) -> list[Path]:
    return sorted((layout.data / "images/test/queries").iterdir())


def _drop(layout: Layout) -> dict[str, Path]:
    q = _queries(layout)
    layout.inbox.mkdir(exist_ok=True)
    geo = parse_name(q[1].name)
    return {
        "named": Path(shutil.copy(q[0], layout.inbox / q[0].name)),
        "photo": exif_photo(q[1], layout.inbox / "holiday photo.JPG", geo.lat, geo.lon),
        "broken": truncated_jpeg(q[2], layout.inbox / q[2].name),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(layout: Layout) -> dict:
    """Everything a finished batch determines (release ids, shard index, catalog, data tree files)."""
    release = load_release(layout.release_dir("avg"))
    return {
        "release_ids": sorted(release.ids["id"].to_list()),
        "index": read_index(layout.shards_dir).drop("offset", "size").rows(),
        "catalog": read_catalog(layout.catalog_dir).rows(),
        "data": sorted(p.relative_to(layout.data).as_posix() for p in layout.data.rglob("*") if p.is_file()),
    }


# --------------------------------------------------------------------------- validation


def test_check_file_reads_names_and_exif_like_ingest(project, tmp_path):
    _, cfg, layout = project
    files = _drop(layout)
    (layout.inbox / "empty.jpg").write_bytes(b"")
    (layout.inbox / "notes.txt").write_text("hello")
    (layout.inbox / "no-gps.jpg").write_bytes(jpeg_bytes())
    check = {
        p.name: vi.check_file(layout.inbox, p.name, "test", cfg.ingest.max_pixels, cfg.ingest.max_file_bytes)
        for p in layout.inbox.iterdir()
    }
    named = check[files["named"].name]
    assert named["reason"] is None and named["source"] == "name"
    assert named["path"] == f"images/test/database/{files['named'].name}"
    photo = check["holiday photo.JPG"]
    assert photo["reason"] is None and photo["source"] == "exif" and photo["utm_zone"] == 17
    geo = parse_name(_queries(layout)[1].name)
    assert abs(photo["utm_east"] - geo.utm_east) < 1.0 and abs(photo["utm_north"] - geo.utm_north) < 1.0
    assert parse_name(photo["path"]).note == "holiday_photo"
    assert check[files["broken"].name]["reason"] == "truncated image"
    assert check["empty.jpg"]["reason"] == "empty file"
    assert check["notes.txt"]["reason"] == "not an image"
    assert check["no-gps.jpg"]["reason"].startswith("no position: not a datasets_vg name")


def test_scan_skips_hidden_files_and_the_quarantine(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "quarantine").mkdir(parents=True)
    (inbox / "quarantine" / "old.jpg").write_bytes(b"x")
    (inbox / ".partial.jpg").write_bytes(b"x")
    (inbox / "batch").mkdir()
    (inbox / "batch" / "a.jpg").write_bytes(b"x")
    (inbox / "b.jpg").write_bytes(b"x")
    assert vi.scan_inbox(inbox) == ["b.jpg", "batch/a.jpg"]
    assert vi.scan_inbox(tmp_path / "missing") == []


def test_quarantine_never_overwrites(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in range(2):
        (inbox / "x.jpg").write_bytes(bytes([n]))
        vi.quarantine(inbox, "x.jpg", f"reason {n}")
    q = inbox / "quarantine"
    assert sorted(p.name for p in q.iterdir()) == ["x.1.jpg", "x.1.jpg.reason.txt", "x.jpg", "x.jpg.reason.txt"]
    assert (q / "x.1.jpg").read_bytes() == b"\x01" and (q / "x.1.jpg.reason.txt").read_text().startswith("reason 1")


# --------------------------------------------------------------------------- runs


def test_batch_extends_everything_as_a_fresh_ingest_would(project, tmp_path):
    root, cfg, layout = project
    old_tars = {p.relative_to(layout.shards_dir).as_posix(): _sha(p) for p in layout.shards_dir.rglob("*.tar")}
    n_ids = read_index(layout.shards_dir).height
    _drop(layout)
    result = rx.run_reindex(cfg, layout)
    assert all(a["id"] == image_id("test", a["path"]) for a in result.added)  # what every rebuild gives them
    new_ids = sorted(a["id"] for a in result.added)
    assert [r["reason"] for r in result.rejected] == ["truncated image"]
    assert result.releases == {"avg": "v000002"}
    # the extended catalog is exactly what ingesting the grown data tree gives
    fresh = ingest(layout.data, tmp_path / "fresh", cfg.ingest).catalog
    assert read_catalog(layout.catalog_dir).equals(fresh)
    # old shards byte-identical, one new shard, readable through the ordinary reader
    assert {n: _sha(layout.shards_dir / n) for n in old_tars} == old_tars
    new = [
        p.relative_to(layout.shards_dir).as_posix()
        for p in layout.shards_dir.rglob("*.tar")
        if p.relative_to(layout.shards_dir).as_posix() not in old_tars
    ]
    assert new == ["test/test-database-000001.tar"]
    reader = ShardReader(layout.shards_dir)
    assert len(reader) == n_ids + 2 and reader.load(new_ids[1]).size == (cfg.shards.width, cfg.shards.height)
    # the release's new vectors are what a from-scratch extraction gives for those shard images
    release = load_release(layout.release_dir("avg"))
    stored = release.index.reconstruct_batch(new_ids)
    assert abs(stored - release.encode(reader, new_ids)).max() < 1e-4
    # a second run: nothing to do, nothing written
    before = _state(layout)
    again = rx.run_reindex(cfg, layout)
    assert again.added == [] and again.rejected == [] and _state(layout) == before


def test_names_already_indexed_duplicated_or_in_another_zone_are_quarantined(project):
    _, cfg, layout = project
    db = sorted((layout.data / "images/test/database").iterdir())
    layout.inbox.mkdir()
    shutil.copy(db[0], layout.inbox / db[0].name)  # already in the data tree
    q = _queries(layout)[0]
    (layout.inbox / "a").mkdir()
    shutil.copy(q, layout.inbox / q.name)
    shutil.copy(q, layout.inbox / "a" / q.name)  # the same name twice in one batch
    exif_photo(q, layout.inbox / "far.jpg", 48.8584, 2.2945)  # Paris: UTM zone 31U
    result = rx.run_reindex(cfg, layout)
    assert len(result.added) == 1
    reasons = sorted(r["reason"].split(":")[0] for r in result.rejected)
    assert reasons == [vi.REASON_ALREADY_INDEXED, vi.REASON_DUPLICATE_NAME, rx.REASON_OTHER_ZONE]


def test_empty_inbox_writes_nothing(project):
    _, cfg, layout = project
    result = rx.run_reindex(cfg, layout)
    assert result.added == [] and not rx.work_dir(layout).exists()


def test_no_release_leaves_the_inbox_alone(project):
    _, cfg, layout = project
    shutil.rmtree(layout.release_dir("avg"))
    files = _drop(layout)
    with pytest.raises(rx.ReindexError, match="no release"):
        rx.run_reindex(cfg, layout)
    assert all(p.exists() for p in files.values()) and not (layout.inbox / "quarantine").exists()


@pytest.mark.parametrize(
    "step", ["shards-written", "release-switched", "shard-index-written", "catalog-written", "files-moved"]
)
def test_a_crash_at_any_step_resumes_to_the_same_result(released, tmp_path, monkeypatch, step):
    root, cfg = released
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    clean_layout = Layout.from_config(cfg, clean)
    _drop(clean_layout)
    rx.run_reindex(cfg, clean_layout)
    expected = _state(clean_layout)

    crashed = tmp_path / "crashed"
    shutil.copytree(root, crashed)
    layout = Layout.from_config(cfg, crashed)
    _drop(layout)
    before = _state(layout)

    def crash(at: str) -> None:
        if at == step:
            raise RuntimeError(f"crash at {at}")

    monkeypatch.setattr(rx, "reached", crash)
    with pytest.raises(RuntimeError):
        rx.run_reindex(cfg, layout)
    if step == "shards-written":  # before the commit point: nothing that serves has changed
        assert _state(layout) == before
    assert (rx.work_dir(layout) / rx.PENDING).exists()
    monkeypatch.undo()
    result = rx.run_reindex(cfg, layout)
    assert result.resumed
    assert _state(layout) == expected
    assert not (rx.work_dir(layout) / rx.PENDING).exists()


def test_the_first_run_creates_the_inbox_and_says_where_it_is(project):
    _, cfg, layout = project
    assert not layout.inbox.exists()
    result = rx.run_reindex(cfg, layout)
    assert layout.inbox.is_dir() and result.added == [] and str(layout.inbox) in result.note
