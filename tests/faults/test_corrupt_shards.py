"""Case 3: a truncated or corrupted tar among the shards is an error naming the shard and the sample,
wherever it is read (streaming, training, evaluation, with or without loader workers): never a hang,
never a silently different image."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from tests.micro import write_params
from vpr.cli import app
from vpr.shared.shardio import ShardError, ShardReader, iter_split, read_index

pytestmark = pytest.mark.timeout(120)


def _damage(layout, split: str, how: str) -> dict:
    """Damage the 4th database sample of ``split`` in place; returns its index row."""
    index = read_index(layout.shards_dir)
    victim = index.filter((pl.col("split") == split) & (pl.col("role") == "database")).sort("id").row(3, named=True)
    path = layout.shards_dir / victim["shard"]
    data = bytearray(path.read_bytes())
    if how == "flip":  # a few bytes inside the JPEG's entropy-coded data: Pillow decodes it without a word
        mid = victim["offset"] + victim["size"] // 2
        data[mid : mid + 16] = bytes(b ^ 0x5A for b in data[mid : mid + 16])
    else:  # cut the file inside this sample's JPEG
        del data[victim["offset"] + victim["size"] // 2 :]
    path.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_streaming_and_random_access_name_shard_and_sample(micro_project, how):
    root, cfg, layout = micro_project
    victim = _damage(layout, "test", how)
    with pytest.raises(ShardError) as err:
        list(iter_split(layout.shards_dir, "test", "database"))
    assert victim["shard"] in str(err.value) and victim["key"] in str(err.value)
    with ShardReader(layout.shards_dir) as reader:
        with pytest.raises(ShardError) as err:
            reader.load(victim["id"])
    assert victim["shard"] in str(err.value) and victim["key"] in str(err.value)


@pytest.mark.parametrize(
    "command,split,workers",
    [
        (["train", "--head", "gem"], "train", 0),
        (["evaluate", "--head", "avg", "--untrained"], "test", 0),
        (["evaluate", "--head", "avg", "--untrained"], "test", 1),  # the error crosses a DataLoader worker
    ],
    ids=["train", "evaluate", "evaluate-worker"],
)
def test_cli_fails_with_the_shard_and_sample(micro_project, monkeypatch, command, split, workers):
    root, cfg, layout = micro_project
    write_params(root, {"train": {"workers": workers}})
    victim = _damage(layout, split, "flip")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("error: ")  # the CLI's own message, not a crash
    assert victim["shard"] in result.output and victim["key"] in result.output
    assert not layout.checkpoint("gem").exists() and not layout.metrics_file("avg-untrained").exists()
