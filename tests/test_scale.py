"""Scale: descriptors per shard on disk, search within a memory budget, extraction mapped over shards
(Dask), shards streamed over HTTP, and releases that append without rewriting what they hold."""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time

import numpy as np
import polars as pl
import pytest
import torch

from tests.test_evaluate import build_micro, micro_config
from vpr.shared.checkpoints import untrained_model
from vpr.shared.descstore import DescriptorStore, encode_named_shards, encode_plans, encoder_for, plans_for
from vpr.shared.retrieval import chunked_search, exact_search, recall_at_n
from vpr.shared.shardio import ShardError, ShardReader
from vpr.steps.evaluate import evaluate_head


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro(tmp_path_factory.mktemp("scale"), heads=("avg",))


def _test_ids(layout, role: str) -> np.ndarray:
    rows = ShardReader(layout.shards_dir, ("test",)).index
    return rows.filter(pl.col("role") == role)["id"].to_numpy()


def test_chunked_search_finds_what_the_in_memory_search_finds():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((1003, 32)).astype(np.float32)
    q = rng.standard_normal((41, 32)).astype(np.float32)
    positives = [rng.choice(len(db), 5, replace=False) for _ in q]
    d0, i0 = exact_search(db, q, 20)

    def chunks():
        return ((s, db[s : s + 97]) for s in range(0, len(db), 97))

    d1, i1 = chunked_search(chunks, q, 20, query_rows=8)  # 11 database chunks × 6 query blocks
    assert np.array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-6)
    assert recall_at_n(i0, positives) == recall_at_n(i1, positives)
    _, short = chunked_search(lambda: iter([(0, db[:3])]), q, 5)  # fewer vectors than k: padded with -1
    assert (short[:, 3:] == -1).all() and (short[:, :3] >= 0).all()


def test_evaluation_within_a_tiny_memory_budget_matches_the_in_memory_search(micro, tmp_path):
    cfg, layout = micro
    full = evaluate_head("avg", cfg, layout)
    predictions = pl.read_parquet(layout.predictions("avg"))
    tiny = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"memory_gb": 1e-7})})
    from vpr.shared.retrieval import rows_within

    assert rows_within(1e-7 * 2**30, 64) < 8  # chunks of a few rows: many chunks and query blocks
    small = evaluate_head("avg", tiny, layout)
    assert {k: v for k, v in small.items() if k.startswith("recall")} == {
        k: v for k, v in full.items() if k.startswith("recall")
    }
    assert pl.read_parquet(layout.predictions("avg")).equals(predictions)
    # and the in-memory path on the same descriptors gives the same Recall@N
    from vpr.shared.checkpoints import load_model
    from vpr.shared.descriptors import eval_transform, extract
    from vpr.shared.splits import load_split

    reader = ShardReader(layout.shards_dir, ("test",))
    split = load_split(reader.index, pl.read_parquet(layout.mining("test")), "test")
    model, _ = load_model(layout.checkpoint("avg"))
    tf = eval_transform(cfg.shards, cfg.train.image_scale)
    kw = dict(device=torch.device("cpu"), batch_size=cfg.evaluate.batch_size)
    _, ranked = exact_search(
        extract(model, reader, split.db_ids, tf, **kw), extract(model, reader, split.q_ids, tf, **kw), 20
    )
    expected = recall_at_n(ranked, split.soft, cfg.evaluate.recall_at)
    assert {n: full[f"recall@{n}"] for n in cfg.evaluate.recall_at} == expected


def test_each_shard_is_encoded_once_per_model(micro, tmp_path):
    cfg, layout = micro
    reader = ShardReader(layout.shards_dir, ("test",))
    ids = _test_ids(layout, "database")
    plans = plans_for(reader, ids)
    assert len(plans) >= 2  # the micro database spans several shards
    store = DescriptorStore(tmp_path / "store")
    model = untrained_model("avg", cfg.model, 0)
    first = encode_plans(encoder_for(model, cfg, torch.device("cpu")), plans, store)
    files = sorted(store.root.rglob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = encode_plans(encoder_for(untrained_model("avg", cfg.model, 0), cfg, torch.device("cpu")), plans, store)
    assert first.encoded == len(plans) and again.encoded == 0
    assert [f.stat().st_mtime_ns for f in sorted(store.root.rglob("*.npy"))] == stamps
    np.testing.assert_array_equal(again.gather(ids), first.gather(ids))
    other = encode_plans(encoder_for(untrained_model("avg", cfg.model, 1), cfg, torch.device("cpu")), plans, store)
    assert other.encoded == len(plans)  # other weights: other entries, never the stale ones
    half = encode_plans(
        encoder_for(
            model,
            cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"descriptor_dtype": "float16"})}),
            torch.device("cpu"),
        ),
        plans,
        store,
    )
    assert half.encoded == len(plans) and half.part(0).dtype == np.float16
    np.testing.assert_allclose(half.gather(ids), first.gather(ids), atol=2e-3)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def shard_server(micro):
    """The micro project's shard folder served over HTTP on 127.0.0.1 (a real server, a real socket)."""
    _, layout = micro
    handler = functools.partial(_QuietHandler, directory=str(layout.shards_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shards_streamed_over_http_give_the_descriptors_of_the_local_files(micro, shard_server, tmp_path):
    cfg, layout = micro
    reader = ShardReader(layout.shards_dir, ("test",))
    ids = np.concatenate([_test_ids(layout, "database"), _test_ids(layout, "queries")])
    encoder = encoder_for(untrained_model("gem", cfg.model, 0), cfg, torch.device("cpu"))
    local = encode_plans(encoder, plans_for(reader, ids), DescriptorStore(tmp_path / "local"))
    remote_plans = plans_for(reader, ids, shard_server)
    assert all(str(p.url).startswith("http://127.0.0.1") for p in remote_plans)
    remote = encode_plans(encoder, remote_plans, DescriptorStore(tmp_path / "remote"))
    assert remote.encoded == len(remote_plans)
    np.testing.assert_array_equal(remote.gather(ids), local.gather(ids))


def test_an_unreachable_or_missing_remote_shard_fails_fast_and_names_it(micro, shard_server, tmp_path):
    cfg, layout = micro
    reader = ShardReader(layout.shards_dir, ("test",))
    ids = _test_ids(layout, "database")
    encoder = encoder_for(untrained_model("avg", cfg.model, 0), cfg, torch.device("cpu"))
    t0 = time.monotonic()
    with pytest.raises(ShardError, match="127.0.0.1:9"):  # a closed port: refused at once
        encode_plans(encoder, plans_for(reader, ids, "http://127.0.0.1:9/shards"), DescriptorStore(tmp_path / "a"))
    with pytest.raises(ShardError, match="missing-dir"):  # a 404: curl --fail, no retries for minutes
        encode_plans(encoder, plans_for(reader, ids, f"{shard_server}/missing-dir"), DescriptorStore(tmp_path / "b"))
    assert time.monotonic() - t0 < 60  # bounded waits (the limit is loose: it only catches a hang)
    assert not list((tmp_path / "a").rglob("*.npy")) and not list((tmp_path / "b").rglob("*.npy"))


def test_extraction_on_a_two_worker_dask_cluster_matches_one_process(prefect_harness, micro_project, tmp_path):
    import shutil

    import yaml

    from flows.encode import encode_shards
    from vpr.foundations.layout import Layout

    root, cfg, layout = micro_project
    single = tmp_path / "single"
    shutil.copytree(root, single)
    reference = encode_named_shards("avg", cfg, Layout.from_config(cfg, single), _shard_names(layout), untrained=True)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["orchestration"] = {"task_runner": "dask", "max_workers": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    first = encode_shards(stage="baseline", root=str(root))
    assert first["shards"] == len(reference) >= 2 and first["encoded"] == len(reference)
    on_dask = {p.relative_to(layout.descriptors_dir) for p in layout.descriptors_dir.rglob("*.npy")}
    here = Layout.from_config(cfg, single).descriptors_dir
    assert on_dask == {p.relative_to(here) for p in here.rglob("*.npy")}  # the same content addresses
    for name in on_dask:
        assert (layout.descriptors_dir / name).read_bytes() == (here / name).read_bytes()  # the same bits
    stamps = {n: (layout.descriptors_dir / n).stat().st_mtime_ns for n in on_dask}
    second = encode_shards(stage="baseline", root=str(root))
    assert second["encoded"] == 0  # nothing unchanged is encoded again
    assert {n: (layout.descriptors_dir / n).stat().st_mtime_ns for n in on_dask} == stamps


def _shard_names(layout) -> list[str]:
    from vpr.shared.shardio import evaluation_shards

    return evaluation_shards(layout)


def test_appending_links_the_release_and_writes_only_the_batch(tmp_path, monkeypatch):
    import vpr.steps.index
    from vpr.steps.index import add_to_release, build_release, load_release, open_for_append

    cfg, layout = build_micro(tmp_path / "p", heads=("avg",), cfg=micro_config())
    version = build_release("avg", cfg, layout)
    base_inode = os.stat(version / "index.faiss").st_ino
    release = open_for_append(layout.release_dir("avg"))
    dim = release.manifest["descriptor_dim"]
    rng = np.random.default_rng(0)
    first_new = int(load_release(layout.release_dir("avg")).ids["id"].max()) + 1
    meta = pl.DataFrame({"id": np.arange(first_new, first_new + 20), "path": [f"new/{i}.jpg" for i in range(20)]})
    monkeypatch.setattr(vpr.steps.index, "MAX_DELTAS", 3)
    versions, vectors = [version], []
    for batch in range(5):
        ids = np.arange(first_new + 4 * batch, first_new + 4 * batch + 4)
        x = rng.standard_normal((4, dim)).astype(np.float32)
        vectors.append(x)
        versions.append(add_to_release(open_for_append(layout.release_dir("avg")), ids, x, meta))
    assert not version.exists()  # pruned: only the live version and its parent are kept...
    assert os.stat(versions[-1] / "index.faiss").st_ino == base_inode  # ...and its base is linked, never rewritten
    manifest = load_release(layout.release_dir("avg")).manifest
    assert [s["kind"] for s in manifest["segments"]].count("delta") <= 3  # merged past MAX_DELTAS
    served = load_release(layout.release_dir("avg"))
    assert served.index.ntotal == served.ids.height == manifest["count"]
    new_ids = np.arange(first_new, first_new + 20)
    np.testing.assert_array_equal(served.index.reconstruct_batch(new_ids), np.concatenate(vectors))
    # a retried batch adds nothing; held() reads no segment whose id range is elsewhere
    same = add_to_release(open_for_append(layout.release_dir("avg")), new_ids[:4], vectors[0], meta)
    assert same == versions[-1]
