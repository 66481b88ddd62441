"""Recall@N on hand-made descriptors with known answers."""

import numpy as np
import pytest

from vpr.shared.retrieval import exact_search, recall_at_n


def test_recall_on_known_layout():
    # database on a line; query i sits next to database image 2*i
    database = np.array([[float(i), 0.0] for i in range(10)], dtype=np.float32)
    queries = np.array([[0.1, 0], [2.1, 0], [4.1, 0], [9.0, 5.0]], dtype=np.float32)
    positives = [[0], [3], [9], []]  # q1's true place is 3 (ranked 2nd), q2's is 9 (far), q3 has none
    _, ranked = exact_search(database, queries, k=5)
    assert ranked[0, 0] == 0 and ranked[1, 0] == 2 and ranked[1, 1] == 3
    r = recall_at_n(ranked, positives, ns=(1, 2, 5))
    assert r == {1: 25.0, 2: 50.0, 5: 50.0}


def test_query_without_positive_counts_as_miss():
    ranked = np.array([[0, 1], [1, 0]])
    assert recall_at_n(ranked, [[0], []], ns=(1, 2)) == {1: 50.0, 2: 50.0}


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        recall_at_n(np.zeros((2, 3), dtype=int), [[0]], ns=(1,))
