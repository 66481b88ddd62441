"""Case 4: two re-index processes started together: the second waits for the first; every new image
joins the release, the shard index and the catalog exactly once."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.faults.conftest import start_victim, wait_for
from vpr.shared.shardio import read_index
from vpr.steps.catalog import read_catalog
from vpr.steps.index import load_release

pytestmark = pytest.mark.timeout(300)


def _waiting_on(lock: Path, pid: int) -> bool:
    """Whether process ``pid`` is blocked on the flock of ``lock`` (Linux ``/proc/locks``)."""
    inode = f":{lock.stat().st_ino} "
    return any(
        "->" in line and f" {pid} " in line and inode in line for line in Path("/proc/locks").read_text().splitlines()
    )


def test_second_reindex_waits_and_each_image_is_added_once(released, tmp_path):
    root, cfg, layout = released
    before = load_release(layout.release_dir("avg")).ids["id"].to_list()
    index_before = read_index(layout.shards_dir).height
    layout.inbox.mkdir()
    new = sorted((layout.data / "images/test/queries").iterdir())[:3]
    for f in new:
        shutil.copy(f, layout.inbox / f.name)

    # A stops inside the re-index lock (new shards written, release not yet switched) until B waits on it
    marker, go = tmp_path / "a-holds-the-lock", tmp_path / "go"
    first = start_victim(root, marker, "vpr.steps.reindex:reached", 1, "reindex", hold=str(go))
    wait_for(marker, first)
    second = start_victim(root, tmp_path / "unused", "vpr.steps.reindex:reached", 1_000_000, "reindex")
    lock = layout.artifacts / "reindex" / ".lock"
    if Path("/proc/locks").exists():
        deadline = time.monotonic() + 120
        while not _waiting_on(lock, second.pid):
            assert second.poll() is None, second.communicate()
            assert time.monotonic() < deadline, "the second run never waited on the re-index lock"
            time.sleep(0.05)
    else:  # pragma: no cover - not Linux: give B time to reach the lock
        time.sleep(10)
    go.touch()
    out_a, err_a = first.communicate(timeout=120)
    out_b, err_b = second.communicate(timeout=120)
    assert first.returncode == 0, err_a
    assert second.returncode == 0, err_b
    a, b = json.loads(out_a), json.loads(out_b)

    added = [x["path"].rsplit("/", 1)[1] for x in a["added"] + b["added"]]
    assert sorted(added) == sorted(f.name for f in new)  # each new image once, between the two runs
    assert b["added"] == [] and not b["rejected"]  # B waited, then found the work done

    ids = load_release(layout.release_dir("avg")).ids["id"].to_list()
    assert len(ids) == len(set(ids)) == len(before) + len(new)
    index = read_index(layout.shards_dir)
    assert index.height == index_before + len(new) and index["id"].n_unique() == index.height
    catalog = read_catalog(layout.catalog_dir)
    assert catalog["path"].n_unique() == catalog.height
    assert not any(layout.inbox.glob("*.jpg")) and not (layout.artifacts / "reindex/pending.json").exists()
