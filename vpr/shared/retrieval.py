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


# Database bytes per distance call of ``search_alone``: a block stays in a core's cache while every query of
# the call scans it (the database is read from memory once per call, not once per query)
ALONE_BLOCK_BYTES = 1 << 20
_FLOAT_MAX = float(np.finfo(np.float32).max)  # FAISS's empty result slot (and nothing at or above it is a match)


def flat_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(N×d float32 view of the stored vectors, ids by storage position or None when ids are positions)
    of a flat L2 index, bare or under an ``IndexIDMap``; None for any other kind. No copy: valid while
    ``index`` lives unchanged."""
    id_map = None
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        id_map = faiss.vector_to_array(index.id_map)
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2:
        return None
    n, d = index.ntotal, index.d
    vectors = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d) if n else np.empty((0, d), np.float32)
    return vectors, id_map


def _k_smallest(dist: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k smallest (distance, position) pairs in that order, padded with (FLOAT_MAX, −1);
    distances at or above FLOAT_MAX (and NaN) are never a match — FAISS's heap keeps the same ones."""
    out_d = np.full((len(dist), k), _FLOAT_MAX, np.float32)
    out_p = np.full((len(dist), k), -1, np.int64)
    for row in range(len(dist)):
        d, p = dist[row], pos[row]
        keep = d < _FLOAT_MAX
        if k < keep.sum():
            keep &= d <= np.partition(np.where(keep, d, np.inf), k - 1)[k - 1]  # ties at the k-th: all kept
        d, p = d[keep], p[keep]
        order = np.lexsort((p, d))[:k]
        out_d[row, : len(order)], out_p[row, : len(order)] = d[order], p[order]
    return out_d, out_p


def search_alone(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    candidates: np.ndarray | None = None,
    *,
    span: int = 1 << 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared L2 k-NN of each query row among ``vectors`` (or only the sorted storage positions
    ``candidates``): (distances, positions), each Q×k, padded with (FLOAT_MAX, −1).

    Each row gets exactly what a FAISS flat search of that row alone gives where FAISS scores it pair by
    pair (its sequential kernel ``fvec_L2sqr``; ties: the lower position first) — always on one thread,
    and below 10,000 vectors on any — however many rows come together: one FAISS call over many rows
    switches to a BLAS product whose last bits differ (as FAISS 1.15 does for one row on 10,000 vectors
    or more with several threads). Every vector is scored by that kernel, for all rows together block by
    block (``ALONE_BLOCK_BYTES`` of vectors per call, held in cache while every row scans them): the
    database is read once per call, not once per row. (A shortlist from one BLAS product, then the
    kernel on each row's candidates, was slower at every batch size from 1 to 512 rows: BENCHMARKS.md
    "Service".)

    Everything runs on the calling thread (FAISS's OpenMP team is 1 for it: forking a team per block
    costs more than it gains, and the service's other threads want the second core). Memory: Q ×
    ``span`` distances at a time.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not len(queries):
        return _k_smallest(np.empty((0, 0), np.float32), np.empty((0, 0), np.int64), k)
    team = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
    try:
        return _scan(vectors, queries, k, candidates, span)
    finally:
        faiss.omp_set_num_threads(team)


def _exact(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """FAISS's exact kernel: the squared distance of query row i to each vector ``ids[i]`` (−1: +inf)."""
    ptr, out = faiss.swig_ptr, np.empty(ids.shape, np.float32)
    nq, width = ids.shape
    faiss.fvec_L2sqr_by_idx(ptr(out), ptr(queries), ptr(vectors), ptr(ids), queries.shape[1], nq, width)
    return out


def _scan(
    vectors: np.ndarray, queries: np.ndarray, k: int, candidates: np.ndarray | None, span: int
) -> tuple[np.ndarray, np.ndarray]:
    nq, d = queries.shape
    cand = np.arange(len(vectors), dtype=np.int64) if candidates is None else np.asarray(candidates, np.int64)
    block_rows = max(16, ALONE_BLOCK_BYTES // (4 * max(1, d)))
    best_d, best_p = _k_smallest(np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64), k)
    for s0 in range(0, len(cand), span):
        part = cand[s0 : s0 + span]
        dist = np.empty((nq, len(part)), np.float32)
        for b0 in range(0, len(part), block_rows):
            block = part[b0 : b0 + block_rows]
            dist[:, b0 : b0 + len(block)] = _exact(
                vectors, queries, np.ascontiguousarray(np.broadcast_to(block, (nq, len(block))))
            )
        positions = np.broadcast_to(part, dist.shape)
        best_d, best_p = _k_smallest(np.hstack([best_d, dist]), np.hstack([best_p, positions]), k)
    return best_d, best_p


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
