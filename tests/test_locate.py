"""Releases and localisation: stable ids, atomic versions, known images found first, bad files fail alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.test_evaluate import build_micro_release
from vpr.cli import app
from vpr.shared.shardio import ShardReader
from vpr.steps.index import CURRENT, add_to_release, build_release, current_version, load_release, release_images
from vpr.steps.locate import estimate_position, locate


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-locate")
    cfg, layout = build_micro_release(root)
    return root, cfg, layout


def _db_image(root: Path, layout, k: int = 3) -> tuple[Path, dict]:
    index = ShardReader(layout.shards_dir).index
    row = index.filter(pl.col("role") == "database").sort("id").row(k, named=True)
    return root / "data" / row["path"], row


def test_release_has_stable_ids_and_metadata(micro):
    root, cfg, layout = micro
    release = load_release(layout.release_dir("avg"))
    index = ShardReader(layout.shards_dir).index
    expected = release_images(index, None)
    assert release.index.ntotal == expected.height == release.ids.height
    assert sorted(release.ids["id"].to_list()) == expected["id"].to_list()
    assert set(release.ids["role"]) == {"database"}
    assert release.manifest["head"] == "avg" and release.manifest["count"] == expected.height
    # IndexIDMap2 can reconstruct by shard id: the stored vector of id i is the one extract() gives
    some_id = int(expected["id"][5])
    stored = release.index.reconstruct(some_id)
    fresh = release.encode(ShardReader(layout.shards_dir), [some_id])[0]
    np.testing.assert_allclose(stored, fresh, atol=1e-5)


def _cli(root: Path, cfg, args: list[str], monkeypatch):
    """Run the ``vpr`` CLI in-process from the project root (paths in params are relative to it)."""
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    monkeypatch.chdir(root)
    return CliRunner().invoke(app, [*args, "--params", str(params)], env={"COLUMNS": "200"})


def test_locate_json_returns_known_database_image_first(micro, monkeypatch):
    root, cfg, layout = micro
    image, row = _db_image(root, layout)
    result = _cli(root, cfg, ["locate", str(image), "--head", "avg", "--top-k", "3", "--json"], monkeypatch)
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.stdout)
    assert answer["ok"] and answer["image"] == str(image)
    first = answer["matches"][0]
    assert first["id"] == row["id"] and first["path"] == row["path"]
    assert first["distance"] < 1e-3
    assert (first["utm_east"], first["utm_north"]) == (row["utm_east"], row["utm_north"])
    assert first["lat"] == pytest.approx(row["lat"])
    assert len(answer["matches"]) == 3
    est = answer["estimate"]
    assert abs(est["utm_east"] - row["utm_east"]) <= 25 and abs(est["utm_north"] - row["utm_north"]) <= 25
    assert 0.9 <= answer["confidence"] <= 1.0


def test_broken_images_fail_alone(micro, tmp_path):
    root, cfg, layout = micro
    good, row = _db_image(root, layout, k=7)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(bomb)  # 12 MP of zeros: a few kB on disk
    missing = tmp_path / "missing.jpg"
    results = locate(
        [garbage, good, truncated, bomb, missing], layout.release_dir("avg"), top_k=2, max_pixels=1_000_000
    )
    assert [r["ok"] for r in results] == [False, True, False, False, False]
    assert [r["image"] for r in results] == [str(p) for p in (garbage, good, truncated, bomb, missing)]
    assert results[1]["matches"][0]["id"] == row["id"]
    assert "not an image" in results[0]["error"]
    assert "truncated" in results[2]["error"]
    assert "12000000 pixels" in results[3]["error"] and "before decoding" in results[3]["error"]
    assert "cannot read" in results[4]["error"]


def test_cli_table_and_exit_status(micro, tmp_path, monkeypatch):
    root, cfg, layout = micro
    good, _ = _db_image(root, layout)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    result = _cli(root, cfg, ["locate", str(good), str(bad), "--head", "avg"], monkeypatch)
    assert result.exit_code == 1
    assert "confidence" in result.stdout and "file is empty" in result.stdout


def test_cli_without_release_is_a_clear_error(micro, monkeypatch):
    root, cfg, layout = micro
    result = _cli(root, cfg, ["locate", "x.jpg", "--head", "gem"], monkeypatch)
    assert result.exit_code == 1 and "no release" in result.output


def test_add_to_release_is_atomic_versioned_and_idempotent(micro, tmp_path):
    root, cfg, layout = micro
    release_dir = layout.release_dir("avg")
    before = load_release(release_dir)
    v_before = before.version
    reader = ShardReader(layout.shards_dir)
    # pretend the two test queries are new imagery: index them under their own shard ids
    new = reader.index.filter(pl.col("role") == "queries").sort("id").head(2)
    new_ids = new["id"].to_list()
    desc = before.encode(reader, new_ids)
    v_new = add_to_release(before, new_ids, desc, new)
    assert v_new.name != v_before and (release_dir / CURRENT).read_text().strip() == v_new.name
    after = load_release(release_dir)
    assert after.index.ntotal == before.index.ntotal + 2
    assert set(new_ids) <= set(after.ids["id"].to_list())
    assert after.manifest["parent"] == v_before and after.manifest["added"] == 2
    # the old in-memory release is untouched, and its version folder is still there
    assert before.index.ntotal + 2 == after.index.ntotal and (release_dir / v_before).is_dir()
    d, ids = after.search(desc, 1)
    assert ids[:, 0].tolist() == new_ids and np.all(d[:, 0] < 1e-3)
    # retrying the same batch (even from the stale release object) adds nothing and writes nothing
    assert add_to_release(before, new_ids, desc, new) == v_new
    assert current_version(release_dir) == v_new
    assert load_release(release_dir).index.ntotal == after.index.ntotal


def test_failed_write_keeps_previous_release_serving(micro, monkeypatch):
    root, cfg, layout = micro
    release_dir = layout.release_dir("avg")
    live = current_version(release_dir)
    image, _ = _db_image(root, layout)
    before = locate([image], release_dir, top_k=3)

    import vpr.steps.index as index_mod

    def explode(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.faiss, "write_index", explode)
    with pytest.raises(OSError, match="disk full"):
        build_release("avg", cfg, layout)
    monkeypatch.undo()
    assert current_version(release_dir) == live
    assert not [p for p in release_dir.iterdir() if p.name.startswith(".tmp-")]
    assert locate([image], release_dir, top_k=3) == before


def test_estimate_position_weights_agreeing_matches():
    east = np.array([0.0, 10.0, 500.0, 20.0])
    north = np.zeros(4)
    e, n, agree, conf = estimate_position(east, north, np.array([0.1, 0.2, 0.3, 0.4]), radius_m=25.0)
    assert agree.tolist() == [True, True, False, True]
    assert 0 < e < 10 and n == 0
    assert 0 < conf < 1
    _, _, _, sure = estimate_position(east[:2], north[:2], np.array([0.0, 0.5]), radius_m=25.0)
    assert sure == pytest.approx(1.0)


def test_concurrent_writers_each_add_once(micro):
    root, cfg, layout = micro
    import threading

    release_dir = layout.release_dir("avg")
    stale = load_release(release_dir)
    reader = ShardReader(layout.shards_dir)
    queries = reader.index.filter(pl.col("role") == "queries").sort("id")
    batches = [queries.slice(2, 3), queries.slice(5, 3)]
    descs = [stale.encode(reader, b["id"].to_list()) for b in batches]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            add_to_release(stale, batches[i]["id"].to_list(), descs[i], batches[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = load_release(release_dir)
    ids = final.ids["id"].to_list()
    assert len(ids) == len(set(ids)) == stale.index.ntotal + 6
    assert final.index.ntotal == len(ids)
