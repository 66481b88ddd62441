"""Sequential reads go through WebDataset: streamed shard by shard, in DataLoader workers, integrity-checked."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from vpr.shared.descriptors import eval_transform, extract, image_batches
from vpr.shared.shardio import ShardError, ShardReader


def _split_ids(reader: ShardReader, split: str) -> np.ndarray:
    """The split's ids in tar order (shard, offset): the order a stream reads them in."""
    return reader.index.filter(pl.col("split") == split).sort("shard", "offset")["id"].to_numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_split_streams_every_image_once_in_order(micro_project, workers):
    root, cfg, layout = micro_project
    reader = ShardReader(layout.shards_dir)
    ids = _split_ids(reader, "train")  # database and queries: several shards
    assert reader.index.filter(pl.col("split") == "train")["shard"].n_unique() >= 2
    tf = eval_transform(cfg.shards, cfg.train.image_scale)
    seen, images = [], {}
    for positions, batch in image_batches(reader, ids, tf, device=torch.device("cpu"), batch_size=5, workers=workers):
        seen += positions.tolist()
        images.update(zip(positions.tolist(), batch))
    assert sorted(seen) == list(range(len(ids)))  # every image exactly once
    if workers == 0:
        assert seen == list(range(len(ids)))  # one stream: the shard index's order
    for pos in (0, len(ids) // 2, len(ids) - 1):  # the very pixels random access gives
        assert torch.equal(images[pos], tf(reader.load(int(ids[pos]))))


def test_extraction_returns_the_requested_order_whatever_the_workers(micro_project):
    from vpr.shared.checkpoints import untrained_model

    root, cfg, layout = micro_project
    reader = ShardReader(layout.shards_dir)
    model = untrained_model("avg", cfg.model, cfg.train.seed)
    tf = eval_transform(cfg.shards, cfg.train.image_scale)
    ids = _split_ids(reader, "test")
    shuffled = np.random.default_rng(0).permutation(np.concatenate([ids, ids[:3]]))  # repeats too
    kw = dict(device=torch.device("cpu"), batch_size=4)
    one = extract(model, reader, shuffled, tf, workers=0, **kw)
    two = extract(model, reader, shuffled, tf, workers=2, **kw)
    in_order = extract(model, reader, ids, tf, workers=0, **kw)
    pos = {int(i): n for n, i in enumerate(ids)}
    np.testing.assert_allclose(one, in_order[[pos[int(i)] for i in shuffled]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupted_sample_fails_the_stream_in_workers_too(micro_project, workers):
    root, cfg, layout = micro_project
    reader = ShardReader(layout.shards_dir)
    ids = _split_ids(reader, "test")
    first = reader.index.filter(pl.col("id") == int(ids[0])).row(0, named=True)
    victim = reader.index.filter(pl.col("shard") == first["shard"]).sort("id").row(-1, named=True)
    assert victim["id"] != first["id"]
    tar = layout.shards_dir / victim["shard"]
    data = bytearray(tar.read_bytes())
    data[victim["offset"] + victim["size"] // 2] ^= 0xFF  # one flipped byte inside the JPEG
    tar.write_bytes(bytes(data))
    tf = eval_transform(cfg.shards, cfg.train.image_scale)
    with pytest.raises(ShardError, match="checksum"):
        for _ in image_batches(reader, ids[:1], tf, device=torch.device("cpu"), batch_size=4, workers=workers):
            pass  # the damaged sample is not even requested: the whole shard is still checked


def test_unknown_ids_are_refused(micro_project):
    root, cfg, layout = micro_project
    reader = ShardReader(layout.shards_dir)
    tf = eval_transform(cfg.shards, cfg.train.image_scale)
    with pytest.raises(ShardError, match="not in the shard index"):
        next(image_batches(reader, [5 * 10**9], tf, device=torch.device("cpu")))
