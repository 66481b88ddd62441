"""Retrieval: exact and approximate nearest-neighbour search over descriptors, and Recall@N.

Recall@N: a query counts as found at N if any of its top-N database matches is one of its positives.
Index kinds are FAISS ``index_factory`` strings (``make_index``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np

from vpr.foundations.config import IndexConfig


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours (FAISS flat index): (distances, indices), each Q×k."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    return index.search(queries, min(k, len(database)))


def rows_within(memory_bytes: float, dim: int, share: float = 0.25) -> int:
    """How many float32 rows of ``dim`` fit in ``share`` of a memory budget (at least 1)."""
    return max(1, int(memory_bytes * share) // (4 * dim))


def chunked_search(
    database_chunks: Callable[[], Iterable[tuple[int, np.ndarray]]],
    queries: np.ndarray,
    k: int,
    *,
    query_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 search over a database read in chunks, with a running top-k (``faiss.ResultHeap``).

    ``database_chunks()`` yields ``(first row, float32 block)``; it is called once per block of
    ``query_rows`` queries, so memory holds one query block, one database block and the Q×k heaps —
    whatever the database size. Returns (squared distances, database rows), each Q×k, best first;
    rows are −1 where the database has fewer than k vectors. Same neighbours as ``exact_search``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    query_rows = nq if query_rows is None else max(1, query_rows)
    distances = np.empty((nq, k), dtype=np.float32)
    rows = np.empty((nq, k), dtype=np.int64)
    for qs in range(0, nq, query_rows):
        block = queries[qs : qs + query_rows]
        heap = faiss.ResultHeap(len(block), k)
        for first, chunk in database_chunks():
            d, i = faiss.knn(block, chunk, min(k, len(chunk)))
            heap.add_result(d, np.where(i >= 0, i + first, -1))
        heap.finalize()
        distances[qs : qs + len(block)], rows[qs : qs + len(block)] = heap.D, heap.I
    return distances, rows


def recall_at_n(
    predictions: np.ndarray, positives: Sequence[Sequence[int]], ns: Sequence[int] = (1, 5, 10, 20)
) -> dict[int, float]:
    """Recall@N in percent from ranked database indices (Q×k) and each query's positive indices.

    A query without any positive can never be found; it still counts in the denominator, as in the
    standard benchmark protocol.
    """
    if len(predictions) != len(positives):
        raise ValueError(f"{len(predictions)} prediction rows for {len(positives)} queries")
    if len(predictions) == 0:
        raise ValueError("no queries to evaluate")
    first_hit = np.full(len(predictions), np.inf)
    for q, (ranked, pos) in enumerate(zip(predictions, positives)):
        if len(pos) == 0:
            continue
        hits = np.flatnonzero(np.isin(ranked, np.asarray(pos)))
        if len(hits):
            first_hit[q] = hits[0]
    return {n: float(100.0 * np.mean(first_hit < n)) for n in ns}


# --------------------------------------------------------------------------- approximate search


def pq_subquantizers(dim: int, wanted: int) -> int:
    """The largest divisor of ``dim`` that is at most ``wanted`` (PQ needs ``dim % m == 0``)."""
    return max(m for m in range(1, min(dim, wanted) + 1) if dim % m == 0)


def factory_string(kind: str, n_train: int, dim: int, params: IndexConfig | None = None) -> str:
    """The FAISS ``index_factory`` string of an index ``kind`` (``exact`` | ``ivfpq`` | ``hnsw``).

    IVF-PQ's cell count and code size are clamped so that a small database still trains (k-means needs
    at least as many points as centroids): ``nlist ≤ n/39`` and ``2**pq_bits ≤ n``.
    """
    params = params or IndexConfig()
    if kind == "exact":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{params.hnsw_m},Flat"
    if kind == "ivfpq":
        nlist = max(1, min(params.nlist, n_train // 39))
        nbits = max(1, min(params.pq_bits, int(math.log2(max(2, n_train)))))
        return f"IVF{nlist},PQ{pq_subquantizers(dim, params.pq_m)}x{nbits}"
    raise ValueError(f"unknown index kind {kind!r}; expected exact, ivfpq or hnsw")


def make_index(kind: str, dim: int, n_train: int, params: IndexConfig | None = None) -> faiss.Index:
    """An empty FAISS L2 index of ``kind`` sized for ``n_train`` vectors, with its search-time knobs set.

    The caller trains it (``index.train``) when ``index.is_trained`` is false.
    """
    params = params or IndexConfig()
    index = faiss.index_factory(dim, factory_string(kind, n_train, dim, params), faiss.METRIC_L2)
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = params.ef_search
    elif kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(params.nprobe, ivf.nlist)
    return index


def unit_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def approximate_recall(
    database: np.ndarray,
    queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    kind: str,
    *,
    ns: Sequence[int] = (1, 5, 10, 20),
    pca_dim: int | None = None,
    params: IndexConfig | None = None,
) -> dict:
    """Recall@N of an approximate index (optionally after PCA) and its loss against exact search.

    Both searches run on the same descriptors: exact = ``IndexFlatL2`` on the full descriptors;
    approximate = PCA to ``pca_dim`` (trained on the database, then re-L2-normalised) if given, then
    ``kind`` (``exact`` here means flat search on the PCA output). Returns ``recall@N``,
    ``exact_recall@N``, ``recall_loss@N`` (exact − approximate, in points: positive = worse),
    ``top1_agreement`` (% of queries whose first match is the exact one), per-query search times
    and their ratio ``speedup`` (exact time / approximate time; noisy on tiny sets).
    """
    ns = sorted(set(ns))
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(max(ns), len(database))
    t0 = time.perf_counter()
    _, exact_ranked = exact_search(database, queries, k)
    exact_s = time.perf_counter() - t0
    db, q = database, queries
    if pca_dim is not None:
        if not 0 < pca_dim < database.shape[1]:
            raise ValueError(f"pca_dim must be in 1..{database.shape[1] - 1}, got {pca_dim}")
        if pca_dim > len(database):
            raise ValueError(f"pca_dim {pca_dim} exceeds the {len(database)} database vectors it is fitted on")
        pca = faiss.PCAMatrix(database.shape[1], pca_dim)
        pca.train(database)
        db, q = unit_rows(pca.apply(database)), unit_rows(pca.apply(queries))
    index = make_index(kind, db.shape[1], len(db), params)
    if not index.is_trained:
        index.train(db)
    index.add(db)
    t0 = time.perf_counter()
    _, ranked = index.search(q, k)
    approx_s = time.perf_counter() - t0
    exact_r = recall_at_n(exact_ranked, positives, ns)
    approx_r = recall_at_n(ranked, positives, ns)
    nq = max(1, len(queries))
    out: dict = {"index": kind, "pca_dim": pca_dim, "descriptor_dim": int(db.shape[1])}
    for n in ns:
        out[f"recall@{n}"] = approx_r[n]
        out[f"exact_recall@{n}"] = exact_r[n]
        out[f"recall_loss@{n}"] = exact_r[n] - approx_r[n]
    out["top1_agreement"] = float(100.0 * np.mean(ranked[:, 0] == exact_ranked[:, 0])) if len(queries) else 0.0
    out["ms_per_query"] = 1000.0 * approx_s / nq
    out["exact_ms_per_query"] = 1000.0 * exact_s / nq
    out["speedup"] = exact_s / max(approx_s, 1e-9)
    return out
