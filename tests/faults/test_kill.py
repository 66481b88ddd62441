"""Cases 1 and 2: ``kill -9`` of training, sharding and indexing; resume/rerun gives the clean result."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
import torch

from tests.faults.conftest import copy_project, kill9, snapshot, start_victim, vpr, wait_for
from tests.micro import write_params
from vpr.foundations.config import load_config
from vpr.foundations.layout import SPLITS
from vpr.shared.checkpoints import load_checkpoint
from vpr.shared.shardio import ShardError, ShardReader, iter_split
from vpr.steps.index import current_version, load_release
from vpr.steps.shards import write_shards

pytestmark = pytest.mark.timeout(300)


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- case 1: training


def test_kill9_mid_epoch_then_resume_equals_uninterrupted_run(micro_project, tmp_path):
    root, cfg, layout = micro_project
    _, _, killed = copy_project(root, tmp_path / "killed")
    batches = -(-cfg.train.queries_per_epoch // cfg.train.batch_queries)
    assert cfg.train.epochs == 2 and batches >= 2

    # the reference run and the victim run side by side, each in its own fresh interpreter (one thread
    # each: no oversubscription of the cores, and all three runs compute with the same settings)
    one = {"OMP_NUM_THREADS": "1"}
    marker = tmp_path / "paused"
    victim = start_victim(
        killed.root, marker, "vpr.steps.train:triplet_loss", batches + 2, "train", "--head", "gem", **one
    )
    reference = vpr(root, "train", "--head", "gem", **one)
    wait_for(marker, victim)
    # paused in epoch 2 after one optimiser step of it: epoch 1 is checkpointed, epoch 2 is not
    assert load_checkpoint(killed.last_checkpoint("gem"))["epoch"] == 1
    kill9(victim)
    assert reference.returncode == 0, reference.stderr

    resumed = vpr(killed.root, "train", "--head", "gem", "--resume", **one)
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_checkpoint(layout.last_checkpoint("gem")), load_checkpoint(killed.last_checkpoint("gem"))
    assert a["epoch"] == b["epoch"] == cfg.train.epochs
    assert _state_equal(a["model"], b["model"])
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    best_a, best_b = load_checkpoint(layout.checkpoint("gem")), load_checkpoint(killed.checkpoint("gem"))
    assert best_a["epoch"] == best_b["epoch"] and _state_equal(best_a["model"], best_b["model"])
    for key, value in a["optimizer"]["state"].items():
        assert _state_equal(value, b["optimizer"]["state"][key])


# --------------------------------------------------------------------------- case 2: shards


def _assert_whole_or_nothing(shards_dir, before: dict[str, str], after: dict[str, str]) -> None:
    """Per split, readers find one complete set of shards (the previous or the new), or no index; never a mix."""
    for split in SPLITS:
        folder = shards_dir / split
        if not (folder / "index.parquet").exists():
            with pytest.raises(ShardError, match="not found"):
                ShardReader(shards_dir, [split])
            continue
        now = {k.partition("/")[2]: v for k, v in snapshot(shards_dir).items() if k.startswith(f"{split}/")}
        index = pl.read_parquet(folder / "index.parquet")
        named = ["index.parquet", *index["shard"].unique().to_list()]
        whole = [
            {n: s[f"{split}/{n}"] for n in named if f"{split}/{n}" in s} == {n: now.get(n) for n in named}
            for s in (before, after)
        ]
        assert any(whole), f"{split}: the index names tars from another write"
        with ShardReader(shards_dir, [split]) as reader:
            for i in reader.index["id"].to_list():
                reader.load(i)
        assert (
            sum(1 for _ in iter_split(shards_dir, split, "database"))
            == index.filter((pl.col("split") == split) & (pl.col("role") == "database")).height
        )


@pytest.mark.parametrize(
    "target,count",
    [
        ("vpr.steps.shards:encode_rows", 3),  # while the new tars are being written
        ("os:replace", 2),  # while they are being switched in
    ],
    ids=["writing", "switching"],
)
def test_kill9_during_shard_writing_never_exposes_a_mix(micro_project, tmp_path, target, count):
    root, cfg, layout = micro_project
    before = snapshot(layout.shards_dir)
    new_cfg = write_params(root, {"shards": {"jpeg_quality": 70}})  # every tar's bytes change
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for split in SPLITS:
        write_shards(
            clean / f"artifacts/catalog/{split}.parquet",
            clean / "data",
            clean / f"artifacts/shards/{split}",
            new_cfg.shards,
            workers=1,
        )

    marker = tmp_path / "paused"
    victim = start_victim(root, marker, target, count, "shard")
    wait_for(marker, victim)
    kill9(victim)
    _assert_whole_or_nothing(layout.shards_dir, before, snapshot(clean / "artifacts/shards"))

    rerun = vpr(root, "shard")
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(layout.shards_dir) == snapshot(clean / "artifacts/shards")  # byte-identical, no leftovers


# --------------------------------------------------------------------------- case 2: index


@pytest.mark.parametrize(
    "target",
    [
        "faiss:write_index",  # the new version folder is half written
        "vpr.shared.versions:write_text_atomic",  # the new version is complete but CURRENT not yet switched
    ],
    ids=["half-written", "not-switched"],
)
def test_kill9_during_index_build_keeps_the_previous_release(released, tmp_path, target):
    from vpr.steps.index import build_release

    root, cfg, layout = released
    release_dir = layout.release_dir("avg")
    live = current_version(release_dir)
    before = snapshot(live)
    ids_before = load_release(release_dir).ids["id"].to_list()

    marker = tmp_path / "paused"
    victim = start_victim(root, marker, target, 1, "index")
    wait_for(marker, victim)
    kill9(victim)

    assert current_version(release_dir) == live and snapshot(live) == before
    assert load_release(release_dir).ids["id"].to_list() == ids_before

    version = build_release("avg", load_config(root / "params.yaml"), layout)  # the rerun
    assert current_version(release_dir) == version != live
    # the same index and id table as the clean build the fixture made from the same inputs
    for name in ("index.faiss", "ids.parquet"):
        assert (version / name).read_bytes() == (live / name).read_bytes(), name
    leftovers = sorted(p.name for p in release_dir.iterdir() if p.name != "CURRENT")
    assert leftovers == sorted({live.name, version.name})  # half-built and orphaned versions are gone
