"""What killed writers leave is cleaned at the next start (issue 17, case 13): a temporary of a dead
process beside its target, half-built release versions, and the many small tars of small re-index
batches (they are merged into the tail shard)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import polars as pl

from tests.faults.conftest import REPO, env, kill9, start_victim, wait_for
from vpr.foundations.atomic import write_text_atomic
from vpr.shared.shardio import read_index
from vpr.steps.index import current_version

KILLED_WRITER = """
import os, signal, sys
from vpr.foundations.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""

PAUSED_WRITER = """
import sys, time
from pathlib import Path
from vpr.foundations.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("busy")
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


def test_the_next_write_removes_a_dead_writers_temporary_and_keeps_a_live_ones(tmp_path):
    """Liveness is the writer's lock on its temporary, not the PID in its name: a live writer in another
    PID namespace (a container, another host on a shared filesystem) has a PID that means nothing here."""
    target = tmp_path / "CURRENT"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO, env=env())
    assert proc.returncode == -9
    (dead,) = [p for p in tmp_path.iterdir() if p.name.startswith(".CURRENT.")]
    dead.rename(tmp_path / f".CURRENT.{os.getpid()}.deadbeef.tmp")  # a dead writer whose PID is reused here
    dead = tmp_path / f".CURRENT.{os.getpid()}.deadbeef.tmp"
    writer = subprocess.Popen(
        [sys.executable, "-c", PAUSED_WRITER, str(target), str(tmp_path / "paused")], cwd=REPO, env=env()
    )
    try:
        wait_for(tmp_path / "paused", writer)
        (working,) = [p for p in tmp_path.iterdir() if p.name.startswith(".CURRENT.") and p != dead]
        live = working.rename(tmp_path / ".CURRENT.4194000.abcd1234.tmp")  # its PID, as another namespace sees it
        write_text_atomic(target, "v000001\n")
        assert not dead.exists() and live.exists() and target.read_text() == "v000001\n"
    finally:
        writer.kill()
        writer.wait()


def test_a_killed_index_builds_leftovers_are_gone_before_the_next_build_writes(released, tmp_path):
    root, _, layout = released
    release_dir = layout.release_dir("avg")
    live = current_version(release_dir)
    victim = start_victim(root, tmp_path / "first", "faiss:write_index", 1, "index")
    wait_for(tmp_path / "first", victim)
    kill9(victim)
    assert any(p.name.startswith(".tmp-") for p in release_dir.iterdir())  # the dead build's folder

    second = start_victim(root, tmp_path / "second", "faiss:write_index", 1, "index")
    wait_for(tmp_path / "second", second)  # the next build is at work: the dead one's folder is gone
    building = [p for p in release_dir.iterdir() if p.name.startswith(".tmp-")]
    kill9(second)
    assert len(building) == 1 and current_version(release_dir) == live


def test_small_reindex_batches_fill_the_tail_shard_instead_of_adding_tars(released):
    from vpr.steps.reindex import run_reindex

    _, cfg, layout = released
    shards = layout.split_shards("test")
    queries = sorted((layout.data / "images/test/queries").iterdir())[:6]
    tars_before = sorted(p.name for p in shards.glob("*.tar"))
    layout.inbox.mkdir(exist_ok=True)
    for q in queries:  # six batches of one image each
        shutil.copy(q, layout.inbox / q.name)
        assert len(run_reindex(cfg, layout).added) == 1
    index = read_index(shards)
    per_shard = cfg.shards.samples_per_shard
    database = index.filter(pl.col("role") == "database")
    expected = -(-database.height // per_shard) + index.filter(pl.col("role") != "database")["shard"].n_unique()
    tars = sorted(p.name for p in shards.glob("*.tar"))
    assert len(set(index["shard"])) == expected, (tars_before, tars)  # as many as a fresh `vpr shard` would
    assert len(tars) <= expected + 1  # plus at most the tail a reader may still hold, removed next batch
