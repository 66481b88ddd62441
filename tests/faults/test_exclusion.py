"""A re-index and a train-all run never interleave (issue 17, case 15): train-all holds the project's
data lock from its first step to its DVC record; a re-index meanwhile changes nothing and leaves the
inbox for its next run, so the record never claims outputs match a catalog they were not computed from."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from tests.faults.conftest import snapshot
from vpr.foundations.config import load_config
from vpr.foundations.datalock import current_holder, data_lock
from vpr.foundations.layout import Layout
from vpr.steps.reindex import run_reindex

pytestmark = pytest.mark.timeout(600)


def _drop_one(layout: Layout) -> str:
    query = sorted((layout.data / "images/test/queries").iterdir())[0]
    layout.inbox.mkdir(exist_ok=True)
    shutil.copy(query, layout.inbox / query.name)
    return query.name


def test_a_reindex_while_the_data_lock_is_held_changes_nothing_and_runs_later(released):
    _, cfg, layout = released
    name = _drop_one(layout)
    before = snapshot(layout.catalog_dir), snapshot(layout.split_shards("test"))
    with data_lock(layout.artifacts, "train-all"):
        busy = run_reindex(cfg, layout)
        assert busy.added == [] and "train-all" in busy.note
        assert (snapshot(layout.catalog_dir), snapshot(layout.split_shards("test"))) == before
        assert (layout.inbox / name).exists()
    later = run_reindex(cfg, layout)
    assert [a["inbox"] for a in later.added] == [name]


def test_train_all_holds_the_data_lock_for_its_whole_run(trained):
    from flows.train_all import train_all

    root = trained[0]
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    outcome: dict = {}
    with data_lock(layout.artifacts, "test"):
        flow = threading.Thread(target=lambda: outcome.update(train_all(root=str(root))))
        flow.start()
        time.sleep(3)
        assert flow.is_alive() and current_holder(layout.artifacts).startswith("test")  # train-all waits
    deadline = time.monotonic() + 120
    while not (current_holder(layout.artifacts) or "").startswith("train-all"):
        assert flow.is_alive() and time.monotonic() < deadline, "train-all never took the data lock"
        time.sleep(0.05)
    cfg = load_config(root / "params.yaml")
    name = _drop_one(layout)
    try:
        busy = run_reindex(cfg, layout)  # during the run: turned away, nothing touched
        assert busy.added == [] and "train-all" in busy.note and (layout.inbox / name).exists()
    finally:
        shutil.rmtree(layout.inbox)
    flow.join(timeout=300)
    assert not flow.is_alive() and set(outcome["steps"].values()) <= {"Completed", "Cached"}
    assert current_holder(layout.artifacts) is None
