"""Triplet selection: best positive in descriptor space, hardest non-soft-positive negatives."""

import numpy as np

from vpr.shared.triplets import select_triplets


def test_select_triplets_picks_nearest_positive_and_hardest_negatives():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(50, 8)).astype(np.float32)
    q = db[[3, 20]] + 0.01  # query 0 ≈ db 3, query 1 ≈ db 20
    hard = [np.array([3, 4]), np.array([19, 20])]
    soft = [np.array([2, 3, 4, 5]), np.array([18, 19, 20])]
    pool_idx = np.arange(50)
    out = select_triplets(q, db, pool_idx, hard, soft, candidates=np.arange(50), n_neg=5, n_db=50, rng=rng)
    assert out[:, 0].tolist() == [3, 20]
    for i in range(2):
        negs = out[i, 1:]
        assert not set(negs) & set(soft[i])
        d = ((db - q[i]) ** 2).sum(1)
        d[soft[i]] = np.inf
        assert sorted(negs.tolist()) == sorted(np.argsort(d)[:5].tolist())


def test_random_mode_fills_with_non_positives():
    rng = np.random.default_rng(1)
    db = rng.normal(size=(30, 4)).astype(np.float32)
    hard, soft = [np.array([0, 1])], [np.array([0, 1, 2])]
    pool_idx = np.array([0, 1])
    out = select_triplets(
        db[[0]], db[pool_idx], pool_idx, hard, soft, candidates=np.empty(0, np.int64), n_neg=10, n_db=30, rng=rng
    )
    assert out[0, 0] == 0 and len(set(out[0, 1:])) == 10 and not set(out[0, 1:]) & {0, 1, 2}
