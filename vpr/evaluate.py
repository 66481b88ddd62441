"""Recall@N: a query counts as found at N if any of its top-N database matches is a soft positive."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours (FAISS flat index): (distances, indices), each Q×k."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    return index.search(queries, min(k, len(database)))


def recall_at_n(predictions: np.ndarray, positives: Sequence[Sequence[int]],
                ns: Sequence[int] = (1, 5, 10, 20)) -> dict[int, float]:
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
