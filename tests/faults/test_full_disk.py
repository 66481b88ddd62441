"""Case 8: the disk fills up while shards are written: a clear error, and the previous shards and index
are intact and readable (and a later run with space completes)."""

from __future__ import annotations

import errno
import tarfile

import polars as pl
import pytest
from typer.testing import CliRunner

from tests.faults.conftest import snapshot
from tests.micro import write_params
from vpr.cli import app
from vpr.shared.shardio import ShardError, ShardReader, iter_split, read_index
from vpr.steps.shards import write_shards

pytestmark = pytest.mark.timeout(120)


def _fill_disk_after(monkeypatch, calls: int) -> None:
    """Every tar member written after the first ``calls`` fails as on a full disk."""
    addfile = tarfile.TarFile.addfile
    seen = 0

    def full(self, *args, **kwargs):
        nonlocal seen
        seen += 1
        if seen > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)


def _assert_intact(layout, before: dict[str, str]) -> None:
    assert snapshot(layout.shards_dir) == before  # same files, same bytes, no staging leftovers
    with ShardReader(layout.shards_dir) as reader:
        for i in reader.index["id"].to_list():
            reader.load(i)
    index = read_index(layout.shards_dir)
    for split in ("train", "test"):
        n = sum(1 for _ in iter_split(layout.shards_dir, split, "database"))
        assert n == index.filter((pl.col("split") == split) & (pl.col("role") == "database")).height


@pytest.mark.parametrize("calls", [0, 70], ids=["first-shard", "third-shard"])
def test_full_disk_while_writing_tars_keeps_previous_shards(micro_project, monkeypatch, calls):
    root, cfg, layout = micro_project
    before = snapshot(layout.shards_dir)
    new = write_params(root, {"shards": {"jpeg_quality": 70}}).shards  # every tar would change
    _fill_disk_after(monkeypatch, calls)
    with pytest.raises(ShardError, match="No space left on device") as err:
        write_shards(layout.catalog("train"), layout.data, layout.split_shards("train"), new, workers=1)
    assert ".tar" in str(err.value) and "previous shards and index are unchanged" in str(err.value)
    _assert_intact(layout, before)

    monkeypatch.undo()  # space again: the rerun completes
    write_shards(layout.catalog("train"), layout.data, layout.split_shards("train"), new, workers=1)
    assert snapshot(layout.shards_dir) != before
    with ShardReader(layout.shards_dir) as reader:
        reader.load(int(reader.index["id"][-1]))


def test_full_disk_while_writing_the_index_keeps_previous_shards(micro_project, monkeypatch):
    root, cfg, layout = micro_project
    before = snapshot(layout.shards_dir)
    new = write_params(root, {"shards": {"jpeg_quality": 70}}).shards

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    with pytest.raises(ShardError, match="shard index.*No space left on device"):
        write_shards(layout.catalog("train"), layout.data, layout.split_shards("train"), new, workers=1)
    _assert_intact(layout, before)


def test_cli_reports_the_full_disk_cleanly(micro_project, monkeypatch):
    root, cfg, layout = micro_project
    before = snapshot(layout.shards_dir)
    write_params(root, {"shards": {"jpeg_quality": 70}})
    _fill_disk_after(monkeypatch, 40)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["shard"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "\nerror: cannot write shard " in "\n" + result.output and "No space left on device" in result.output
    _assert_intact(layout, before)
