"""Trusting what is served: version names are never reused, the service swaps on identity, a release
keeps its own checked model, and a damaged segment is named, never spread, never served."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.faults.conftest import vpr
from vpr.shared.checkpoints import load_checkpoint, save_checkpoint
from vpr.shared.shardio import ShardReader
from vpr.shared.versions import CURRENT, MANIFEST_FILE, MODEL_FILE, ReleaseError, counter_file, versions
from vpr.steps.api.live import LiveRelease
from vpr.steps.index import add_to_release, build_release, current_version, load_release, open_for_append
from vpr.steps.reindex import PENDING, ReindexError, run_reindex, work_dir

pytestmark = pytest.mark.timeout(300)


def _add_queries(layout, start: int, n: int) -> Path:
    """Query images ``start..start+n`` appended as a new version (one delta segment); its folder."""
    release = open_for_append(layout.release_dir("avg"))
    reader = ShardReader(layout.shards_dir)
    rows = reader.index.filter(pl.col("role") == "queries").sort("id").slice(start, n)
    ids = rows["id"].to_list()
    return Path(add_to_release(release, ids, release.encode(reader, ids), rows))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _other_checkpoint(source: Path, target: Path) -> Path:
    """A valid checkpoint of the same head with other weights (what another training run leaves)."""
    ckpt = load_checkpoint(source)
    name = next(k for k, t in ckpt["model"].items() if t.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 0.5
    save_checkpoint(ckpt, target)
    return target


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # in place: every version linking it sees the damage


def _probe(layout) -> Path:
    return sorted((layout.data / "images/test/queries").iterdir())[0]


# --------------------------------------------------------------------------- 3: names and identity


def test_a_removed_version_name_is_never_published_again_and_the_service_swaps(released):
    _, cfg, layout = released
    release_dir = layout.release_dir("avg")
    grown = _add_queries(layout, 0, 3)
    live = LiveRelease(release_dir)
    assert live.current().version == grown.name == "v000002"
    served = live.current().release.index.ntotal
    shutil.rmtree(grown)  # rolled back by hand: the newest version removed, CURRENT back on the first
    (release_dir / CURRENT).write_text("v000001\n")
    rebuilt = build_release("avg", cfg, layout)
    assert rebuilt.name == "v000003"  # never v000002 again
    assert live.refresh() and live.current().version == "v000003"
    assert live.current().release.index.ntotal == served - 3


def test_a_release_under_a_reused_name_is_still_swapped_in(released):
    _, cfg, layout = released
    release_dir = layout.release_dir("avg")
    live = LiveRelease(release_dir)
    assert live.current().version == "v000001"
    served = live.current().release.index.ntotal
    shutil.rmtree(release_dir)  # everything wiped, the counter too: the one way a name comes back
    counter_file(release_dir).unlink()
    test_only = cfg.model_copy(update={"index": cfg.index.model_copy(update={"splits": ["test"]})})
    assert build_release("avg", test_only, layout).name == "v000001"
    assert live.refresh() and live.swaps == 1
    assert live.current().release.index.ntotal == load_release(release_dir).index.ntotal < served
    assert not live.refresh()  # the same release: no reload


# --------------------------------------------------------------------------- 4: the release's own model


def test_overwriting_the_training_checkpoint_leaves_every_release_as_it_was(released, tmp_path):
    _, cfg, layout = released
    version = current_version(layout.release_dir("avg"))
    checkpoint = layout.checkpoint("avg")
    model_sha = _sha(version / MODEL_FILE)
    reader = ShardReader(layout.shards_dir)
    first = [int(reader.index["id"][0])]
    before = load_release(layout.release_dir("avg")).encode(reader, first)
    shutil.copy(_other_checkpoint(checkpoint, tmp_path / "other.pt"), checkpoint)  # cp other.pt models/avg/model.pt
    assert _sha(checkpoint) != model_sha and _sha(version / MODEL_FILE) == model_sha
    assert not os.path.samefile(version / MODEL_FILE, checkpoint)
    assert json.loads((version / MANIFEST_FILE).read_text())["model"]["sha256"] == model_sha
    np.testing.assert_array_equal(load_release(layout.release_dir("avg")).encode(reader, first), before)


def test_a_replaced_release_model_is_refused_naming_the_file(released, tmp_path):
    _, cfg, layout = released
    version = current_version(layout.release_dir("avg"))
    shutil.copy(_other_checkpoint(layout.checkpoint("avg"), tmp_path / "other.pt"), version / MODEL_FILE)
    for opener in (load_release, open_for_append):
        with pytest.raises(ReleaseError, match=rf"{version / MODEL_FILE}: its SHA-256 .* `vpr index`"):
            opener(layout.release_dir("avg"))


# --------------------------------------------------------------------------- 5: damaged segments


def test_a_truncated_delta_is_one_line_from_vpr_locate(released):
    root, cfg, layout = released
    delta = _add_queries(layout, 0, 2) / "delta-000002.npy"
    _truncate(delta)
    with pytest.raises(ReleaseError, match=rf"^{delta}: \d+ bytes, its manifest records \d+: damaged"):
        load_release(layout.release_dir("avg"))
    result = vpr(root, "locate", str(_probe(layout)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert str(delta.relative_to(root)) in result.stderr and "damaged" in result.stderr


def test_reindex_publishes_nothing_on_a_damaged_version_and_finishes_after_a_rebuild(released):
    _, cfg, layout = released
    release_dir = layout.release_dir("avg")
    delta = _add_queries(layout, 0, 2) / "delta-000002.npy"
    _truncate(delta)
    layout.inbox.mkdir(exist_ok=True)
    probe = _probe(layout)
    shutil.copy(probe, layout.inbox / probe.name)
    with pytest.raises(ReindexError, match=rf"{delta}: .*damaged.*stays pending"):
        run_reindex(cfg, layout)
    assert versions(release_dir) == ["v000001", "v000002"] and current_version(release_dir).name == "v000002"
    assert (work_dir(layout) / PENDING).exists() and (layout.inbox / probe.name).exists()
    build_release("avg", cfg, layout)  # `vpr index`: a whole new version
    result = run_reindex(cfg, layout)
    assert result.resumed and len(result.added) == 1 and result.releases == {"avg": "v000004"}
    release = load_release(release_dir)
    assert result.added[0]["id"] in set(release.ids["id"].to_list())


def test_the_service_keeps_the_last_good_release_and_says_why_once(released, caplog):
    _, cfg, layout = released
    release_dir = layout.release_dir("avg")
    good = _add_queries(layout, 0, 2)
    live = LiveRelease(release_dir)
    damaged = _add_queries(layout, 2, 2) / "delta-000003.npy"
    _truncate(damaged)
    with caplog.at_level(logging.WARNING, logger="vpr.steps.api.live"):
        assert not any(live.refresh() for _ in range(3))
    assert live.current().version == good.name
    said = [r.getMessage() for r in caplog.records if r.name == "vpr.steps.api.live"]
    assert len(said) == 1 and str(damaged) in said[0] and "still serving v000002" in said[0], said


def test_the_service_starts_on_the_newest_version_that_loads(released, caplog):
    _, cfg, layout = released
    release_dir = layout.release_dir("avg")
    good = _add_queries(layout, 0, 2)
    damaged = _add_queries(layout, 2, 2)
    _truncate(damaged / "delta-000003.npy")
    with caplog.at_level(logging.WARNING, logger="vpr.steps.api.live"):
        live = LiveRelease(release_dir)
        assert not live.refresh()
    assert live.current().version == good.name and current_version(release_dir) == damaged
    said = [r.getMessage() for r in caplog.records if r.name == "vpr.steps.api.live"]
    assert len(said) == 1 and "delta-000003.npy" in said[0] and "serving v000002" in said[0], said


def test_a_release_written_before_records_still_loads_with_a_one_line_note(released, caplog):
    _, cfg, layout = released
    version = current_version(layout.release_dir("avg"))
    manifest = json.loads((version / MANIFEST_FILE).read_text())
    old = {k: v for k, v in manifest.items() if k not in ("model", "release_id")}
    old["segments"] = [{k: v for k, v in s.items() if k != "files"} for s in manifest["segments"]]
    (version / MANIFEST_FILE).write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="vpr.shared.release"):
        release = load_release(layout.release_dir("avg"))
    assert release.index.ntotal == manifest["count"]
    notes = [r.getMessage() for r in caplog.records if r.name == "vpr.shared.release"]
    assert len(notes) == 1 and "no file sizes or hashes" in notes[0] and "`vpr index`" in notes[0], notes
