"""A release's search gives every row the answer it gets searched alone, however many rows come together.

The service searches the queries of concurrent requests in one call (``vpr.steps.api.batcher``); one
FAISS call over that many rows of an exact index takes a BLAS shortcut whose last bits differ from a
one-row search (a distance, a tie, an order). ``Release.search`` must not: these tests compare it, bit
for bit, with FAISS searching each row on its own.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest

from vpr.foundations.config import IndexConfig
from vpr.shared import retrieval
from vpr.shared.release import ID_SCHEMA, Release
from vpr.shared.retrieval import flat_vectors, search_alone
from vpr.steps.index import new_index

DIM, N, ROWS = 2048, 600, 64  # 64 rows × 2,048 dimensions: past FAISS's BLAS threshold (128,000) in one call


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((N, DIM)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db[100:110] = db[5]  # exact duplicates: ties, broken by position as FAISS breaks them
    queries = (db[rng.integers(0, N, ROWS)] + 0.05 * rng.standard_normal((ROWS, DIM))).astype(np.float32)
    queries[:3] = db[[5, 7, 9]]  # the database's own vectors: distance 0 (or a rounding away from it)
    ids = rng.permutation(10 * N)[:N].astype(np.int64) * 7 + 3  # ids unlike positions
    return db, queries, ids


def _release(kind: str, seed: int = 0) -> tuple[Release, np.ndarray]:
    db, queries, ids = _data(seed)
    index = new_index(kind, DIM, db, IndexConfig(nlist=4, nprobe=2, pq_m=8, pq_bits=4))
    index.add_with_ids(db, ids)
    table = pl.DataFrame({"id": ids, "path": [f"{i}.jpg" for i in ids]}).with_columns(
        split=pl.lit("test"), role=pl.lit("database"), utm_east=0.0, utm_north=0.0, lat=0.0, lon=0.0
    )
    release = Release(path=Path("v000001"), manifest={}, model=None, index=index, ids=table.cast(ID_SCHEMA))  # type: ignore[arg-type]
    return release, queries


def _alone(index: faiss.Index, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS, one row per call: the reference (the service searched each request on its own before)."""
    found = [index.search(queries[i : i + 1], k, params=params) for i in range(len(queries))]
    sq = np.concatenate([d for d, _ in found])
    return np.sqrt(np.maximum(sq, 0)), np.concatenate([i for _, i in found])


@pytest.mark.parametrize("k", [1, 5, 100])
def test_an_exact_index_answers_many_rows_as_each_alone(k):
    release, queries = _release("exact")
    distances, ids = release.search(queries, k)
    want_d, want_i = _alone(release.index, queries, k)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(distances, want_d)  # bit for bit, not approximately


def test_a_gps_prior_and_a_short_database_answer_each_row_as_alone():
    release, queries = _release("exact", seed=1)
    allowed = release.ids["id"].to_numpy()[::15]
    allowed = np.concatenate([allowed, [-5, 10**12]])  # ids not in the release are ignored, as by FAISS
    distances, ids = release.search(queries, 50, allowed)
    selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
    want_d, want_i = _alone(release.index, queries, 50, faiss.SearchParameters(sel=selector))
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(distances[want_i >= 0], want_d[want_i >= 0])
    assert (ids[:, -1] == -1).all()  # fewer allowed images than k: padded with −1, like FAISS
    none = release.search(queries[:4], 3, np.array([], dtype=np.int64))[1]
    assert (none == -1).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_answer_many_rows_as_each_alone(kind):
    release, queries = _release(kind)
    distances, ids = release.search(queries, 5)
    want_d, want_i = _alone(release.index, queries, 5)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(distances, want_d)


def test_nearly_equidistant_vectors_are_answered_as_alone_too():
    """Vectors closer together than float32 products can tell apart (an untrained model's descriptors):
    every vector is scored by the one-row kernel, so ties and orders are FAISS's own."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(DIM).astype(np.float32)
    db = (base + 1e-4 * rng.standard_normal((N, DIM))).astype(np.float32)
    index = faiss.IndexFlatL2(DIM)
    index.add(db)
    queries = (base + 1e-4 * rng.standard_normal((ROWS, DIM))).astype(np.float32)
    vectors, _ = flat_vectors(index)
    sq, pos = search_alone(vectors, queries, 5)
    want_sq, want_pos = _alone(index, queries, 5)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(np.sqrt(np.maximum(sq, 0)), want_sq)


def test_search_alone_scans_in_blocks_and_spans_with_the_same_result(monkeypatch):
    monkeypatch.setattr(retrieval, "ALONE_BLOCK_BYTES", 16 * 4 * DIM)  # 16 vectors a block: many blocks a span
    db, queries, _ = _data(2)
    index = faiss.IndexFlatL2(DIM)
    index.add(db)
    vectors, id_map = flat_vectors(index)
    assert id_map is None and np.shares_memory(vectors, faiss.rev_swig_ptr(index.get_xb(), N * DIM))
    want_sq, want_pos = zip(*(index.search(queries[i : i + 1], 7) for i in range(40)))
    sq, pos = search_alone(vectors, queries[:40], 7, span=100)  # 6 spans, merged
    np.testing.assert_array_equal(pos, np.concatenate(want_pos))
    np.testing.assert_array_equal(sq, np.concatenate(want_sq))
    empty_d, empty_p = search_alone(vectors, queries[:0], 7)
    assert empty_d.shape == empty_p.shape == (0, 7)
    assert flat_vectors(faiss.IndexHNSWFlat(DIM, 8)) is None
