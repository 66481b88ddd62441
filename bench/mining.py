"""Mining benchmark: KD-tree UTM positives vs brute force, 1e4 → 1e6 database points.

Density is held constant (about 20 database points within 25 m of a query, like a street-view
capture every few metres), queries are a tenth of the database. Brute force (chunked numpy
distance matrix) runs only where it fits in a few seconds; its ratio is measured in the same run.

    .venv/bin/python bench/mining.py [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from vpr.steps.mining import utm_positives


def brute_force_counts(db: np.ndarray, q: np.ndarray, radius: float, chunk: int = 256) -> np.ndarray:
    counts = np.empty(len(q), dtype=np.int64)
    r2 = radius * radius
    for start in range(0, len(q), chunk):
        block = q[start : start + chunk]
        d2 = ((block[:, None, :] - db[None, :, :]) ** 2).sum(-1)
        counts[start : start + chunk] = (d2 <= r2).sum(1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--brute-max", type=int, default=100_000, help="largest size run brute force")
    args = parser.parse_args()
    print(f"# mining benchmark on {platform.node()} ({platform.processor() or platform.machine()})")
    print(f"{'database':>10} {'queries':>8} {'kdtree_s':>9} {'brute_s':>9} {'speedup':>8} {'soft/query':>10}")
    previous = None
    for n in args.sizes:
        rng = np.random.default_rng(0)
        side = math.sqrt(n * math.pi * 25.0**2 / 20.0)
        db = rng.uniform(0, side, (n, 2)) + [584000.0, 4477000.0]
        q = rng.uniform(0, side, (max(n // 10, 1), 2)) + [584000.0, 4477000.0]
        t0 = time.perf_counter()
        hard, soft = utm_positives(db, q, 10.0, 25.0)
        kd = time.perf_counter() - t0
        mean_soft = float(np.mean([len(s) for s in soft]))
        if n <= args.brute_max:
            t0 = time.perf_counter()
            counts = brute_force_counts(db, q, 25.0)
            bf = time.perf_counter() - t0
            assert np.array_equal(counts, [len(s) for s in soft]), "kd-tree disagrees with brute force"
            bf_s, ratio = f"{bf:9.2f}", f"{bf / kd:7.1f}x"
        else:
            bf_s, ratio = f"{'-':>9}", f"{'-':>8}"
        growth = f"  (x{kd / previous[1]:.1f} time for x{n / previous[0]:.0f} points)" if previous else ""
        print(f"{n:>10} {len(q):>8} {kd:9.2f} {bf_s} {ratio} {mean_soft:10.1f}{growth}")
        previous = (n, kd)


if __name__ == "__main__":
    main()
