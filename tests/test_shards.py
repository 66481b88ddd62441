"""Shards: deterministic WebDataset tars, readable by webdataset, with a seekable byte index."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from PIL import Image

from vpr.foundations.config import IngestConfig, ShardConfig
from vpr.foundations.layout import ID_STRIDE, first_id, image_id
from vpr.shared.shardio import INDEX_FILE, ShardError, ShardReader, iter_split
from vpr.steps.catalog import ingest, read_catalog
from vpr.steps.shards import write_shards

CFG = ShardConfig(height=24, width=32, jpeg_quality=85, samples_per_shard=3)


def _save(path: Path, im: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=kw.pop("format", "JPEG"), **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A small datasets_vg tree (incl. grayscale, PNG-as-.jpg, EXIF-rotated) and its catalog."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    counts = {("train", "database"): 7, ("train", "queries"): 4, ("test", "database"): 2}
    for (split, role), n in counts.items():
        for i in range(n):
            pixels = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
            _save(root / f"images/{split}/{role}/@{1000 + i}.5@{2000 + i}.25@.jpg", Image.fromarray(pixels))
    db = root / "images/train/database"
    _save(db / "@3000@3000@.jpg", Image.new("L", (50, 40), 128))
    _save(db / "@3001@3001@.jpg", Image.new("RGB", (50, 40), (9, 99, 199)), format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(db / "@3002@3002@.jpg", Image.new("RGB", (80, 30), (250, 0, 0)), exif=exif)
    catalog_dir = tmp_path_factory.mktemp("catalog")
    ingest(root, catalog_dir, IngestConfig(workers=1))
    read_catalog(catalog_dir).write_parquet(catalog_dir / "all.parquet")  # every split into one shard set
    return root, catalog_dir / "all.parquet"


def shard(dataset, out: Path, cfg: ShardConfig = CFG, workers: int = 1) -> pl.DataFrame:
    root, catalog = dataset
    return pl.read_parquet(write_shards(catalog, root, out, cfg, workers=workers))


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_deterministic_and_independent_of_workers(dataset, tmp_path: Path) -> None:
    shard(dataset, tmp_path / "a")
    shard(dataset, tmp_path / "b", workers=2)
    a, b = tar_bytes(tmp_path / "a"), tar_bytes(tmp_path / "b")
    assert a == b
    assert list(a) == [
        "test-database-000000.tar",
        *(f"train-database-00000{i}.tar" for i in range(4)),
        "train-queries-000000.tar",
        "train-queries-000001.tar",
    ]
    assert (tmp_path / "a" / INDEX_FILE).read_bytes() == (tmp_path / "b" / INDEX_FILE).read_bytes()


def test_index_matches_catalog_and_tar_members(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path)
    catalog = pl.read_parquet(dataset[1])
    # an id is a function of split and path alone, inside the split's range: nothing else shifts it
    expected = {}
    for split in ("train", "test"):
        paths = catalog.filter(pl.col("split") == split)["path"].to_list()
        expected.update({p: image_id(split, p) for p in paths})
        assert all(first_id(split) <= expected[p] < first_id(split) + ID_STRIDE for p in paths)
    assert dict(index.select("path", "id").iter_rows()) == expected
    assert index["id"].to_list() == sorted(expected.values())
    assert all("." not in k for k in index["key"])
    assert index.group_by("shard").len()["len"].max() <= CFG.samples_per_shard
    for row in index.iter_rows(named=True):
        with tarfile.open(tmp_path / row["shard"]) as tar:
            member = tar.getmember(f"{row['key']}.jpg")
            assert (member.offset_data, member.size) == (row["offset"], row["size"])
            assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "", 0o444)


def test_webdataset_reads_everything(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path)
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == index.height
    assert sorted(s["__key__"] for s in samples) == sorted(index["key"])
    for s in samples:
        assert "." not in s["__key__"] and set(s) >= {"jpg", "json"}
        assert Image.open(io.BytesIO(s["jpg"])).size == (CFG.width, CFG.height)


def test_reader_random_access_equals_streaming(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path)
    reader = ShardReader(tmp_path)
    assert len(reader) == index.height
    ids = dict(index.select("key", "id").iter_rows())
    seen = 0
    for split, role in (("train", "database"), ("train", "queries"), ("test", "database")):
        for key, image, meta in iter_split(tmp_path, split, role):
            i = ids[key]
            assert (meta["split"], meta["role"], meta["id"]) == (split, role, i)
            assert image.size == (CFG.width, CFG.height) and image.mode == "RGB"
            assert np.array_equal(np.asarray(reader.load(i)), np.asarray(image))
            seen += 1
    assert seen == index.height
    assert list(iter_split(tmp_path, "val", "queries")) == []
    reader.close()


def test_exif_rotation_applied_before_resize(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path, ShardConfig(height=80, width=30, samples_per_shard=100))
    rotated = index.filter(pl.col("path").str.ends_with("@3002@3002@.jpg"))["id"][0]
    with ShardReader(tmp_path) as reader:
        im = reader.load(rotated)
    assert im.size == (30, 80)
    # stored 80×30 red, displayed 30×80: with transpose done first the resize is a no-op on content
    assert np.asarray(im)[..., 0].mean() > 200


def test_reader_survives_pickling(dataset, tmp_path: Path) -> None:
    import pickle

    shard(dataset, tmp_path)
    reader = ShardReader(tmp_path)
    some = int(reader.index["id"][0])
    first = reader.read_jpeg(some)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_jpeg(some) == first


def test_rerun_removes_stale_shards(dataset, tmp_path: Path) -> None:
    shard(dataset, tmp_path, ShardConfig(height=24, width=32, samples_per_shard=1))
    many = set(tar_bytes(tmp_path))
    shard(dataset, tmp_path, ShardConfig(height=24, width=32, samples_per_shard=100))
    few = set(tar_bytes(tmp_path))
    index = pl.read_parquet(tmp_path / INDEX_FILE)
    assert few == set(index["shard"]) and len(few) < len(many)
    assert not list(tmp_path.glob("*.tmp"))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_tar_names_shard_when_streaming(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path)
    victim = index.filter(pl.col("role") == "database", pl.col("split") == "train").row(4, named=True)
    _truncate(tmp_path / victim["shard"], victim["offset"] + 10)  # cut inside this sample's jpg
    with pytest.raises(ShardError, match=victim["shard"]) as err:
        list(iter_split(tmp_path, "train", "database"))
    assert victim["key"] in str(err.value)


def test_tar_truncated_at_member_boundary_is_not_silent(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path)
    first = index.filter(pl.col("shard") == "train-queries-000000.tar").sort("id")
    second = first.row(1, named=True)
    _truncate(tmp_path / second["shard"], second["offset"] - 512)  # drop from 2nd sample's header on
    with pytest.raises(ShardError, match="train-queries-000000.tar") as err:
        list(iter_split(tmp_path, "train", "queries"))
    assert second["key"] in str(err.value)


def test_truncated_tar_names_shard_on_random_access(dataset, tmp_path: Path) -> None:
    index = shard(dataset, tmp_path)
    last = index.row(index.height - 1, named=True)
    _truncate(tmp_path / last["shard"], last["offset"] + 5)
    with ShardReader(tmp_path) as reader:
        with pytest.raises(ShardError, match=last["shard"]) as err:
            reader.read_jpeg(last["id"])
    assert last["key"] in str(err.value)


def test_missing_source_image_is_a_clear_error(dataset, tmp_path: Path) -> None:
    root, catalog = dataset
    table = pl.read_parquet(catalog)
    bad = table.with_columns(pl.lit("images/train/database/@9@9@.jpg").alias("path")).head(1)
    bad.write_parquet(tmp_path / "cat.parquet")
    with pytest.raises(ShardError, match="@9@9@"):
        write_shards(tmp_path / "cat.parquet", root, tmp_path / "out", CFG, workers=1)
